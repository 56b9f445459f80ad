/* W y over the vocabulary for a W whose rows are GGUF Q8_0 blocks: W[j, 32b + k] = scale[j, b] * q[j, 32b + k]
 * with int8 q and float32 scale, exactly (bat_core/q8.py checks that before using this).
 *
 * It reads a quarter of the bytes of the float32 product. The sum is plain float32 arithmetic (products,
 * fused multiply-adds and additions in a fixed tree, no reassociation flags), so the rounding bound of
 * certify.py, which holds for any summation order, covers it. Built at set-up with fixed flags, AVX2 + FMA
 * or AVX-512F on top (bat_core/q8.py, VARIANTS); without AVX2 numpy's product is used. */
#include <math.h>
#include <stdint.h>
#include <immintrin.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "the Q8 product needs AVX2 and FMA; bat_core falls back to numpy"
#endif

#define BLOCK 32
#define PREFETCH_ROWS 16 /* rows read ahead: 2.4x faster from memory than without (16 and 64 measured the same) */

static float row_product(const int8_t *qj, const float *sj, const float *y, int64_t blocks) {
#if defined(__AVX512F__)
    __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const int8_t *qb = qj + b * BLOCK;
        const float *yb = y + b * BLOCK;
        __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)qb)));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qb + 16))));
        __m512 t = _mm512_fmadd_ps(hi, _mm512_loadu_ps(yb + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(yb)));
        if (b & 1)
            odd = _mm512_fmadd_ps(_mm512_set1_ps(sj[b]), t, odd);
        else
            even = _mm512_fmadd_ps(_mm512_set1_ps(sj[b]), t, even);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(even, odd));
#else
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const int8_t *qb = qj + b * BLOCK;
        const float *yb = y + b * BLOCK;
        __m128i lo = _mm_loadu_si128((const __m128i *)qb), hi = _mm_loadu_si128((const __m128i *)(qb + 16));
        __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
        __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
        __m256 f2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
        __m256 f3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
        __m256 t0 = _mm256_fmadd_ps(f2, _mm256_loadu_ps(yb + 16), _mm256_mul_ps(f0, _mm256_loadu_ps(yb)));
        __m256 t1 = _mm256_fmadd_ps(f3, _mm256_loadu_ps(yb + 24), _mm256_mul_ps(f1, _mm256_loadu_ps(yb + 8)));
        __m256 s = _mm256_set1_ps(sj[b]);
        acc0 = _mm256_fmadd_ps(s, t0, acc0);
        acc1 = _mm256_fmadd_ps(s, t1, acc1);
    }
    __m256 a = _mm256_add_ps(acc0, acc1);
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
#endif
}

/* ask for row j of the int8 values and its scales ahead of use */
static void prefetch_row(const int8_t *q, const float *scale, int64_t j, int64_t hidden, int64_t blocks) {
    const char *row = (const char *)(q + j * hidden);
    for (int64_t offset = 0; offset < hidden; offset += 64)
        _mm_prefetch(row + offset, _MM_HINT_T0);
    _mm_prefetch((const char *)(scale + j * blocks), _MM_HINT_T0);
}

/* out[j] = (W y)[j] for rows j in [start, stop); hidden must be a multiple of 32. */
void bat_q8_matvec(const int8_t *q, const float *scale, const float *y, float *out,
                   int64_t hidden, int64_t start, int64_t stop) {
    const int64_t blocks = hidden / BLOCK;
    for (int64_t j = start; j < stop; j++) {
        if (j + PREFETCH_ROWS < stop) /* the hardware prefetcher alone left this loop waiting on memory */
            prefetch_row(q, scale, j + PREFETCH_ROWS, hidden, blocks);
        out[j] = row_product(q + j * hidden, scale + j * blocks, y, blocks);
    }
}

