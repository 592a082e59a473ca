/* y = x @ w.T + b for the few rows of batch-1 decoding (see skinny.py for why).
 *
 * Each output feature j reads its weight row once and takes its dot product with up to
 * ROWS input rows, which stay in L1: the weights stream from memory once per call whatever
 * the row count, as at one row. Every output is summed in the same order for any row count,
 * so a token's logits do not depend on how many tokens share its forward.
 * Threads: OpenMP over output features (the same runtime as torch's, see skinny.py). */
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
enum { ROWS = 8 };

static inline v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Output feature j for rows 0..n-1 (n <= ROWS) of x [n, in] into y [n, out]. */
static void feature(const float *x, const float *w, const float *b, float *y,
                    long n, long in, long out, long j) {
    const float *wj = w + j * in;
    v8 acc[ROWS];
    float tail[ROWS];
    for (long r = 0; r < n; ++r) {
        acc[r] = (v8){0};
        tail[r] = 0.0f;
    }
    long k = 0;
    for (; k + 8 <= in; k += 8) {
        v8 wk = load8(wj + k);
        for (long r = 0; r < n; ++r) acc[r] += wk * load8(x + r * in + k);
    }
    for (; k < in; ++k)
        for (long r = 0; r < n; ++r) tail[r] += wj[k] * x[r * in + k];
    for (long r = 0; r < n; ++r) {
        float sum = tail[r];
        for (int lane = 0; lane < 8; ++lane) sum += acc[r][lane];
        y[r * out + j] = b ? sum + b[j] : sum;
    }
}

/* x [n, in], w [out, in], b [out] or NULL, y [n, out]; all contiguous float32. */
void skinny_linear(const float *x, const float *w, const float *b, float *y,
                   long n, long in, long out) {
    for (long r0 = 0; r0 < n; r0 += ROWS) {
        long rows = n - r0 < ROWS ? n - r0 : ROWS;
#pragma omp parallel for schedule(static)
        for (long j = 0; j < out; ++j) feature(x + r0 * in, w, b, y + r0 * out, rows, in, out, j);
    }
}
