/* y = x @ w.T + b for the few rows of batch-1 decoding (see skinny.py for why).
 *
 * Each output feature j streams its weight row from memory once and takes its dot products
 * with the input rows, GROUP rows at a time: the row stays in L1 for the next group. Each dot
 * product keeps SPLIT vector accumulators (consecutive 8-float blocks go to accumulators
 * 0..SPLIT-1 in turn), so enough independent multiply-adds are in flight to hide their latency
 * even at one row. A row's arithmetic is the same whatever rows share the call, so its output
 * is bitwise the same alone or in company, and a token's logits do not depend on how many
 * tokens share its forward. The fused multiply-add is used explicitly where the CPU has one
 * (the build disables implicit contraction, which the compiler could apply unevenly).
 * Threads: OpenMP over output features (the same runtime as torch's, see skinny.py). */
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
enum { GROUP = 2, SPLIT = 4 };

#if defined(__FMA__)
#include <immintrin.h>
static inline v8 madd(v8 a, v8 b, v8 c) {
    return (v8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
}
#else
static inline v8 madd(v8 a, v8 b, v8 c) { return a * b + c; }
#endif

static inline v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Rows 0..n-1 (n <= GROUP, a constant after inlining) of x [n, in] against the weight row wj;
 * outputs at y[r * out]. */
static inline __attribute__((always_inline)) void dots(const float *x, const float *wj,
                                                      float bias, float *y, const long n,
                                                      long in, long out) {
    v8 acc[GROUP][SPLIT];
    for (long r = 0; r < n; ++r)
        for (int s = 0; s < SPLIT; ++s) acc[r][s] = (v8){0};
    long k = 0;
    for (; k + 8 * SPLIT <= in; k += 8 * SPLIT)
        for (int s = 0; s < SPLIT; ++s) {
            v8 wk = load8(wj + k + 8 * s);
            for (long r = 0; r < n; ++r)
                acc[r][s] = madd(wk, load8(x + r * in + k + 8 * s), acc[r][s]);
        }
    for (; k + 8 <= in; k += 8) {
        v8 wk = load8(wj + k);
        for (long r = 0; r < n; ++r) acc[r][0] = madd(wk, load8(x + r * in + k), acc[r][0]);
    }
    for (long r = 0; r < n; ++r) {
        v8 total = acc[r][0];
        for (int s = 1; s < SPLIT; ++s) total += acc[r][s];
        float sum = 0.0f;
        for (int lane = 0; lane < 8; ++lane) sum += total[lane];
        for (long t = k; t < in; ++t) sum += wj[t] * x[r * in + t];
        y[r * out] = sum + bias;
    }
}

/* x [n, in], w [out, in], b [out] or NULL, y [n, out]; all contiguous float32. */
void skinny_linear(const float *x, const float *w, const float *b, float *y, long n, long in,
                   long out) {
#pragma omp parallel for schedule(static)
    for (long j = 0; j < out; ++j) {
        const float *wj = w + j * in;
        float bias = b ? b[j] : 0.0f;
        long r = 0;
        for (; r + GROUP <= n; r += GROUP) dots(x + r * in, wj, bias, y + r * out + j, GROUP, in, out);
        if (r < n) dots(x + r * in, wj, bias, y + r * out + j, 1, in, out);
    }
}
