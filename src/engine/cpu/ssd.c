/* The Mamba-2 state step of one head: the scalar reference (the definition), and which family's
 * twin runs (no ISA flags here; cpu/ssd_avx2.c and cpu/ssd_neon.c hold the SIMD versions). */
#include "../mamba2.h"

void sb_ssd_head_ref(int p, int N, float decay, const float *dtx, const float *B, const float *C, float *S, float *y) {
    for (int c = 0; c < p; c++) {
        float *s = S + (size_t)c * N, acc = 0.0f;
        for (int n = 0; n < N; n++) {
            s[n] = decay * s[n] + dtx[c] * B[n];
            acc += s[n] * C[n];
        }
        y[c] = acc;
    }
}

sb_ssd_head_fn sb_ssd_head_for(const sb_kernels *k) {
#if defined(__x86_64__) || defined(_M_X64)
    if (k == &sb_kernels_avx2 || k == &sb_kernels_avx512) return sb_ssd_head_avx2;
#endif
#if defined(__aarch64__)
    if (k == &sb_kernels_neon) return sb_ssd_head_neon;
#endif
    return sb_ssd_head_ref;
}

void sb_ssd_chunk_ref(int p, int N, int T, const float *decay, const float *dtx, const float *B, const float *C, int ldbc,
                      float *S, float *y, int ldy) {
    for (int t = 0; t < T; t++)
        for (int c = 0; c < p; c++) {
            float *s = S + (size_t)c * N, acc = 0.0f;
            for (int n = 0; n < N; n++) {
                s[n] = decay[t] * s[n] + dtx[(size_t)t * p + c] * B[(size_t)t * ldbc + n];
                acc += s[n] * C[(size_t)t * ldbc + n];
            }
            y[(size_t)c * ldy + t] = acc;
        }
}

sb_ssd_chunk_fn sb_ssd_chunk_for(const sb_kernels *k, int p, int N) {
#if defined(__x86_64__) || defined(_M_X64)
    if (k == &sb_kernels_avx512 && p % 16 == 0 && N % 16 == 0) return sb_ssd_chunk_avx512;
    if ((k == &sb_kernels_avx2 || k == &sb_kernels_avx512) && p % 8 == 0 && N % 8 == 0) return sb_ssd_chunk_avx2;
#endif
    (void)k, (void)p, (void)N;
    return NULL;
}
