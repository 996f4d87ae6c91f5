/* NEON kernels for AArch64 (Advanced SIMD is part of every ARMv8-A core, so nothing is probed at run
 * time). The same contract as kernels_ref.c, which stays the definition; 4 fp32 lanes.
 *
 * Decode (gemv) of a C_4^n class: one byte of codes covers two groups (8 inputs) and 2k packed
 * values (k = 4 - n kept per group). Eight values from the row are widened to two fp32 vectors, and
 * a 16-entry table of byte indices per nibble lets `vqtbl2q_u8` move each kept value to the lane of
 * the input it multiplies (index 0x80, out of the table, reads 0 everywhere else): each group becomes
 * a dense 4-lane row, FMA'd with 4 contiguous inputs, with no branch or gather. fp16 values widen
 * with `vcvt_f32_f16` (ARMv8.0, exact); int8 widens through s16 / s32. Loads never cross the end of
 * the values (`c->vend`): near it a careful copy of exactly the bytes needed.
 *
 * Prefill (gemm): as in the AVX2 family, a block of rows is decoded once into (column, weight)
 * pairs; each pair is then a broadcast FMA into 32 tokens of the channel-major activations. */
#include <arm_neon.h>
#include <math.h>
#include <string.h>

#include "engine.h"
#include "gemm_blocks.h"

/* the kernels below are specialised by inlining (k and the dtype become constants) */
#define SB_INLINE inline __attribute__((always_inline))

typedef float32x4_t f32x4;

/* g_idx[nibble]: for each input lane j of a group, the bytes of the packed value it takes (lane l
 * of the widened values: bytes 4l..4l+3), or 0x80 where input j was removed. The second group of a
 * code byte reads its values k lanes further on: the same table plus 4k (0x80 + 4k stays out of the
 * 32-byte table, so removed inputs still read 0). */
static _Alignas(16) uint8_t g_idx[16][16];
static int g_ready;

static void init_tables(void) {
    if (__atomic_load_n(&g_ready, __ATOMIC_ACQUIRE)) return;
    sb_nibble_index(&g_idx[0][0], 4);
    __atomic_store_n(&g_ready, 1, __ATOMIC_RELEASE);
}

static SB_INLINE size_t tsize(int dt) { return dt == GG_F32 ? 4 : dt == GG_F16 ? 2 : 1; }

/* 4 consecutive values of type dt at p, widened to fp32 (reads exactly 4 values) */
static SB_INLINE f32x4 load4(const uint8_t *p, int dt) {
    if (dt == GG_F32) return vld1q_f32((const float *)p);
    if (dt == GG_F16) return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)p)));
    uint32_t u;
    memcpy(&u, p, 4);
    int16x8_t s = vmovl_s8(vreinterpret_s8_u32(vdup_n_u32(u)));
    return vcvtq_f32_s32(vmovl_s16(vget_low_s16(s)));
}

/* 8 consecutive values widened into lo (values 0..3) and hi (4..7); only the first cnt are used.
 * A plain load reads on into the next row; within 8 values of the end, a copy of cnt values. */
static SB_INLINE void load8(const uint8_t *p, const uint8_t *end, int dt, int cnt, f32x4 *lo, f32x4 *hi) {
    size_t ts = tsize(dt);
    uint8_t tmp[32];
    if (__builtin_expect(p + 8 * ts > end, 0)) {
        memset(tmp, 0, sizeof tmp);
        memcpy(tmp, p, (size_t)cnt * ts);
        p = tmp;
    }
    if (dt == GG_F32) {
        *lo = vld1q_f32((const float *)p);
        *hi = vld1q_f32((const float *)p + 4);
    } else if (dt == GG_F16) {
        float16x8_t h = vreinterpretq_f16_u16(vld1q_u16((const uint16_t *)p));
        *lo = vcvt_f32_f16(vget_low_f16(h));
        *hi = vcvt_high_f32_f16(h);
    } else {
        int16x8_t s = vmovl_s8(vld1_s8((const int8_t *)p));
        *lo = vcvtq_f32_s32(vmovl_s16(vget_low_s16(s)));
        *hi = vcvtq_f32_s32(vmovl_high_s16(s));
    }
}

