/* AVX2 + FMA + F16C kernels (compiled with those flags for this file only; chosen at run time).
 *
 * Decode (gemv) of a C_4^n class: one byte of codes covers two groups (8 inputs). The row's next
 * 2k values (k = 4 - n kept per group) are loaded into the low lanes of a vector whose other lanes
 * are zero, and a 256-entry table turns the byte into a lane permutation that moves each value to
 * the position it was kept at and takes lane 7 (always zero, since 2k <= 6) everywhere else: the
 * row is expanded to dense 8 lanes in registers and multiplied with 8 contiguous inputs, without a
 * branch or a gather. Loads never cross the end of the values (masked or fixed-size copies).
 *
 * Prefill (gemm): a block of rows is decoded once into (column, weight) pairs; each pair is then a
 * broadcast FMA into 32 tokens of the channel-major activations, so pruned weights cost nothing. */
#include <math.h>

#include "engine.h"
#include "simd.h"

static int32_t g_perm[256][8];
static int g_ready;

static void init_tables(void) {
    if (g_ready) return;
    for (int b = 0; b < 256; b++) {
        int lane = 0;
        for (int j = 0; j < 8; j++) g_perm[b][j] = 7;
        for (int j = 0; j < 8; j++)
            if (b >> j & 1) g_perm[b][j] = lane++;
    }
    __atomic_store_n(&g_ready, 1, __ATOMIC_RELEASE);
}

/* first `lanes` dwords all-ones: maskload reads only those, so nothing past a row is touched */
static inline __m256i first_lanes(int lanes) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* `cnt` (<= 8) consecutive values of type dt at p, widened to fp32, zeros in the other lanes */
static inline f32x8 load_few(const uint8_t *p, int dt, int cnt) {
    if (dt == GG_F32) return _mm256_maskload_ps((const float *)p, first_lanes(cnt));
    if (dt == GG_F16) {
        uint16_t h[8] = {0};
        memcpy(h, p, 2 * (size_t)cnt);
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
    }
    int8_t q[8] = {0};
    memcpy(q, p, (size_t)cnt);
    return v_load_i8(q);
}

static inline float dense_row(const sb_class *c, int r, const float *x) {
    int len = c->len, j = 0;
    size_t ts = c->dtype == GG_F32 ? 4 : c->dtype == GG_F16 ? 2 : 1;
    const uint8_t *v = c->values + (size_t)r * len * ts;
    f32x8 a0 = v_zero(), a1 = v_zero(), a2 = v_zero(), a3 = v_zero();
    if (c->dtype == GG_F32) {
        const float *w = (const float *)v;
        for (; j + 32 <= len; j += 32) {
            a0 = v_fma(v_load(w + j), v_load(x + j), a0);
            a1 = v_fma(v_load(w + j + 8), v_load(x + j + 8), a1);
            a2 = v_fma(v_load(w + j + 16), v_load(x + j + 16), a2);
            a3 = v_fma(v_load(w + j + 24), v_load(x + j + 24), a3);
        }
        for (; j + 8 <= len; j += 8) a0 = v_fma(v_load(w + j), v_load(x + j), a0);
    } else if (c->dtype == GG_F16) {
        for (; j + 32 <= len; j += 32) {
            a0 = v_fma(v_load_f16(v + 2 * j), v_load(x + j), a0);
            a1 = v_fma(v_load_f16(v + 2 * j + 16), v_load(x + j + 8), a1);
            a2 = v_fma(v_load_f16(v + 2 * j + 32), v_load(x + j + 16), a2);
            a3 = v_fma(v_load_f16(v + 2 * j + 48), v_load(x + j + 24), a3);
        }
        for (; j + 8 <= len; j += 8) a0 = v_fma(v_load_f16(v + 2 * j), v_load(x + j), a0);
    } else {
        for (; j + 32 <= len; j += 32) {
            a0 = v_fma(v_load_i8(v + j), v_load(x + j), a0);
            a1 = v_fma(v_load_i8(v + j + 8), v_load(x + j + 8), a1);
            a2 = v_fma(v_load_i8(v + j + 16), v_load(x + j + 16), a2);
            a3 = v_fma(v_load_i8(v + j + 24), v_load(x + j + 24), a3);
        }
        for (; j + 8 <= len; j += 8) a0 = v_fma(v_load_i8(v + j), v_load(x + j), a0);
    }
    if (j < len) a1 = v_fma(load_few(v + j * ts, c->dtype, len - j), v_load(x + j), a1);
    float acc = v_hsum(v_add(v_add(a0, a1), v_add(a2, a3)));
    return c->scale ? acc * c->scale[r] : acc;
}

