/* NEON per-channel kernels for AArch64 (Advanced SIMD is part of every ARMv8-A core, so nothing is
 * probed at run time): scan step, silu, softplus, gate, the bandwidth probe; the same contract as
 * kernels_ref.c, which stays the definition; 4 fp32 lanes. The matrix products are linear_v2_neon.c's. */
#include <arm_neon.h>
#include <math.h>
#include <string.h>

#include "engine.h"
#include "poly.h"

typedef float32x4_t f32x4;

/* ---------------------------------------------------------------- exp, log (as simd.h's) */

/* expf for x <= 0: x = k·ln2 + r, a degree-6 polynomial for e^r, 2^k built in the exponent bits.
 * Relative error about 2e-7; below -87 the result flushes to 0. */
static inline f32x4 v_exp_neg(f32x4 x) {
    const f32x4 lo = vdupq_n_f32(-87.0f);
    uint32x4_t under = vcltq_f32(x, lo);
    x = vmaxq_f32(x, lo);
    f32x4 k = vrndnq_f32(vmulq_n_f32(x, SB_LOG2E));
    f32x4 r = vfmaq_n_f32(x, k, -SB_LN2_HI); /* ln2 split in two for an exact reduction (poly.h) */
    r = vfmaq_n_f32(r, k, -SB_LN2_LO);
    f32x4 p = vdupq_n_f32(SB_EXP_P[0]);
    for (int i = 1; i < 6; i++) p = vfmaq_f32(vdupq_n_f32(SB_EXP_P[i]), p, r);
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
    f32x4 z = vmulq_f32(m, m), p = vdupq_n_f32(SB_LOG_P[0]);
    for (int i = 1; i < 9; i++) p = vfmaq_f32(vdupq_n_f32(SB_LOG_P[i]), p, m);
    f32x4 y = vmulq_f32(vmulq_f32(p, m), z);
    y = vfmaq_n_f32(y, e, SB_LN2_LO);
    y = vfmaq_n_f32(y, z, -0.5f);
    return vaddq_f32(vaddq_f32(m, y), vmulq_n_f32(e, SB_LN2_HI));
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

/* The decode scan (engine.h, scan_decode) 4 channels at a time, their 4 dot products summed by two
 * pairwise adds (vpaddq) into one vector; N not a multiple of 4: scan_step per channel */
static void scan_decode_neon(int N, const float *A, const float *D, const float *dt, const float *x, const float *B,
                             const float *C, float *s, float *y, int c0, int c1) {
    if (N % 4) {
        sb_scan_decode_steps(scan_step_neon, N, A, D, dt, x, B, C, s, y, c0, c1);
        return;
    }
    for (int g = c0; g < c1; g += 4) {
        int mc = c1 - g < 4 ? c1 - g : 4;
        f32x4 acc[4];
        for (int l = 0; l < 4; l++) {
            f32x4 dot = vdupq_n_f32(0.0f);
            if (l < mc) {
                int c = g + l;
                const float *a = A + (size_t)c * N;
                float *h = s + (size_t)c * N;
                float d = dt[c], dtx = d * x[c];
                for (int n = 0; n < N; n += 4) {
                    f32x4 hn = vfmaq_f32(vmulq_n_f32(vld1q_f32(B + n), dtx), v_exp_neg(vmulq_n_f32(vld1q_f32(a + n), d)),
                                         vld1q_f32(h + n));
                    vst1q_f32(h + n, hn);
                    dot = vfmaq_f32(dot, hn, vld1q_f32(C + n));
                }
            }
            acc[l] = dot;
        }
        float out[4];
        vst1q_f32(out, vpaddq_f32(vpaddq_f32(acc[0], acc[1]), vpaddq_f32(acc[2], acc[3])));
        for (int l = 0; l < mc; l++) y[g + l] = out[l] + D[g + l] * x[g + l];
    }
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

static float read_sum_neon(const float *x, size_t n, int streams, int prefetch) {
    (void)prefetch; /* the NEON decode kernels leave prefetch to the hardware */
    float32x4_t a[8];
    size_t part = n / (size_t)streams;
    for (int l = 0; l < 8; l++) a[l] = vdupq_n_f32(0.0f);
    for (size_t i = 0; i < part; i += 32)
        for (int s = 0; s < streams; s++)
            for (int l = 0; l < 8; l++) a[l] = vaddq_f32(a[l], vld1q_f32(x + (size_t)s * part + i + 4 * l));
    for (int l = 1; l < 8; l++) a[0] = vaddq_f32(a[0], a[l]);
    return vaddvq_f32(a[0]);
}

const sb_kernels sb_kernels_neon = {"neon",    sb_v2_gemv_neon, sb_v2_gemm_neon, scan_step_neon,
                                    silu_neon, softplus_neon,   mul_silu_neon,   read_sum_neon,
                                    NULL,      scan_decode_neon, sb_v2_quantise_ref};