/* cnt < 4 values at p (the end of a row, maybe of the tensor), zeros in the other lanes */
static SB_INLINE f32x4 load_few(const uint8_t *p, int dt, int cnt) {
    uint8_t tmp[16] = {0};
    memcpy(tmp, p, (size_t)cnt * tsize(dt));
    return load4(tmp, dt);
}

static SB_INLINE float dense_row(const sb_class *c, int r, const float *x, int dt) {
    int len = c->len, j = 0;
    size_t ts = tsize(dt);
    const uint8_t *v = c->values + (size_t)r * len * ts;
    f32x4 a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0;
    for (; j + 16 <= len; j += 16) {
        a0 = vfmaq_f32(a0, load4(v + j * ts, dt), vld1q_f32(x + j));
        a1 = vfmaq_f32(a1, load4(v + (j + 4) * ts, dt), vld1q_f32(x + j + 4));
        a2 = vfmaq_f32(a2, load4(v + (j + 8) * ts, dt), vld1q_f32(x + j + 8));
        a3 = vfmaq_f32(a3, load4(v + (j + 12) * ts, dt), vld1q_f32(x + j + 12));
    }
    for (; j + 4 <= len; j += 4) a0 = vfmaq_f32(a0, load4(v + j * ts, dt), vld1q_f32(x + j));
    if (j < len) a1 = vfmaq_f32(a1, load_few(v + j * ts, dt, len - j), vld1q_f32(x + j));
    float acc = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
    return c->scale ? acc * c->scale[r] : acc;
}

/* one sparse row, k kept per group of 4 */
static SB_INLINE float sparse_row(const sb_class *c, int r, const float *x, int k, int dt) {
    int G = c->G;
    size_t ts = tsize(dt);
    const uint8_t *v = c->values + (size_t)r * c->len * ts, *code = c->codes + (size_t)r * c->cb, *end = c->vend;
    const uint8x16_t off = vdupq_n_u8((uint8_t)(4 * k));
    f32x4 a0 = vdupq_n_f32(0.0f), a1 = a0;
    for (int g2 = 0; g2 < c->cb; g2++) {
        int two = 2 * g2 + 1 < G; /* a lone last group: its byte's high nibble is not a group */
        int cnt = two ? 2 * k : k;
        f32x4 lo, hi;
        load8(v, end, dt, cnt, &lo, &hi);
        uint8x16x2_t t = {{vreinterpretq_u8_f32(lo), vreinterpretq_u8_f32(hi)}};
        uint8x16_t i0 = vld1q_u8(g_idx[code[g2] & 15]);
        uint8x16_t i1 = vaddq_u8(vld1q_u8(g_idx[two ? code[g2] >> 4 : 0]), off);
        a0 = vfmaq_f32(a0, vreinterpretq_f32_u8(vqtbl2q_u8(t, i0)), vld1q_f32(x + 8 * g2));
        a1 = vfmaq_f32(a1, vreinterpretq_f32_u8(vqtbl2q_u8(t, i1)), vld1q_f32(x + 8 * g2 + 4));
        v += (size_t)cnt * ts;
    }
    float acc = vaddvq_f32(vaddq_f32(a0, a1));
    return c->scale ? acc * c->scale[r] : acc;
}