/* one sparse row, k kept per group; the compiler sees k as a constant in each caller below */
static inline float sparse_row(const sb_class *c, int r, const float *x, int k) {
    int G = c->G, dt = c->dtype;
    size_t ts = dt == GG_F32 ? 4 : dt == GG_F16 ? 2 : 1;
    const uint8_t *v = c->values + (size_t)r * c->len * ts, *code = c->codes + (size_t)r * c->cb;
    f32x8 a0 = v_zero(), a1 = v_zero();
    int g2 = 0;
    for (; g2 + 2 <= G / 2; g2 += 2) {
        f32x8 w0 = load_few(v, dt, 2 * k), w1 = load_few(v + 2 * k * ts, dt, 2 * k);
        w0 = _mm256_permutevar8x32_ps(w0, _mm256_loadu_si256((const __m256i *)g_perm[code[g2]]));
        w1 = _mm256_permutevar8x32_ps(w1, _mm256_loadu_si256((const __m256i *)g_perm[code[g2 + 1]]));
        a0 = v_fma(w0, v_load(x + 8 * g2), a0);
        a1 = v_fma(w1, v_load(x + 8 * g2 + 8), a1);
        v += 4 * k * ts;
    }
    for (; g2 < (G + 1) / 2; g2++) { /* the last pair, or a lone last group (high nibble 0) */
        int cnt = 2 * g2 + 1 < G ? 2 * k : k;
        f32x8 w = load_few(v, dt, cnt);
        w = _mm256_permutevar8x32_ps(w, _mm256_loadu_si256((const __m256i *)g_perm[code[g2]]));
        a0 = v_fma(w, v_load(x + 8 * g2), a0);
        v += cnt * ts;
    }
    float acc = v_hsum(v_add(a0, a1));
    return c->scale ? acc * c->scale[r] : acc;
}

static void gemv_avx2(const sb_class *c, const float *x, float *y, int r0, int r1) {
    init_tables();
#define ROWS(expr)                                                                                                 \
    for (int r = r0; r < r1; r++) y[c->idx ? c->idx[r] : r] += (expr)
    switch (c->codes ? 4 - c->n : 0) {
    case 1: ROWS(sparse_row(c, r, x, 1)); break;
    case 2: ROWS(sparse_row(c, r, x, 2)); break;
    case 3: ROWS(sparse_row(c, r, x, 3)); break;
    default: ROWS(dense_row(c, r, x)); break;
    }
#undef ROWS
}

/* decode rows [r0, r1) into (column, weight) pairs: cols/ws hold SB_GEMM_ROWS rows of 4G + 16 */
static int decode_rows(const sb_class *c, int r0, int r1, int32_t *cols, float *ws, int *count) {
    int stride = 4 * c->G + 16;
    for (int r = r0; r < r1; r++) {
        int32_t *col = cols + (size_t)(r - r0) * stride;
        float *w = ws + (size_t)(r - r0) * stride, s = c->scale ? c->scale[r] : 1.0f;
        int e = 0;
        if (!c->codes) {
            for (int j = 0; j < c->len; j++) col[j] = j, w[j] = sb_value(c, r, j) * s;
            e = c->len;
        } else {
            const uint8_t *code = c->codes + (size_t)r * c->cb;
            for (int g = 0; g < c->G; g++) {
                int mask = (code[g >> 1] >> ((g & 1) * 4)) & 15;
                for (int j = 0; j < 4; j++)
                    if (mask >> j & 1) {
                        col[e] = 4 * g + j;
                        w[e] = sb_value(c, r, e) * s;
                        e++;
                    }
            }
        }
        count[r - r0] = e;
    }
    return stride;
}

