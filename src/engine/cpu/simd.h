/* The small mapping from what the per-channel kernels need to AVX2 intrinsics: 8 fp32 lanes, a
 * horizontal sum, and the few operations from which simd_math.h builds expf and logf (simd512.h maps
 * the same names to 16 lanes for the AVX-512 family). */
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

/* what simd_math.h's expf / logf need, in 8 lanes: masks are vectors of all-ones lanes */
typedef f32x8 vf32;
typedef __m256 vmask32;
static inline vf32 v_sub(vf32 a, vf32 b) { return _mm256_sub_ps(a, b); }
static inline vf32 v_min(vf32 a, vf32 b) { return _mm256_min_ps(a, b); }
static inline vf32 v_max(vf32 a, vf32 b) { return _mm256_max_ps(a, b); }
static inline vf32 v_round(vf32 a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vmask32 v_lt(vf32 a, vf32 b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
static inline vf32 v_and_mask(vmask32 m, vf32 a) { return _mm256_and_ps(m, a); }    /* a where m, else 0 */
static inline vf32 v_andnot_mask(vmask32 m, vf32 a) { return _mm256_andnot_ps(m, a); } /* 0 where m, else a */
/* 2^k for integral k (the exponent bits) */
static inline vf32 v_pow2i(vf32 k) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23));
}
/* x > 0 as m 2^e with m in [0.5, 1): e as a float, and m */
static inline vf32 v_exponent(vf32 x) {
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(_mm256_castps_si256(x), 23), _mm256_set1_epi32(126)));
}
static inline vf32 v_mantissa(vf32 x) {
    __m256i xi = _mm256_castps_si256(x);
    return _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(xi, _mm256_set1_epi32(0x007fffff)),
                                               _mm256_set1_epi32(0x3f000000)));
}

#include "simd_math.h"

#endif
