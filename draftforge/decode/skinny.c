/* Kernels for the few rows of batch-1 decoding (see skinny.py for why): a matmul y = x @ w.T + b,
 * and attention over a KV cache.
 *
 * Matmul. Each output feature j streams its weight row from memory once and takes its dot
 * products with the input rows, 3 or 2 rows at a time: the row stays in L1 for the next group.
 * Meanwhile the weight row AHEAD features on is prefetched. Measured on SmolLM2's 211 matrices
 * read from memory (2 cores): without the prefetch, 2, 3 and 5 rows cost 5%, 18% and 70% more
 * than one row; with it, 2 and 3 rows cost no more than one and 5 rows 34% more, and one row
 * costs 6% less. Each dot product keeps SPLIT vector accumulators (consecutive 8-float blocks go
 * to accumulators 0..SPLIT-1 in turn), so enough independent multiply-adds are in flight to hide
 * their latency even at one row. A row's arithmetic is the same whatever rows share the call, so
 * its output is bitwise the same alone or in company, and a token's logits do not depend on how
 * many tokens share its forward. The fused multiply-add is used explicitly where the CPU has one
 * (the build disables implicit contraction, which the compiler could apply unevenly). Weights
 * come as float32 or, where the CPU converts half floats (F16C), as IEEE half floats, widened to
 * float32 as they are read: half the bytes to stream, the arithmetic unchanged. Threads: OpenMP
 * over output features (the same runtime as torch's, see skinny.py). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
enum { GROUP = 3, SPLIT = 4, AHEAD = 8 };

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
 * that starts at element j of w; outputs at y[r * out]. `ahead`: a later weight row, fetched
 * into the caches meanwhile. */
