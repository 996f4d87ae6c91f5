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
#include "gemm_blocks.h"
#include "simd.h"

/* the kernels below are specialised by inlining (k and the loop shapes become constants) */
#define SB_INLINE __attribute__((always_inline))
/* Decode streams weights from memory: asking for the line PF bytes ahead keeps more misses in flight
 * than the hardware prefetcher alone does while the core is busy widening and multiplying */
#define PF 768
#define PREFETCH(p) _mm_prefetch((const char *)(p) + PF, _MM_HINT_T0)

/* For a code byte (two groups, 8 inputs): g_perm sends packed value lanes to input positions
 * (lane 7, always zero, where nothing was kept); g_pos lists the kept positions in order. */
static _Alignas(32) int32_t g_perm[256][8];
static _Alignas(32) int32_t g_pos[256][8];
static _Alignas(32) int32_t g_mask[256][8];
/* in-lane (vpermilps) indices: each 128-bit half (one group of 4 inputs) moves its kept inputs to
 * its front; cross-lane permutes are several uops on some x86 cores, in-lane ones are one */
static _Alignas(32) int32_t g_front[256][8];
static int g_ready;

static void init_tables(void) {
    if (__atomic_load_n(&g_ready, __ATOMIC_ACQUIRE)) return;
    for (int b = 0; b < 256; b++) {
        int lane = 0;
        for (int j = 0; j < 8; j++) g_perm[b][j] = 7, g_pos[b][j] = 0, g_mask[b][j] = 0;
        for (int j = 0; j < 8; j++)
            if (b >> j & 1) g_pos[b][lane] = j, g_mask[b][j] = -1, g_perm[b][j] = lane++;
        for (int h = 0; h < 2; h++) {
            int at = 0;
            for (int j = 0; j < 4; j++) g_front[b][4 * h + j] = 0;
            for (int j = 0; j < 4; j++)
                if (b >> (4 * h + j) & 1) g_front[b][4 * h + at++] = j;
        }
    }
    __atomic_store_n(&g_ready, 1, __ATOMIC_RELEASE);
}

/* first `lanes` dwords all-ones: maskload reads only those, so nothing past a row is touched */
static inline __m256i first_lanes(int lanes) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* `cnt` (<= 8) consecutive values of type dt at p, widened to fp32, zeros in the other lanes; no
 * byte past p + cnt is read (masked loads, or a narrow copy at the very end of the values) */
static inline SB_INLINE f32x8 load_few(const uint8_t *p, const uint8_t *end, int dt, int cnt) {
    if (dt == GG_F32) return _mm256_maskload_ps((const float *)p, first_lanes(cnt));
    if (dt == GG_F16) {
        if (!(cnt & 1)) /* an even count is cnt/2 whole dwords: a masked 128-bit load */
            return _mm256_cvtph_ps(_mm_maskload_epi32((const int *)p, _mm256_castsi256_si128(first_lanes(cnt / 2))));
        uint16_t h[8] = {0};
        memcpy(h, p, 2 * (size_t)cnt);
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
    }
    uint64_t u = 0;
    if (p + 8 <= end) {
        memcpy(&u, p, 8); /* one 8-byte load, the bytes past cnt masked off */
        if (cnt < 8) u &= (1ULL << (8 * cnt)) - 1;
    } else {
        memcpy(&u, p, (size_t)cnt);
    }
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128((long long)u)));
}

