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
 * Weights come as float32 or, where the CPU converts half floats (F16C), as IEEE half floats,
 * widened to float32 as they are read: half the bytes to stream, the arithmetic unchanged.
 * Threads: OpenMP over output features (the same runtime as torch's, see skinny.py). */
#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
enum { GROUP = 2, SPLIT = 4 };

#if defined(__FMA__) || defined(__F16C__)
#include <immintrin.h>
#endif

#if defined(__FMA__)
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

/* Weights [k, k + 8) and [k] of w, float32 or (half != 0) half floats; `half` is a constant
 * after inlining, so each kernel below has one branch-free inner loop. */
static inline v8 wload8(const void *w, long k, const int half) {
#if defined(__F16C__)
    if (half) {
        const __m128i *p = (const __m128i *)((const uint16_t *)w + k);
        return (v8)_mm256_cvtph_ps(_mm_loadu_si128(p));
    }
#endif
    return load8((const float *)w + k);
}

static inline float wload1(const void *w, long k, const int half) {
#if defined(__F16C__)
    if (half) return _cvtsh_ss(((const uint16_t *)w)[k]);
#endif
    return ((const float *)w)[k];
}

/* Rows 0..n-1 (n <= GROUP, a constant after inlining) of x [n, in] against the weight row
 * that starts at element j of w; outputs at y[r * out]. */
static inline __attribute__((always_inline)) void dots(const float *x, const void *w, long j,
                                                      float bias, float *y, const long n,
                                                      long in, long out, const int half) {
    v8 acc[GROUP][SPLIT];
    for (long r = 0; r < n; ++r)
        for (int s = 0; s < SPLIT; ++s) acc[r][s] = (v8){0};
    long k = 0;
    for (; k + 8 * SPLIT <= in; k += 8 * SPLIT)
        for (int s = 0; s < SPLIT; ++s) {
            v8 wk = wload8(w, j + k + 8 * s, half);
            for (long r = 0; r < n; ++r)
                acc[r][s] = madd(wk, load8(x + r * in + k + 8 * s), acc[r][s]);
        }
    for (; k + 8 <= in; k += 8) {
        v8 wk = wload8(w, j + k, half);
        for (long r = 0; r < n; ++r) acc[r][0] = madd(wk, load8(x + r * in + k), acc[r][0]);
    }
    for (long r = 0; r < n; ++r) {
        v8 total = acc[r][0];
        for (int s = 1; s < SPLIT; ++s) total += acc[r][s];
        float sum = 0.0f;
        for (int lane = 0; lane < 8; ++lane) sum += total[lane];
        for (long t = k; t < in; ++t) sum += wload1(w, j + t, half) * x[r * in + t];
        y[r * out] = sum + bias;
    }
}

/* Output feature j of every row (the body of both kernels' parallel loops). */
static inline __attribute__((always_inline)) void feature(const float *x, const void *w,
                                                         const float *b, float *y, long j,
                                                         long n, long in, long out,
                                                         const int half) {
    float bias = b ? b[j] : 0.0f;
    long r = 0;
    for (; r + GROUP <= n; r += GROUP)
        dots(x + r * in, w, j * in, bias, y + r * out + j, GROUP, in, out, half);
    if (r < n) dots(x + r * in, w, j * in, bias, y + r * out + j, 1, in, out, half);
}

/* x [n, in], w [out, in], b [out] or NULL, y [n, out]; all contiguous float32. */
void skinny_linear(const float *x, const float *w, const float *b, float *y, long n, long in,
                   long out) {
#pragma omp parallel for schedule(static)
    for (long j = 0; j < out; ++j) feature(x, w, b, y, j, n, in, out, 0);
}

#if defined(__F16C__)
/* The same with w [out, in] in IEEE half floats. */
void skinny_linear_half(const float *x, const uint16_t *w, const float *b, float *y, long n,
                        long in, long out) {
#pragma omp parallel for schedule(static)
    for (long j = 0; j < out; ++j) feature(x, w, b, y, j, n, in, out, 1);
}
#endif
