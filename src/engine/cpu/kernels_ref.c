/* The scalar reference kernels: the readable definition that every SIMD family is tested against
 * (and the fallback on CPUs without one). The matrix products are linear_v2_ref.c's. */
#include <math.h>

#include "engine.h"

static void scan_step_ref(int N, const float *A, float dt, float dtx, const float *B, const float *C, float *s,
                          float *yc) {
    float acc = 0.0f;
    for (int n = 0; n < N; n++) {
        s[n] = expf(dt * A[n]) * s[n] + dtx * B[n];
        acc += s[n] * C[n];
    }
    *yc = acc;
}

static void silu_ref(float *x, int n) {
    for (int i = 0; i < n; i++) x[i] = x[i] / (1.0f + expf(-x[i]));
}

static void softplus_ref(float *x, int n) { /* torch's threshold: above 20, softplus(x) = x */
    for (int i = 0; i < n; i++) x[i] = x[i] > 20.0f ? x[i] : log1pf(expf(x[i]));
}

static void mul_silu_ref(float *y, const float *z, int n) {
    for (int i = 0; i < n; i++) y[i] *= z[i] / (1.0f + expf(-z[i]));
}

static float read_sum_ref(const float *x, size_t n, int streams, int prefetch) {
    (void)prefetch;
    float acc[8] = {0};
    size_t part = n / (size_t)streams;
    for (size_t i = 0; i < part; i += 8)
        for (int s = 0; s < streams; s++)
            for (int l = 0; l < 8; l++) acc[l] += x[(size_t)s * part + i + l];
    return acc[0] + acc[1] + acc[2] + acc[3] + acc[4] + acc[5] + acc[6] + acc[7];
}

void sb_scan_chunk_steps(void (*step)(int N, const float *A, float dt, float dtx, const float *B, const float *C,
                                      float *s, float *yc),
                         int N, int T, const float *A, const float *D, const float *dt, const float *x, int ld,
                         const float *B, const float *C, float *s, float *y, int c0, int c1) {
    for (int c = c0; c < c1; c++)
        for (int t = 0; t < T; t++) {
            float d = dt[(size_t)c * ld + t], xc = x[(size_t)c * ld + t], yc;
            step(N, A + (size_t)c * N, d, d * xc, B + (size_t)t * N, C + (size_t)t * N, s + (size_t)c * N, &yc);
            y[(size_t)c * ld + t] = yc + D[c] * xc;
        }
}

void sb_scan_decode_steps(void (*step)(int N, const float *A, float dt, float dtx, const float *B, const float *C,
                                       float *s, float *yc),
                          int N, const float *A, const float *D, const float *dt, const float *x, const float *B,
                          const float *C, float *s, float *y, int c0, int c1) {
    for (int c = c0; c < c1; c++) {
        float yc;
        step(N, A + (size_t)c * N, dt[c], dt[c] * x[c], B, C, s + (size_t)c * N, &yc);
        y[c] = yc + D[c] * x[c];
    }
}

static void scan_decode_ref(int N, const float *A, const float *D, const float *dt, const float *x, const float *B,
                            const float *C, float *s, float *y, int c0, int c1) {
    sb_scan_decode_steps(scan_step_ref, N, A, D, dt, x, B, C, s, y, c0, c1);
}

static void scan_chunk_ref(int N, int T, const float *A, const float *D, const float *dt, const float *x, int ld,
                           const float *B, const float *C, float *s, float *y, int c0, int c1) {
    sb_scan_chunk_steps(scan_step_ref, N, T, A, D, dt, x, ld, B, C, s, y, c0, c1);
}

const sb_kernels sb_kernels_ref = {"scalar", sb_v2_gemv_ref, sb_v2_gemm_ref, scan_step_ref,  silu_ref,
                                   softplus_ref, mul_silu_ref, read_sum_ref, scan_chunk_ref,
                                   scan_decode_ref, sb_v2_quantise_ref};
