/* NEON twin of sb_ssd_head_ref (cpu/ssd.c): 4 states per FMA, two accumulators per channel row. */
#include <arm_neon.h>

#include "../mamba2.h"

void sb_ssd_head_neon(int p, int N, float decay, const float *dtx, const float *B, const float *C, float *S, float *y) {
    float32x4_t vd = vdupq_n_f32(decay);
    for (int c = 0; c < p; c++) {
        float *s = S + (size_t)c * N;
        float32x4_t vx = vdupq_n_f32(dtx[c]), a0 = vdupq_n_f32(0.0f), a1 = vdupq_n_f32(0.0f);
        int n = 0;
        for (; n + 8 <= N; n += 8) {
            float32x4_t s0 = vfmaq_f32(vmulq_f32(vx, vld1q_f32(B + n)), vd, vld1q_f32(s + n));
            float32x4_t s1 = vfmaq_f32(vmulq_f32(vx, vld1q_f32(B + n + 4)), vd, vld1q_f32(s + n + 4));
            vst1q_f32(s + n, s0);
            vst1q_f32(s + n + 4, s1);
            a0 = vfmaq_f32(a0, s0, vld1q_f32(C + n));
            a1 = vfmaq_f32(a1, s1, vld1q_f32(C + n + 4));
        }
        for (; n + 4 <= N; n += 4) {
            float32x4_t s0 = vfmaq_f32(vmulq_f32(vx, vld1q_f32(B + n)), vd, vld1q_f32(s + n));
            vst1q_f32(s + n, s0);
            a0 = vfmaq_f32(a0, s0, vld1q_f32(C + n));
        }
        float tail = 0.0f;
        for (; n < N; n++) {
            s[n] = decay * s[n] + dtx[c] * B[n];
            tail += s[n] * C[n];
        }
        y[c] = vaddvq_f32(vaddq_f32(a0, a1)) + tail;
    }
}