static void gemv_neon(const sb_class *c, const float *x, float *y, int r0, int r1) {
    init_tables();
#define ROWS(expr)                                                                                                 \
    for (int r = r0; r < r1; r++) y[c->idx ? c->idx[r] : r] += (expr)
#define BY_DTYPE(row, ...)                                                                                         \
    switch (c->dtype) {                                                                                            \
    case GG_F32: ROWS(row(__VA_ARGS__, GG_F32)); break;                                                            \
    case GG_F16: ROWS(row(__VA_ARGS__, GG_F16)); break;                                                            \
    default: ROWS(row(__VA_ARGS__, GG_I8)); break;                                                                 \
    }
    switch (c->codes ? 4 - c->n : 0) {
    case 1: BY_DTYPE(sparse_row, c, r, x, 1); break;
    case 2: BY_DTYPE(sparse_row, c, r, x, 2); break;
    case 3: BY_DTYPE(sparse_row, c, r, x, 3); break;
    default: BY_DTYPE(dense_row, c, r, x); break;
    }
#undef BY_DTYPE
#undef ROWS
}

/* decode rows [r0, r1) into (column, weight) pairs, scale applied: cols/ws hold SB_GEMM_ROWS rows of
 * 4G + 16 entries */
static void decode_rows(const sb_class *c, int r0, int r1, int32_t *cols, float *ws, int *count) {
    int stride = 4 * c->G + 16, len = c->len, dt = c->dtype;
    size_t ts = tsize(dt);
    for (int r = r0; r < r1; r++) {
        int32_t *col = cols + (size_t)(r - r0) * stride;
        float *w = ws + (size_t)(r - r0) * stride;
        const uint8_t *v = c->values + (size_t)r * len * ts;
        float s = c->scale ? c->scale[r] : 1.0f;
        int j = 0;
        for (; j + 4 <= len; j += 4) vst1q_f32(w + j, vmulq_n_f32(load4(v + j * ts, dt), s));
        if (j < len) vst1q_f32(w + j, vmulq_n_f32(load_few(v + j * ts, dt, len - j), s)); /* into the slack */
        if (!c->codes) {
            for (int e = 0; e < len; e++) col[e] = e;
        } else {
            const uint8_t *code = c->codes + (size_t)r * c->cb;
            int e = 0;
            for (int g = 0; g < c->G; g++) {
                int mask = (code[g >> 1] >> ((g & 1) * 4)) & 15;
                for (int b = 0; b < 4; b++)
                    if (mask >> b & 1) col[e++] = 4 * g + b;
            }
        }
        count[r - r0] = len;
    }
}

/* Y tile (32 tokens) of one row += its entries [e0, e1) against X rows col[e] */
static inline void tile32(const int32_t *col, const float *w, int e0, int e1, const float *X, int ldx, float *yp) {
    f32x4 a0 = vld1q_f32(yp), a1 = vld1q_f32(yp + 4), a2 = vld1q_f32(yp + 8), a3 = vld1q_f32(yp + 12);
    f32x4 a4 = vld1q_f32(yp + 16), a5 = vld1q_f32(yp + 20), a6 = vld1q_f32(yp + 24), a7 = vld1q_f32(yp + 28);
    for (int e = e0; e < e1; e++) {
        float wv = w[e];
        const float *xp = X + (size_t)col[e] * ldx;
        a0 = vfmaq_n_f32(a0, vld1q_f32(xp), wv);
        a1 = vfmaq_n_f32(a1, vld1q_f32(xp + 4), wv);
        a2 = vfmaq_n_f32(a2, vld1q_f32(xp + 8), wv);
        a3 = vfmaq_n_f32(a3, vld1q_f32(xp + 12), wv);
        a4 = vfmaq_n_f32(a4, vld1q_f32(xp + 16), wv);
        a5 = vfmaq_n_f32(a5, vld1q_f32(xp + 20), wv);
        a6 = vfmaq_n_f32(a6, vld1q_f32(xp + 24), wv);
        a7 = vfmaq_n_f32(a7, vld1q_f32(xp + 28), wv);
    }
    vst1q_f32(yp, a0), vst1q_f32(yp + 4, a1), vst1q_f32(yp + 8, a2), vst1q_f32(yp + 12, a3);
    vst1q_f32(yp + 16, a4), vst1q_f32(yp + 20, a5), vst1q_f32(yp + 24, a6), vst1q_f32(yp + 28, a7);
}