static inline __attribute__((always_inline)) void dots(const float *x, const void *w, long j,
                                                      const char *ahead, float bias, float *y,
                                                      const long n, long in, long out,
                                                      const int half) {
    v8 acc[GROUP][SPLIT];
    for (long r = 0; r < n; ++r)
        for (int s = 0; s < SPLIT; ++s) acc[r][s] = (v8){0};
    long k = 0;
    for (; k + 8 * SPLIT <= in; k += 8 * SPLIT) {
        /* 8 * SPLIT weights: two 64-byte lines as float32, one as float16 */
        __builtin_prefetch(ahead + k * (half ? 2 : 4), 0, 0);
        if (!half) __builtin_prefetch(ahead + k * 4 + 64, 0, 0);
        for (int s = 0; s < SPLIT; ++s) {
            v8 wk = wload8(w, j + k + 8 * s, half);
            for (long r = 0; r < n; ++r)
                acc[r][s] = madd(wk, load8(x + r * in + k + 8 * s), acc[r][s]);
        }
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
    const char *ahead = (const char *)w + (j + (j + AHEAD < out ? AHEAD : 0)) * in * (half ? 2 : 4);
    long r = 0;
    while (r < n) { /* groups of 3 and 2: a group of 1 only when n is 1 */
        long left = n - r;
        if (left >= 5 || left == 3) {
            dots(x + r * in, w, j * in, ahead, bias, y + r * out + j, 3, in, out, half);
            r += 3;
        } else if (left >= 2) {
            dots(x + r * in, w, j * in, ahead, bias, y + r * out + j, 2, in, out, half);
            r += 2;
        } else {
            dots(x + r * in, w, j * in, ahead, bias, y + r * out + j, 1, in, out, half);
            r += 1;
        }
    }
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

/* Attention. One (query head, row) pair is one task: the scores of the keys the row sees, a
 * softmax, the weighted sum of their values. Keys are visited in cache order and every sum
 * runs in an order fixed by the number of keys seen, so a row's output depends only on its
 * query and the keys it sees: bitwise the same alone or in company, whatever the mask. */
typedef int32_t v8i __attribute__((vector_size(32)));
enum { MAX_HEAD_DIM = 256 };

/* exp(x) for x in [-87, 0] (softmax arguments after the max is subtracted; lower ones are
 * clamped, which changes nothing in float32): x = n ln 2 + r, |r| <= ln(2) / 2, e^r by its
 * Taylor polynomial to r^7 (relative error below 2e-7), 2^n by the exponent bits. */
static inline v8 vexp(v8 x) {
    const v8 lo = (v8){0} - 87.0f;
    v8i below = x < lo; /* select lo where below, x elsewhere, on the bits */
    v8i xb, lob;
    memcpy(&xb, &x, sizeof x);
    memcpy(&lob, &lo, sizeof lo);
    xb = (below & lob) | (~below & xb);
    memcpy(&x, &xb, sizeof x);
    v8 t = x * 1.44269504f - 0.5f; /* x <= 0: truncation toward zero rounds to nearest */
    v8i n = __builtin_convertvector(t, v8i);
    v8 nf = __builtin_convertvector(n, v8);
    v8 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    v8 p = (v8){0} + 1.98412698e-4f;
    p = p * r + 1.38888889e-3f;
    p = p * r + 8.33333333e-3f;
    p = p * r + 4.16666667e-2f;
    p = p * r + 1.66666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    v8i bits = (n + 127) << 23;
    v8 scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* One row of one head: q [d], keys/values at k/v + j * d (j < keys), the row sees keys
 * [0, prefix) and key prefix + c where own[c] (own NULL: c <= row); scores: room for keys + 8
 * floats; out [d]. */
static inline __attribute__((always_inline)) void
attend_row(const float *q, const float *k, const float *v, long keys, long prefix,
           const uint8_t *own, long row, const long d, float scale, float *scores, long *seen,
           float *out) {
    long n = 0;
    for (long j = 0; j < keys; ++j) {
        long c = j - prefix;
        if (c >= 0 && (own ? !own[c] : c > row)) continue;
        seen[n] = j;
        /* the score is the matmul's dot product of one row, the next key fetched meanwhile */
        const char *next = (const char *)(k + (j + 1 < keys ? j + 1 : j) * d);
        dots(q, k, j * d, next, 0.0f, scores + n, 1, d, 1, 0);
        scores[n++] *= scale;
    }
    if (n == 0) { /* a row that sees no key (SDPA gives NaN): zeros */
        memset(out, 0, d * sizeof(float));
        return;
    }
    float top = scores[0];
    for (long i = 1; i < n; ++i) top = scores[i] > top ? scores[i] : top;
    for (long i = n; i < n + 8; ++i) scores[i] = top;
    v8 total = {0};
    for (long i = 0; i < n; i += 8) {
        v8 p = vexp(load8(scores + i) - top);
        for (int lane = 0; lane < 8; ++lane)
            if (i + lane >= n) p[lane] = 0.0f;
        memcpy(scores + i, &p, sizeof p);
        total += p;
    }
    float sum = 0.0f;
    for (int lane = 0; lane < 8; ++lane) sum += total[lane];
    v8 acc[MAX_HEAD_DIM / 8] = {{0}};
    for (long i = 0; i < n; ++i) {
        const float *vj = v + seen[i] * d;
        v8 p = (v8){0} + scores[i];
        for (long b = 0; b < d / 8; ++b) acc[b] = madd(p, load8(vj + 8 * b), acc[b]);
    }
    for (long b = 0; b < d / 8; ++b) {
        v8 o = acc[b] / sum;
        memcpy(out + 8 * b, &o, sizeof o);
    }
}

/* q: row t, head h at q + t * q_stride + h * d; k, v: head g's key j at k + g * kv_stride +
 * j * d (keys j < keys); query head h reads key head h / (heads / kv_heads); own: [rows,
 * keys - prefix] uint8 or NULL (causal); out [rows, heads, d]. d must be a multiple of 8 up to
 * MAX_HEAD_DIM. Returns 0, or -1 when scratch memory could not be allocated. */
int skinny_attend(const float *q, const float *k, const float *v, const uint8_t *own,
                  float *out, long rows, long heads, long kv_heads, long d, long keys,
                  long prefix, long q_stride, long kv_stride, float scale) {
    int failed = 0;
    long group = heads / kv_heads, own_cols = keys - prefix;
#pragma omp parallel reduction(| : failed)
    {
        float *scores = malloc((keys + 8) * sizeof(float));
        long *seen = malloc(keys * sizeof(long));
        failed = scores == NULL || seen == NULL;
#pragma omp for schedule(static)
        for (long task = 0; task < rows * heads; ++task) {
            if (failed) continue;
            long t = task / heads, h = task % heads;
            const long g = h / group;
            const float *qh = q + t * q_stride + h * d;
            const uint8_t *mine = own ? own + t * own_cols : NULL;
            float *o = out + (t * heads + h) * d;
            /* the common head sizes with their loops unrolled: about 30% faster at 64 */
            if (d == 64)
                attend_row(qh, k + g * kv_stride, v + g * kv_stride, keys, prefix, mine, t, 64,
                           scale, scores, seen, o);
            else if (d == 128)
                attend_row(qh, k + g * kv_stride, v + g * kv_stride, keys, prefix, mine, t, 128,
                           scale, scores, seen, o);
            else
                attend_row(qh, k + g * kv_stride, v + g * kv_stride, keys, prefix, mine, t, d,
                           scale, scores, seen, o);
        }
        free(scores);
        free(seen);
    }
    return failed ? -1 : 0;
}
