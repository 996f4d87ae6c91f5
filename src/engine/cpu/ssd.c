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
