/* AVX-512 F per-channel kernels (this file only is built with AVX-512 flags; chosen at run time): the
 * scan step with one zmm per 16 states, so that a Mamba channel (d_state 16) is one exp, one FMA and
 * one reduction. The other per-channel ops of the AVX-512 family are kernels_avx2.c's. */
#include <immintrin.h>
#include <math.h>

#include "engine.h"

/* expf for x <= 0: simd.h's v_exp_neg in 16 lanes (same reduction and polynomial, relative error
 * about 2e-7; below -87 the result flushes to 0) */
static inline __m512 exp_neg16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.0f);
    __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_max_ps(x, lo);
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fmadd_ps(k, _mm512_set1_ps(-0.693359375f), x); /* ln2 split in two: an exact reduction */
    r = _mm512_fmadd_ps(k, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps((__mmask16)~under, p, _mm512_castsi512_ps(e));
}

/* s = exp(dt*A)*s + dtx*B, *yc = s . C: 16 states per step, the last step masked. Decode walks the
 * channels in order and each one's A and state come from memory (a layer's are 2 x d_inner x N floats),
 * so the lines that far ahead are prefetched as the products prefetch their streams. */
void sb_scan_step_avx512(int N, const float *A, float dt, float dtx, const float *B, const float *C, float *s,
                         float *yc) {
    __m512 acc = _mm512_setzero_ps(), vdt = _mm512_set1_ps(dt), vdtx = _mm512_set1_ps(dtx);
    size_t pf = sb_v2_prefetch_bytes();
    for (int n = 0; n < N; n += 16) {
        _mm_prefetch((const char *)(A + n) + pf, _MM_HINT_T0);
        _mm_prefetch((const char *)(s + n) + pf, _MM_HINT_T0);
        __mmask16 m = N - n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (N - n)) - 1);
        __m512 a = _mm512_maskz_loadu_ps(m, A + n), h = _mm512_maskz_loadu_ps(m, s + n);
        h = _mm512_fmadd_ps(exp_neg16(_mm512_mul_ps(vdt, a)), h, _mm512_mul_ps(vdtx, _mm512_maskz_loadu_ps(m, B + n)));
        _mm512_mask_storeu_ps(s + n, m, h);
        acc = _mm512_fmadd_ps(h, _mm512_maskz_loadu_ps(m, C + n), acc);
    }
    *yc = _mm512_reduce_add_ps(acc);
}

/* The read probe (sb_read_bandwidth): the fastest reading of memory measured here from one thread.
 * One 64-byte load per line: with 32-byte loads the same sum reads ~7% slower on Intel (two load uops
 * per line fill the out-of-order window with half as many lines in flight); each line prefetched
 * sb_v2_prefetch_bytes ahead into L1, as the decode kernels prefetch their streams (T0, T1 and T2
 * read alike; 2 / 4 / 8 KiB ahead alike; 2 MiB pages no faster). bench/README.md has the figures. */
float sb_read_sum_avx512(const float *x, size_t n) {
    __m512 a[8];
    size_t pf = sb_v2_prefetch_bytes();
    for (int l = 0; l < 8; l++) a[l] = _mm512_setzero_ps();
    for (size_t i = 0; i < n; i += 128) {
        for (int l = 0; l < 8; l++) {
            _mm_prefetch((const char *)(x + i + 16 * l) + pf, _MM_HINT_T0);
            a[l] = _mm512_add_ps(a[l], _mm512_loadu_ps(x + i + 16 * l));
        }
    }
    for (int l = 1; l < 8; l++) a[0] = _mm512_add_ps(a[0], a[l]);
    return _mm512_reduce_add_ps(a[0]);
}