static inline SB_INLINE float dense_row(const sb_class *c, int r, const float *x) {
    int len = c->len, j = 0;
    size_t ts = c->dtype == GG_F32 ? 4 : c->dtype == GG_F16 ? 2 : 1;
    const uint8_t *v = c->values + (size_t)r * len * ts;
    f32x8 a0 = v_zero(), a1 = v_zero(), a2 = v_zero(), a3 = v_zero();
    if (c->dtype == GG_F32) {
        const float *w = (const float *)v;
        for (; j + 32 <= len; j += 32) {
            PREFETCH(w + j);
            PREFETCH(w + j + 16);
            a0 = v_fma(v_load(w + j), v_load(x + j), a0);
            a1 = v_fma(v_load(w + j + 8), v_load(x + j + 8), a1);
            a2 = v_fma(v_load(w + j + 16), v_load(x + j + 16), a2);
            a3 = v_fma(v_load(w + j + 24), v_load(x + j + 24), a3);
        }
        for (; j + 8 <= len; j += 8) a0 = v_fma(v_load(w + j), v_load(x + j), a0);
    } else if (c->dtype == GG_F16) {
        for (; j + 32 <= len; j += 32) {
            PREFETCH(v + 2 * j);
            a0 = v_fma(v_load_f16(v + 2 * j), v_load(x + j), a0);
            a1 = v_fma(v_load_f16(v + 2 * j + 16), v_load(x + j + 8), a1);
            a2 = v_fma(v_load_f16(v + 2 * j + 32), v_load(x + j + 16), a2);
            a3 = v_fma(v_load_f16(v + 2 * j + 48), v_load(x + j + 24), a3);
        }
        for (; j + 8 <= len; j += 8) a0 = v_fma(v_load_f16(v + 2 * j), v_load(x + j), a0);
    } else {
        for (; j + 32 <= len; j += 32) {
            PREFETCH(v + j);
            a0 = v_fma(v_load_i8(v + j), v_load(x + j), a0);
            a1 = v_fma(v_load_i8(v + j + 8), v_load(x + j + 8), a1);
            a2 = v_fma(v_load_i8(v + j + 16), v_load(x + j + 16), a2);
            a3 = v_fma(v_load_i8(v + j + 24), v_load(x + j + 24), a3);
        }
        for (; j + 8 <= len; j += 8) a0 = v_fma(v_load_i8(v + j), v_load(x + j), a0);
    }
    if (j < len) a1 = v_fma(load_few(v + j * ts, c->vend, c->dtype, len - j), v_load(x + j), a1);
    float acc = v_hsum(v_add(v_add(a0, a1), v_add(a2, a3)));
    return c->scale ? acc * c->scale[r] : acc;
}

/* 8 values at p widened to fp32 with a plain (unaligned) load; the lanes past the ones used hold
 * the next values, which the caller masks off. Near the end of the values, the careful load. */
static inline SB_INLINE f32x8 load8(const uint8_t *p, const uint8_t *end, int dt, int cnt) {
    size_t ts = dt == GG_F32 ? 4 : dt == GG_F16 ? 2 : 1;
    if (p + 8 * ts > end) return load_few(p, end, dt, cnt);
    return dt == GG_F32 ? v_load((const float *)p) : dt == GG_F16 ? v_load_f16(p) : v_load_i8(p);
}

/* a code byte's 2k values placed at their input positions, zeros elsewhere */
static inline SB_INLINE f32x8 expand(f32x8 w, uint8_t code) {
    w = _mm256_permutevar8x32_ps(w, _mm256_load_si256((const __m256i *)g_perm[code]));
    return _mm256_and_ps(w, _mm256_castsi256_ps(_mm256_load_si256((const __m256i *)g_mask[code])));
}

static inline SB_INLINE f32x8 front(f32x8 x, uint8_t code) {
    return _mm256_permutevar_ps(x, _mm256_load_si256((const __m256i *)g_front[code]));
}

/* 8 consecutive values in the lane order of the gathered inputs: k = 1 takes groups 0 2 4 6 | 1 3 5 7,
 * k = 2 takes values 0 1 4 5 | 2 3 6 7 */