static void gemm_avx2(const sb_class *c, const float *X, int ldx, int T, float *Y, int ldy, int r0, int r1,
                      void *scratch) {
    int stride = 4 * c->G + 16, count[SB_GEMM_ROWS];
    int32_t *cols = (int32_t *)scratch;
    float *ws = (float *)(cols + (size_t)SB_GEMM_ROWS * stride);
    decode_rows(c, r0, r1, cols, ws, count);
    int Tp = (T + 7) / 8 * 8; /* ldx is a multiple of 8: the padding columns are scratch */
    int t0 = 0;
    for (; t0 + 32 <= Tp; t0 += 32) {
        for (int r = r0; r < r1; r++) {
            const int32_t *col = cols + (size_t)(r - r0) * stride;
            const float *w = ws + (size_t)(r - r0) * stride;
            f32x8 a0 = v_zero(), a1 = v_zero(), a2 = v_zero(), a3 = v_zero();
            for (int e = 0; e < count[r - r0]; e++) {
                f32x8 wv = v_set1(w[e]);
                const float *xp = X + (size_t)col[e] * ldx + t0;
                a0 = v_fma(wv, v_load(xp), a0);
                a1 = v_fma(wv, v_load(xp + 8), a1);
                a2 = v_fma(wv, v_load(xp + 16), a2);
                a3 = v_fma(wv, v_load(xp + 24), a3);
            }
            float *yp = Y + (size_t)(c->idx ? c->idx[r] : r) * ldy + t0;
            v_store(yp, v_add(v_load(yp), a0));
            v_store(yp + 8, v_add(v_load(yp + 8), a1));
            v_store(yp + 16, v_add(v_load(yp + 16), a2));
            v_store(yp + 24, v_add(v_load(yp + 24), a3));
        }
    }
    for (; t0 < Tp; t0 += 8) {
        for (int r = r0; r < r1; r++) {
            const int32_t *col = cols + (size_t)(r - r0) * stride;
            const float *w = ws + (size_t)(r - r0) * stride;
            f32x8 a0 = v_zero();
            for (int e = 0; e < count[r - r0]; e++) a0 = v_fma(v_set1(w[e]), v_load(X + (size_t)col[e] * ldx + t0), a0);
            float *yp = Y + (size_t)(c->idx ? c->idx[r] : r) * ldy + t0;
            v_store(yp, v_add(v_load(yp), a0));
        }
    }
}

static void scan_step_avx2(int N, const float *A, float dt, float dtx, const float *B, const float *C, float *s,
                           float *yc) {
    f32x8 acc = v_zero(), vdt = v_set1(dt), vdtx = v_set1(dtx);
    int n = 0;
    for (; n + 8 <= N; n += 8) {
        f32x8 h = v_fma(v_exp_neg(v_mul(vdt, v_load(A + n))), v_load(s + n), v_mul(vdtx, v_load(B + n)));
        v_store(s + n, h);
        acc = v_fma(h, v_load(C + n), acc);
    }
    float tail = 0.0f;
    for (; n < N; n++) {
        s[n] = expf(dt * A[n]) * s[n] + dtx * B[n];
        tail += s[n] * C[n];
    }
    *yc = v_hsum(acc) + tail;
}

const sb_kernels sb_kernels_avx2 = {"avx2", gemv_avx2, gemm_avx2, scan_step_avx2};