/* a float64 dot product over n (a multiple of 32) terms, in four vector partial sums */
static double dot64(const double *a, const double *b, int64_t n) {
#if defined(__AVX512F__)
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd(), s2 = _mm512_setzero_pd(), s3 = _mm512_setzero_pd();
    for (int64_t k = 0; k < n; k += 32) {
        s0 = _mm512_fmadd_pd(_mm512_loadu_pd(a + k), _mm512_loadu_pd(b + k), s0);
        s1 = _mm512_fmadd_pd(_mm512_loadu_pd(a + k + 8), _mm512_loadu_pd(b + k + 8), s1);
        s2 = _mm512_fmadd_pd(_mm512_loadu_pd(a + k + 16), _mm512_loadu_pd(b + k + 16), s2);
        s3 = _mm512_fmadd_pd(_mm512_loadu_pd(a + k + 24), _mm512_loadu_pd(b + k + 24), s3);
    }
    return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(s0, s1), _mm512_add_pd(s2, s3)));
#else
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd(), s2 = _mm256_setzero_pd(), s3 = _mm256_setzero_pd();
    for (int64_t k = 0; k < n; k += 16) {
        s0 = _mm256_fmadd_pd(_mm256_loadu_pd(a + k), _mm256_loadu_pd(b + k), s0);
        s1 = _mm256_fmadd_pd(_mm256_loadu_pd(a + k + 4), _mm256_loadu_pd(b + k + 4), s1);
        s2 = _mm256_fmadd_pd(_mm256_loadu_pd(a + k + 8), _mm256_loadu_pd(b + k + 8), s2);
        s3 = _mm256_fmadd_pd(_mm256_loadu_pd(a + k + 12), _mm256_loadu_pd(b + k + 12), s3);
    }
    __m256d t = _mm256_add_pd(_mm256_add_pd(s0, s1), _mm256_add_pd(s2, s3));
    __m128d r = _mm_add_pd(_mm256_castpd256_pd128(t), _mm256_extractf128_pd(t, 1));
    return _mm_cvtsd_f64(_mm_add_sd(r, _mm_unpackhi_pd(r, r)));
#endif
}

/* out[i, c] = sum_k W[tokens[i], k] * yt[c, k] in float64 (yt: the certificates, one per row of length
 * hidden): the exact products of the head of a distribution, without gathering its rows as float64.
 * Each row is expanded to float64 exactly (a float32 scale times an int8), then each column is a dot
 * product (dot64). */
void bat_q8_rows_product(const int8_t *q, const float *scale, const int64_t *tokens, int64_t count,
                         const double *yt, int64_t columns, double *out, int64_t hidden) {
    enum { TILE = 4 }; /* rows expanded together: each certificate is read once per tile, from L1 after the first row */
    const int64_t blocks = hidden / BLOCK;
    double rows[TILE][hidden];
    for (int64_t first = 0; first < count; first += TILE) {
        const int64_t n = count - first < TILE ? count - first : TILE;
        /* the rows of a distribution's head lie anywhere in W: ask for those a few tiles ahead (2x faster from memory) */
        for (int64_t r = first + PREFETCH_ROWS; r < first + PREFETCH_ROWS + TILE && r < count; r++)
            prefetch_row(q, scale, tokens[r], hidden, blocks);
        for (int64_t r = 0; r < n; r++) {
            const int8_t *qj = q + tokens[first + r] * hidden;
            const float *sj = scale + tokens[first + r] * blocks;
            for (int64_t b = 0; b < blocks; b++)
                for (int k = 0; k < BLOCK; k++)
                    rows[r][b * BLOCK + k] = (double)sj[b] * (double)qj[b * BLOCK + k];
        }
        for (int64_t c = 0; c < columns; c++)
            for (int64_t r = 0; r < n; r++)
                out[(first + r) * columns + c] = dot64(rows[r], yt + c * hidden, hidden);
    }
}

/* The two sums over the vocabulary behind a certificate's value (certify.py, Step.full_value), in one
 * pass instead of a dozen numpy passes: with c_j = s_j u_j + y0 (s_j = 1 where scale is NULL),
 * err_j = g s_j norm[j] + 4 u64 |c_j|, hi = c + err and lo = c - err,
 *   sums[0] = sum_j weight[j] max(tprime hi, -lo)   (the cost of +y),
 *   sums[1] = sum_j weight[j] max(-tprime lo, hi)   (the cost of -y).
 * The same float64 operations as numpy's; the caller rounds the sums up. */
