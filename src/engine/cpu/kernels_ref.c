/* The scalar reference kernels: the readable definition that every SIMD family is tested against
 * (and the fallback on CPUs without one). One row at a time, straight from the packed format. */
#include <math.h>

#include "engine.h"

/* row r of class c dotted with x (a dense vector, or column t of channel-major X: stride ldx) */
static float row_dot(const sb_class *c, int r, const float *x, int ldx) {
    float acc = 0.0f;
    if (!c->codes) {
        for (int j = 0; j < c->len; j++) acc += sb_value(c, r, j) * x[(size_t)j * ldx];
    } else {
        const uint8_t *code = c->codes + (size_t)r * c->cb;
        int e = 0;
        for (int g = 0; g < c->G; g++) {
            int mask = (code[g >> 1] >> ((g & 1) * 4)) & 15;
            for (int j = 0; j < 4; j++)
                if (mask >> j & 1) acc += sb_value(c, r, e++) * x[(size_t)(4 * g + j) * ldx];
        }
    }
    return c->scale ? acc * c->scale[r] : acc;
}

static void gemv_ref(const sb_class *c, const float *x, float *y, int r0, int r1) {
    for (int r = r0; r < r1; r++) y[c->idx ? c->idx[r] : r] += row_dot(c, r, x, 1);
}

static void gemm_ref(const sb_class *c, const float *X, int ldx, int T, float *Y, int ldy, int r0, int r1,
                     void *scratch) {
    (void)scratch;
    for (int r = r0; r < r1; r++) {
        float *y = Y + (size_t)(c->idx ? c->idx[r] : r) * ldy;
        for (int t = 0; t < T; t++) y[t] += row_dot(c, r, X + t, ldx);
    }
}

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

static float read_sum_ref(const float *x, size_t n) {
    float acc[8] = {0};
    for (size_t i = 0; i < n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] += x[i + l];
    return acc[0] + acc[1] + acc[2] + acc[3] + acc[4] + acc[5] + acc[6] + acc[7];
}

const sb_kernels sb_kernels_ref = {"scalar",   gemv_ref,     gemm_ref,     scan_step_ref,
                                   silu_ref,   softplus_ref, mul_silu_ref, read_sum_ref};
