/* expf and logf written once for the x86 SIMD families, against the names a mapping header defines
 * before including this one (simd.h: 8 lanes, simd512.h: 16): vf32 and vmask32, v_set1 / v_add / v_sub /
 * v_mul / v_fma / v_min / v_max / v_round, v_lt, v_and_mask / v_andnot_mask, v_pow2i, v_exponent and
 * v_mantissa. Every lane runs the same operations in the same order in both widths, so a channel gets
 * the same bits in either family. The coefficients are poly.h's. No include guard: one mapping per
 * translation unit includes it once. */
#include "poly.h"

/* expf for x <= 0 (the scan's exp(Δ·A)): x = k·ln2 + r, a degree-6 polynomial for e^r, 2^k built
 * in the exponent bits. Relative error about 2e-7; below -87 the result flushes to 0. */
static inline vf32 v_exp_neg(vf32 x) {
    const vf32 lo = v_set1(-87.0f);
    vmask32 under = v_lt(x, lo);
    x = v_max(x, lo);
    vf32 k = v_round(v_mul(x, v_set1(SB_LOG2E)));
    vf32 r = v_fma(k, v_set1(-SB_LN2_HI), x); /* ln2 split in two for an exact reduction (poly.h) */
    r = v_fma(k, v_set1(-SB_LN2_LO), r);
    vf32 p = v_set1(SB_EXP_P[0]);
    for (int i = 1; i < 6; i++) p = v_fma(p, r, v_set1(SB_EXP_P[i]));
    p = v_fma(p, v_mul(r, r), v_add(r, v_set1(1.0f)));
    return v_andnot_mask(under, v_mul(p, v_pow2i(k)));
}

/* expf on the whole float range (clamped to [-87, 88]: below it the result is 0, above it inf is
 * not needed by silu / softplus) */
static inline vf32 v_exp(vf32 x) { return v_exp_neg(v_min(x, v_set1(88.0f))); }

/* natural log for x > 0 (Cephes logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)), a degree-9
 * polynomial in m - 1); relative error about 1e-7 */
static inline vf32 v_log(vf32 x) {
    vf32 e = v_exponent(x), m = v_mantissa(x); /* m in [0.5, 1) */
    vmask32 small = v_lt(m, v_set1(0.707106781186547524f));
    e = v_sub(e, v_and_mask(small, v_set1(1.0f)));
    m = v_sub(v_add(m, v_and_mask(small, m)), v_set1(1.0f));
    vf32 z = v_mul(m, m), p = v_set1(SB_LOG_P[0]);
    for (int i = 1; i < 9; i++) p = v_fma(p, m, v_set1(SB_LOG_P[i]));
    vf32 y = v_mul(v_mul(p, m), z);
    y = v_fma(e, v_set1(SB_LN2_LO), y);
    y = v_fma(z, v_set1(-0.5f), y);
    return v_add(v_add(m, y), v_mul(e, v_set1(SB_LN2_HI)));
}
