/* simd.h's names in 16 lanes, for the AVX-512 family (kernels_avx512.c, built with AVX-512 flags):
 * what simd_math.h needs for expf and logf. Masks are AVX-512 mask registers. */
#ifndef SB_SIMD512_H
#define SB_SIMD512_H

#include <immintrin.h>

typedef __m512 vf32;
typedef __mmask16 vmask32;

static inline vf32 v_set1(float a) { return _mm512_set1_ps(a); }
static inline vf32 v_add(vf32 a, vf32 b) { return _mm512_add_ps(a, b); }
static inline vf32 v_sub(vf32 a, vf32 b) { return _mm512_sub_ps(a, b); }
static inline vf32 v_mul(vf32 a, vf32 b) { return _mm512_mul_ps(a, b); }
static inline vf32 v_fma(vf32 a, vf32 b, vf32 c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf32 v_min(vf32 a, vf32 b) { return _mm512_min_ps(a, b); }
static inline vf32 v_max(vf32 a, vf32 b) { return _mm512_max_ps(a, b); }
static inline vf32 v_round(vf32 a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vmask32 v_lt(vf32 a, vf32 b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
static inline vf32 v_and_mask(vmask32 m, vf32 a) { return _mm512_maskz_mov_ps(m, a); }                /* a where m */
static inline vf32 v_andnot_mask(vmask32 m, vf32 a) { return _mm512_maskz_mov_ps((vmask32)~m, a); } /* 0 where m */
static inline vf32 v_pow2i(vf32 k) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23));
}
static inline vf32 v_exponent(vf32 x) {
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(_mm512_castps_si512(x), 23), _mm512_set1_epi32(126)));
}
static inline vf32 v_mantissa(vf32 x) {
    __m512i xi = _mm512_castps_si512(x);
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(xi, _mm512_set1_epi32(0x007fffff)),
                                               _mm512_set1_epi32(0x3f000000)));
}

#include "simd_math.h"

#endif