static inline void tile8(const int32_t *col, const float *w, int e0, int e1, const float *X, int ldx, float *yp) {
    f32x4 a0 = vld1q_f32(yp), a1 = vld1q_f32(yp + 4);
    for (int e = e0; e < e1; e++) {
        const float *xp = X + (size_t)col[e] * ldx;
        a0 = vfmaq_n_f32(a0, vld1q_f32(xp), w[e]);
        a1 = vfmaq_n_f32(a1, vld1q_f32(xp + 4), w[e]);
    }
    vst1q_f32(yp, a0), vst1q_f32(yp + 4, a1);
}

static void gemm_neon(const sb_class *c, const float *X, int ldx, int T, float *Y, int ldy, int r0, int r1,
                      void *scratch) {
    int stride = 4 * c->G + 16, count[SB_GEMM_ROWS];
    int32_t *cols = (int32_t *)scratch;
    float *ws = (float *)(cols + (size_t)SB_GEMM_ROWS * stride);
    decode_rows(c, r0, r1, cols, ws, count);
    sb_gemm_blocks(c, X, ldx, T, Y, ldy, r0, r1, cols, ws, count, stride, 32, tile32, tile8);
}

/* ---------------------------------------------------------------- exp, log (as simd.h's) */

/* expf for x <= 0: x = k·ln2 + r, a degree-6 polynomial for e^r, 2^k built in the exponent bits.
 * Relative error about 2e-7; below -87 the result flushes to 0. */
static inline f32x4 v_exp_neg(f32x4 x) {
    const f32x4 lo = vdupq_n_f32(-87.0f);
    uint32x4_t under = vcltq_f32(x, lo);
    x = vmaxq_f32(x, lo);
    f32x4 k = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
    f32x4 r = vfmaq_n_f32(x, k, -0.693359375f); /* ln2 split in two for an exact reduction */
    r = vfmaq_n_f32(r, k, 2.12194440e-4f);
    f32x4 p = vdupq_n_f32(1.9875691500e-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
    p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
    int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(k), vdupq_n_s32(127)), 23);
    f32x4 res = vmulq_f32(p, vreinterpretq_f32_s32(e));
    return vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(res), under));
}

/* expf on the float range silu / softplus need (clamped to [-87, 88]) */
static inline f32x4 v_exp(f32x4 x) { return v_exp_neg(vminq_f32(x, vdupq_n_f32(88.0f))); }

/* natural log for x > 0 (Cephes logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)), a degree-9
 * polynomial in m - 1); relative error about 1e-7 */
static inline f32x4 v_log(f32x4 x) {
    uint32x4_t xi = vreinterpretq_u32_f32(x);
    f32x4 e = vcvtq_f32_s32(vsubq_s32(vreinterpretq_s32_u32(vshrq_n_u32(xi, 23)), vdupq_n_s32(126)));
    f32x4 m = vreinterpretq_f32_u32(vorrq_u32(vandq_u32(xi, vdupq_n_u32(0x007fffff)), vdupq_n_u32(0x3f000000)));
    uint32x4_t small = vcltq_f32(m, vdupq_n_f32(0.707106781186547524f));
    e = vsubq_f32(e, vreinterpretq_f32_u32(vandq_u32(small, vreinterpretq_u32_f32(vdupq_n_f32(1.0f)))));
    m = vsubq_f32(vaddq_f32(m, vreinterpretq_f32_u32(vandq_u32(small, vreinterpretq_u32_f32(m)))), vdupq_n_f32(1.0f));
    f32x4 z = vmulq_f32(m, m), p = vdupq_n_f32(7.0376836292e-2f);
    p = vfmaq_f32(vdupq_n_f32(-1.1514610310e-1f), p, m);
    p = vfmaq_f32(vdupq_n_f32(1.1676998740e-1f), p, m);
    p = vfmaq_f32(vdupq_n_f32(-1.2420140846e-1f), p, m);
    p = vfmaq_f32(vdupq_n_f32(1.4249322787e-1f), p, m);
    p = vfmaq_f32(vdupq_n_f32(-1.6668057665e-1f), p, m);
    p = vfmaq_f32(vdupq_n_f32(2.0000714765e-1f), p, m);
    p = vfmaq_f32(vdupq_n_f32(-2.4999993993e-1f), p, m);
    p = vfmaq_f32(vdupq_n_f32(3.3333331174e-1f), p, m);
    f32x4 y = vmulq_f32(vmulq_f32(p, m), z);
    y = vfmaq_n_f32(y, e, -2.12194440e-4f);
    y = vfmaq_n_f32(y, z, -0.5f);
    return vaddq_f32(vaddq_f32(m, y), vmulq_n_f32(e, 0.693359375f));
}

