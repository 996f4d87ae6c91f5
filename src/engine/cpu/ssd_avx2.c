/* AVX2 + FMA twin of sb_ssd_head_ref (cpu/ssd.c): 8 states per FMA, two accumulators per channel row. */
#include <immintrin.h>

#include "../mamba2.h"

static inline float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Decode reads and writes a layer's whole state (h x p x N floats: 0.8 MB per Mamba-2 130M block) every
 * token, a stream from memory like the weights': each line is prefetched sb_v2_prefetch_bytes ahead, as
 * the products do (on the Intel Xeons here the hardware prefetchers stop at each 4 KiB page). */
void sb_ssd_head_avx2(int p, int N, float decay, const float *dtx, const float *B, const float *C, float *S, float *y) {
    __m256 vd = _mm256_set1_ps(decay);
    size_t pf = sb_v2_prefetch_bytes();
    for (int c = 0; c < p; c++) {
        float *s = S + (size_t)c * N;
        __m256 vx = _mm256_set1_ps(dtx[c]), a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int n = 0;
        for (; n + 16 <= N; n += 16) {
            _mm_prefetch((const char *)(s + n) + pf, _MM_HINT_T0);
            __m256 s0 = _mm256_fmadd_ps(vd, _mm256_loadu_ps(s + n), _mm256_mul_ps(vx, _mm256_loadu_ps(B + n)));
            __m256 s1 = _mm256_fmadd_ps(vd, _mm256_loadu_ps(s + n + 8), _mm256_mul_ps(vx, _mm256_loadu_ps(B + n + 8)));
            _mm256_storeu_ps(s + n, s0);
            _mm256_storeu_ps(s + n + 8, s1);
            a0 = _mm256_fmadd_ps(s0, _mm256_loadu_ps(C + n), a0);
            a1 = _mm256_fmadd_ps(s1, _mm256_loadu_ps(C + n + 8), a1);
        }
        for (; n + 8 <= N; n += 8) {
            __m256 s0 = _mm256_fmadd_ps(vd, _mm256_loadu_ps(s + n), _mm256_mul_ps(vx, _mm256_loadu_ps(B + n)));
            _mm256_storeu_ps(s + n, s0);
            a0 = _mm256_fmadd_ps(s0, _mm256_loadu_ps(C + n), a0);
        }
        float tail = 0.0f;
        for (; n < N; n++) {
            s[n] = decay * s[n] + dtx[c] * B[n];
            tail += s[n] * C[n];
        }
        y[c] = hsum8(_mm256_add_ps(a0, a1)) + tail;
    }
}
