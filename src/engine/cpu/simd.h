/* The small mapping from what the per-channel kernels need to AVX2 intrinsics: 8 fp32 lanes, a
 * horizontal sum and expf. Another family (NEON, AVX-512)
 * maps the same names in its own file; the kernels above this header do not change. */
#ifndef SB_SIMD_H
#define SB_SIMD_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "poly.h"

typedef __m256 f32x8;

static inline f32x8 v_zero(void) { return _mm256_setzero_ps(); }
static inline f32x8 v_set1(float a) { return _mm256_set1_ps(a); }
static inline f32x8 v_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void v_store(float *p, f32x8 a) { _mm256_storeu_ps(p, a); }
static inline f32x8 v_add(f32x8 a, f32x8 b) { return _mm256_add_ps(a, b); }
static inline f32x8 v_mul(f32x8 a, f32x8 b) { return _mm256_mul_ps(a, b); }
static inline f32x8 v_fma(f32x8 a, f32x8 b, f32x8 c) { return _mm256_fmadd_ps(a, b, c); }

static inline float v_hsum(f32x8 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* expf for x <= 0 (the scan's exp(Δ·A)): x = k·ln2 + r, a degree-6 polynomial for e^r, 2^k built
 * in the exponent bits. Relative error about 2e-7; below -87 the result flushes to 0. */
static inline f32x8 v_exp_neg(f32x8 x) {
    const f32x8 lo = v_set1(-87.0f);
    f32x8 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    f32x8 k = _mm256_round_ps(v_mul(x, v_set1(SB_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    f32x8 r = v_fma(k, v_set1(-SB_LN2_HI), x); /* ln2 split in two for an exact reduction (poly.h) */
    r = v_fma(k, v_set1(-SB_LN2_LO), r);
    f32x8 p = v_set1(SB_EXP_P[0]);
    for (int i = 1; i < 6; i++) p = v_fma(p, r, v_set1(SB_EXP_P[i]));
    p = v_fma(p, v_mul(r, r), v_add(r, v_set1(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    f32x8 res = v_mul(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(under, res);
}

/* expf on the whole float range (clamped to [-87, 88]: below it the result is 0, above it inf is
 * not needed by silu / softplus) */
static inline f32x8 v_exp(f32x8 x) { return v_exp_neg(_mm256_min_ps(x, v_set1(88.0f))); }

/* natural log for x > 0 (Cephes logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)), a degree-9
 * polynomial in m - 1); relative error about 1e-7 */
static inline f32x8 v_log(f32x8 x) {
    __m256i xi = _mm256_castps_si256(x);
    f32x8 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(xi, 23), _mm256_set1_epi32(126)));
    f32x8 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(xi, _mm256_set1_epi32(0x007fffff)),
                                                  _mm256_set1_epi32(0x3f000000))); /* [0.5, 1) */
    f32x8 small = _mm256_cmp_ps(m, v_set1(0.707106781186547524f), _CMP_LT_OQ);
    e = _mm256_sub_ps(e, _mm256_and_ps(small, v_set1(1.0f)));
    m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), v_set1(1.0f));
    f32x8 z = v_mul(m, m), p = v_set1(SB_LOG_P[0]);
    for (int i = 1; i < 9; i++) p = v_fma(p, m, v_set1(SB_LOG_P[i]));
    f32x8 y = v_mul(v_mul(p, m), z);
    y = v_fma(e, v_set1(SB_LN2_LO), y);
    y = v_fma(z, v_set1(-0.5f), y);
    return v_add(v_add(m, y), v_mul(e, v_set1(SB_LN2_HI)));
}

#endif