static inline SB_INLINE f32x8 load8_order(const uint8_t *p, const uint8_t *end, int dt, int k) {
    size_t ts = dt == GG_F32 ? 4 : dt == GG_F16 ? 2 : 1;
    uint8_t tmp[32];
    if (__builtin_expect(p + 8 * ts > end, 0)) { /* the very end of the values: a careful copy */
        memset(tmp, 0, sizeof tmp);
        memcpy(tmp, p, 8 * ts);
        p = tmp;
    }
    if (dt == GG_F32) {
        f32x8 w = v_load((const float *)p);
        return _mm256_permutevar8x32_ps(w, k == 1 ? _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7)
                                                  : _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7));
    }
    __m128i b = dt == GG_F16 ? _mm_loadu_si128((const __m128i *)p) : _mm_loadl_epi64((const __m128i *)p);
    __m128i sh = dt == GG_F16 ? (k == 1 ? _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15)
                                        : _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15))
                              : (k == 1 ? _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15)
                                        : _mm_setr_epi8(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    b = _mm_shuffle_epi8(b, sh);
    return dt == GG_F16 ? _mm256_cvtph_ps(b) : _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

/* one sparse row, k kept per group; the compiler sees k as a constant in each caller below */
static inline SB_INLINE float sparse_row(const sb_class *c, int r, const float *x, int k) {
    int G = c->G, dt = c->dtype;
    size_t ts = dt == GG_F32 ? 4 : dt == GG_F16 ? 2 : 1;
    const uint8_t *v = c->values + (size_t)r * c->len * ts, *code = c->codes + (size_t)r * c->cb, *end = c->vend;
    f32x8 a0 = v_zero(), a1 = v_zero();
    int g2 = 0;
    /* Gather the kept inputs into the packed values' order instead of spreading values out: each
     * group's kept inputs go to the front of its 128-bit half (in-lane), halves are interleaved so
     * 8 lanes match 8 consecutive values (reordered by a fixed in-lane byte shuffle), and no lane
     * is spent on a zero. (At k = 3, 6 values per byte do not tile 8 lanes; spreading is faster.) */
    if (k == 1) {
        for (; g2 + 4 <= G / 2; g2 += 4) {
            const float *xp = x + 8 * g2;
            PREFETCH(v);
            f32x8 c0 = front(v_load(xp), code[g2]), c1 = front(v_load(xp + 8), code[g2 + 1]);
            f32x8 c2 = front(v_load(xp + 16), code[g2 + 2]), c3 = front(v_load(xp + 24), code[g2 + 3]);
            /* lanes: groups 0 2 4 6 | 1 3 5 7 */
            f32x8 r = _mm256_shuffle_ps(_mm256_unpacklo_ps(c0, c1), _mm256_unpacklo_ps(c2, c3), 0x44);
            a0 = v_fma(load8_order(v, end, dt, 1), r, a0);
            v += 8 * ts;
        }
    } else if (k == 2) {
        for (; g2 + 4 <= G / 2; g2 += 4) { /* two independent chains */
            PREFETCH(v);
            /* lanes: group 0 (2), group 2 (2) | group 1 (2), group 3 (2) */
            f32x8 r0 = _mm256_shuffle_ps(front(v_load(x + 8 * g2), code[g2]), front(v_load(x + 8 * g2 + 8), code[g2 + 1]), 0x44);
            f32x8 r1 = _mm256_shuffle_ps(front(v_load(x + 8 * g2 + 16), code[g2 + 2]), front(v_load(x + 8 * g2 + 24), code[g2 + 3]), 0x44);
            a0 = v_fma(load8_order(v, end, dt, 2), r0, a0);
            a1 = v_fma(load8_order(v + 8 * ts, end, dt, 2), r1, a1);
            v += 16 * ts;
        }
    }
    /* k = 3 (and the tails): spread each byte's values to their input positions */
    for (; g2 + 2 <= G / 2; g2 += 2) {
        PREFETCH(v);
        f32x8 w0 = expand(load8(v, end, dt, 2 * k), code[g2]);
        f32x8 w1 = expand(load8(v + 2 * k * ts, end, dt, 2 * k), code[g2 + 1]);
        a0 = v_fma(w0, v_load(x + 8 * g2), a0);
        a1 = v_fma(w1, v_load(x + 8 * g2 + 8), a1);
        v += 4 * k * ts;
    }
    for (; g2 < (G + 1) / 2; g2++) { /* the last pair, or a lone last group (high nibble 0) */
        int cnt = 2 * g2 + 1 < G ? 2 * k : k;
        a0 = v_fma(expand(load_few(v, end, dt, cnt), code[g2]), v_load(x + 8 * g2), a0);
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

/* decode rows [r0, r1) into (column, weight) pairs: cols/ws hold SB_GEMM_ROWS rows of 4G + 16.
 * Vectorised: weights widen 8 at a time, columns come 2 groups at a time from g_pos; stores may
 * run up to 8 entries past a row's end, into its slack. */
static void decode_rows(const sb_class *c, int r0, int r1, int32_t *cols, float *ws, int *count) {
    int stride = 4 * c->G + 16, len = c->len, dt = c->dtype;
    size_t ts = dt == GG_F32 ? 4 : dt == GG_F16 ? 2 : 1;
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int r = r0; r < r1; r++) {
        int32_t *col = cols + (size_t)(r - r0) * stride;
        float *w = ws + (size_t)(r - r0) * stride;
        const uint8_t *v = c->values + (size_t)r * len * ts;
        f32x8 s = v_set1(c->scale ? c->scale[r] : 1.0f);
        int j = 0;
        for (; j + 8 <= len; j += 8) {
            f32x8 x = dt == GG_F32 ? v_load((const float *)v + j) : dt == GG_F16 ? v_load_f16(v + 2 * j) : v_load_i8(v + j);
            v_store(w + j, v_mul(x, s));
        }
        if (j < len) v_store(w + j, v_mul(load_few(v + j * ts, c->vend, dt, len - j), s));
        if (!c->codes) {
            for (int e = 0; e < len; e += 8)
                _mm256_storeu_si256((__m256i *)(col + e), _mm256_add_epi32(iota, _mm256_set1_epi32(e)));
        } else {
            const uint8_t *code = c->codes + (size_t)r * c->cb;
            int e = 0;
            for (int g2 = 0; g2 < c->cb; g2++) {
                __m256i pos = _mm256_loadu_si256((const __m256i *)g_pos[code[g2]]);
                _mm256_storeu_si256((__m256i *)(col + e), _mm256_add_epi32(pos, _mm256_set1_epi32(8 * g2)));
                e += __builtin_popcount(code[g2]);
            }
        }
        count[r - r0] = len;
    }
}

/* Y tile (64 tokens) of one row += its entries [e0, e1) against X rows col[e] */
static inline void tile64(const int32_t *col, const float *w, int e0, int e1, const float *X, int ldx, float *yp) {
    f32x8 a0 = v_load(yp), a1 = v_load(yp + 8), a2 = v_load(yp + 16), a3 = v_load(yp + 24);
    f32x8 a4 = v_load(yp + 32), a5 = v_load(yp + 40), a6 = v_load(yp + 48), a7 = v_load(yp + 56);
    for (int e = e0; e < e1; e++) {
        f32x8 wv = v_set1(w[e]);
        const float *xp = X + (size_t)col[e] * ldx;
        a0 = v_fma(wv, v_load(xp), a0);
        a1 = v_fma(wv, v_load(xp + 8), a1);
        a2 = v_fma(wv, v_load(xp + 16), a2);
        a3 = v_fma(wv, v_load(xp + 24), a3);
        a4 = v_fma(wv, v_load(xp + 32), a4);
        a5 = v_fma(wv, v_load(xp + 40), a5);
        a6 = v_fma(wv, v_load(xp + 48), a6);
        a7 = v_fma(wv, v_load(xp + 56), a7);
    }
    v_store(yp, a0), v_store(yp + 8, a1), v_store(yp + 16, a2), v_store(yp + 24, a3);
    v_store(yp + 32, a4), v_store(yp + 40, a5), v_store(yp + 48, a6), v_store(yp + 56, a7);
}

static inline void tile8(const int32_t *col, const float *w, int e0, int e1, const float *X, int ldx, float *yp) {
    f32x8 a0 = v_load(yp), a1 = v_zero();
    int e = e0;
    for (; e + 2 <= e1; e += 2) {
        a0 = v_fma(v_set1(w[e]), v_load(X + (size_t)col[e] * ldx), a0);
        a1 = v_fma(v_set1(w[e + 1]), v_load(X + (size_t)col[e + 1] * ldx), a1);
    }
    if (e < e1) a0 = v_fma(v_set1(w[e]), v_load(X + (size_t)col[e] * ldx), a0);
    v_store(yp, v_add(a0, a1));
}

static void gemm_avx2(const sb_class *c, const float *X, int ldx, int T, float *Y, int ldy, int r0, int r1,
                      void *scratch) {
    int stride = 4 * c->G + 16, count[SB_GEMM_ROWS];
    int32_t *cols = (int32_t *)scratch;
    float *ws = (float *)(cols + (size_t)SB_GEMM_ROWS * stride);
    init_tables();
    decode_rows(c, r0, r1, cols, ws, count);
    sb_gemm_blocks(c, X, ldx, T, Y, ldy, r0, r1, cols, ws, count, stride, 64, tile64, tile8);
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

static void silu_avx2(float *x, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        f32x8 v = v_load(x + i);
        v_store(x + i, _mm256_div_ps(v, v_add(v_set1(1.0f), v_exp(_mm256_sub_ps(v_zero(), v)))));
    }
    for (; i < n; i++) x[i] = x[i] / (1.0f + expf(-x[i]));
}

static void softplus_avx2(float *x, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        /* log1p(u) = log(w) * u / (w - 1) with w = 1 + u: exact to float rounding even when u is tiny */
        f32x8 v = v_load(x + i), u = v_exp(v), w = v_add(v_set1(1.0f), u), wm1 = _mm256_sub_ps(w, v_set1(1.0f));
        f32x8 r = _mm256_div_ps(v_mul(v_log(w), u), wm1);
        r = _mm256_blendv_ps(r, u, _mm256_cmp_ps(wm1, v_zero(), _CMP_EQ_OQ));
        v_store(x + i, _mm256_blendv_ps(r, v, _mm256_cmp_ps(v, v_set1(20.0f), _CMP_GT_OQ)));
    }
    for (; i < n; i++) x[i] = x[i] > 20.0f ? x[i] : log1pf(expf(x[i]));
}

static void mul_silu_avx2(float *y, const float *z, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        f32x8 v = v_load(z + i);
        f32x8 sv = _mm256_div_ps(v, v_add(v_set1(1.0f), v_exp(_mm256_sub_ps(v_zero(), v))));
        v_store(y + i, v_mul(v_load(y + i), sv));
    }
    for (; i < n; i++) y[i] *= z[i] / (1.0f + expf(-z[i]));
}

static float read_sum_avx2(const float *x, size_t n) {
    f32x8 a[8];
    for (int l = 0; l < 8; l++) a[l] = v_zero();
    for (size_t i = 0; i < n; i += 64)
        for (int l = 0; l < 8; l++) a[l] = v_add(a[l], v_load(x + i + 8 * l));
    for (int l = 1; l < 8; l++) a[0] = v_add(a[0], a[l]);
    return v_hsum(a[0]);
}

const sb_kernels sb_kernels_avx2 = {"avx2",    gemv_avx2,     gemm_avx2,     scan_step_avx2,
                                    silu_avx2, softplus_avx2, mul_silu_avx2, read_sum_avx2};