static inline f32x4 v_silu(f32x4 v) { return vdivq_f32(v, vaddq_f32(vdupq_n_f32(1.0f), v_exp(vnegq_f32(v)))); }

/* ---------------------------------------------------------------- per-channel ops */

static void scan_step_neon(int N, const float *A, float dt, float dtx, const float *B, const float *C, float *s,
                           float *yc) {
    f32x4 acc = vdupq_n_f32(0.0f);
    int n = 0;
    for (; n + 4 <= N; n += 4) {
        f32x4 h = vfmaq_f32(vmulq_n_f32(vld1q_f32(B + n), dtx), v_exp_neg(vmulq_n_f32(vld1q_f32(A + n), dt)),
                            vld1q_f32(s + n));
        vst1q_f32(s + n, h);
        acc = vfmaq_f32(acc, h, vld1q_f32(C + n));
    }
    float tail = 0.0f;
    for (; n < N; n++) {
        s[n] = expf(dt * A[n]) * s[n] + dtx * B[n];
        tail += s[n] * C[n];
    }
    *yc = vaddvq_f32(acc) + tail;
}

static void silu_neon(float *x, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(x + i, v_silu(vld1q_f32(x + i)));
    for (; i < n; i++) x[i] = x[i] / (1.0f + expf(-x[i]));
}

static void softplus_neon(float *x, int n) {
    int i = 0;
    const f32x4 one = vdupq_n_f32(1.0f);
    for (; i + 4 <= n; i += 4) {
        /* log1p(u) = log(w) * u / (w - 1) with w = 1 + u: exact to float rounding even when u is tiny */
        f32x4 v = vld1q_f32(x + i), u = v_exp(v), w = vaddq_f32(one, u), wm1 = vsubq_f32(w, one);
        f32x4 r = vdivq_f32(vmulq_f32(v_log(w), u), wm1);
        r = vbslq_f32(vceqzq_f32(wm1), u, r);
        vst1q_f32(x + i, vbslq_f32(vcgtq_f32(v, vdupq_n_f32(20.0f)), v, r));
    }
    for (; i < n; i++) x[i] = x[i] > 20.0f ? x[i] : log1pf(expf(x[i]));
}

static void mul_silu_neon(float *y, const float *z, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vmulq_f32(vld1q_f32(y + i), v_silu(vld1q_f32(z + i))));
    for (; i < n; i++) y[i] *= z[i] / (1.0f + expf(-z[i]));
}

static float read_sum_neon(const float *x, size_t n) {
    float32x4_t a[8];
    for (int l = 0; l < 8; l++) a[l] = vdupq_n_f32(0.0f);
    for (size_t i = 0; i < n; i += 32)
        for (int l = 0; l < 8; l++) a[l] = vaddq_f32(a[l], vld1q_f32(x + i + 4 * l));
    for (int l = 1; l < 8; l++) a[0] = vaddq_f32(a[0], a[l]);
    return vaddvq_f32(a[0]);
}

const sb_kernels sb_kernels_neon = {"neon",    gemv_neon,     gemm_neon,     scan_step_neon,
                                    silu_neon, softplus_neon, mul_silu_neon, read_sum_neon};