/* token j's terms of those sums, for its float32 product u */
static void add_value_terms(double u, int64_t j, const double *weight, const double *norm, const double *scale,
                            double y0, double g, double tprime, double *plus, double *minus) {
    const double slack = 4.0 * 0x1p-53;
    const double s = scale ? scale[j] : 1.0;
    const double c = s * u + y0;
    const double err = g * (s * norm[j]) + slack * (c < 0 ? -c : c);
    const double hi = c + err, lo = c - err;
    *plus += weight[j] * (tprime * hi > -lo ? tprime * hi : -lo);
    *minus += weight[j] * (-tprime * lo > hi ? -tprime * lo : hi);
}

void bat_tail_sums(const float *u, const double *weight, const double *norm, const double *scale, int64_t n,
                   double y0, double g, double tprime, double *sums) {
    double plus = 0.0, minus = 0.0;
    for (int64_t j = 0; j < n; j++)
        add_value_terms((double)u[j], j, weight, norm, scale, y0, g, tprime, &plus, &minus);
    sums[0] = plus;
    sums[1] = minus;
}

/* token j's interval [lo, hi] around c_j for certificate column k: from its exact float64 products where
 * slot[j] >= 0 (the head), else from the float32 product u as in add_value_terms */
static void token_interval(const float *u, int64_t j, int64_t k, int64_t m, const double *norm, const double *scale,
                           double y0, double g, const int32_t *slot, const double *c_exact, const double *err_exact,
                           double *lo, double *hi) {
    const double slack = 4.0 * 0x1p-53;
    double c, err;
    if (slot[j] >= 0) {
        c = c_exact[slot[j] * m + k];
        err = err_exact[slot[j] * m + k];
    } else {
        const double s = scale ? scale[j] : 1.0;
        c = s * (double)u[j] + y0;
        err = g * (s * norm[j]) + slack * (c < 0 ? -c : c);
    }
    *hi = c + err;
    *lo = c - err;
}

/* Lower bounds of every token's value under m certificates (certify.py, Step.all_values), in two passes
 * per certificate instead of two dozen numpy passes over [v, m] arrays. Certificate k: products u + k n,
 * offset y0[k], rounding factor g[k], scale of its value denominator[k] (max |y|). With r+_j = p_j
 * max(tprime hi_j, -lo_j), r-_j = p_j max(-tprime lo_j, hi_j) and T+-, their sums rounded up by sum_slack:
 *   out[k n + i] = max(p_i lo_i - (T+ - r+_i), -p_i hi_i - (T- - r-_i)) / (p_i denominator[k]),
 * -inf where that is not a finite number. */
void bat_token_values(const float *u, int64_t n, int64_t m, const double *p, const double *norm, const double *scale,
                      const double *y0, const double *g, double tprime, double sum_slack, const int32_t *slot,
                      const double *c_exact, const double *err_exact, const double *denominator, double *out) {
    for (int64_t k = 0; k < m; k++) {
        const float *uk = u + k * n;
        double plus = 0.0, minus = 0.0, lo, hi;
        for (int64_t j = 0; j < n; j++) {
            token_interval(uk, j, k, m, norm, scale, y0[k], g[k], slot, c_exact, err_exact, &lo, &hi);
            plus += p[j] * (tprime * hi > -lo ? tprime * hi : -lo);
            minus += p[j] * (-tprime * lo > hi ? -tprime * lo : hi);
        }
        plus *= sum_slack;
        minus *= sum_slack;
        for (int64_t i = 0; i < n; i++) {
            token_interval(uk, i, k, m, norm, scale, y0[k], g[k], slot, c_exact, err_exact, &lo, &hi);
            const double value_plus = p[i] * lo - (plus - p[i] * (tprime * hi > -lo ? tprime * hi : -lo));
            const double value_minus = p[i] * -hi - (minus - p[i] * (-tprime * lo > hi ? -tprime * lo : hi));
            const double best = value_plus != value_plus || value_minus != value_minus ? NAN
                                 : value_plus > value_minus                            ? value_plus
                                                                                       : value_minus;
            const double value = best / (p[i] * denominator[k]);
            out[k * n + i] = isfinite(value) ? value : -INFINITY;
        }
    }
}
