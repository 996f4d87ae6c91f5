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

/* Mamba-2 prefill (mamba2.h, sb_ssd_chunk_fn) as sb_ssd_chunk_avx512 with 8 lanes: a block of 8 channels x
 * 8 states of the head in 8 ymm registers over all T tokens, channels in lanes, no horizontal sum */
void sb_ssd_chunk_avx2(int p, int N, int T, const float *decay, const float *dtx, const float *B, const float *C, int ldbc,
                       float *S, float *y, int ldy) {
    _Alignas(32) float ybuf[256 * 8], blk[8 * 8];
    for (int t0 = 0; t0 < T; t0 += 256) {
        int nt = T - t0 < 256 ? T - t0 : 256;
        for (int c0 = 0; c0 < p; c0 += 8) {
            for (int n0 = 0; n0 < N; n0 += 8) {
                __m256 h[8];
                for (int l = 0; l < 8; l++)
                    for (int n = 0; n < 8; n++) blk[8 * n + l] = S[(size_t)(c0 + l) * N + n0 + n];
                for (int n = 0; n < 8; n++) h[n] = _mm256_load_ps(blk + 8 * n);
                for (int t = 0; t < nt; t++) {
                    const float *Bt = B + (size_t)(t0 + t) * ldbc + n0, *Ct = C + (size_t)(t0 + t) * ldbc + n0;
                    __m256 d = _mm256_set1_ps(decay[t0 + t]), x = _mm256_loadu_ps(dtx + (size_t)(t0 + t) * p + c0);
                    __m256 acc = n0 ? _mm256_load_ps(ybuf + 8 * t) : _mm256_setzero_ps();
#pragma GCC unroll 8
                    for (int n = 0; n < 8; n++) {
                        h[n] = _mm256_fmadd_ps(d, h[n], _mm256_mul_ps(x, _mm256_broadcast_ss(Bt + n)));
                        acc = _mm256_fmadd_ps(h[n], _mm256_broadcast_ss(Ct + n), acc);
                    }
                    _mm256_store_ps(ybuf + 8 * t, acc);
                }
                for (int n = 0; n < 8; n++) _mm256_store_ps(blk + 8 * n, h[n]);
                for (int l = 0; l < 8; l++)
                    for (int n = 0; n < 8; n++) S[(size_t)(c0 + l) * N + n0 + n] = blk[8 * n + l];
            }
            for (int l = 0; l < 8; l++)
                for (int t = 0; t < nt; t++) y[(size_t)(c0 + l) * ldy + t0 + t] = ybuf[8 * t + l];
        }
    }
}
