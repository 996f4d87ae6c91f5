/* The per-channel ops of a Mamba-2 block (forward_mamba2.c's, on the device) on channel-major
 * activations A[c * ldx + t]: ZXD = ssm_in's output, rows [z (di) | x B C (cd) | Δr (h)]; XBC the conv
 * output (cd rows); DT (h rows); Y (di rows). The state S is (h, p, N) = (di, N) per layer. */

/* XBC[c, t] = silu(bias[c] + sum_j w[c, j] x[c, t - K + 1 + j]) with x = ZXD row row0 + c, the inputs
 * before the chunk from the carried window (as conv_silu in ssm.cl); then the window takes the last K - 1 */
__kernel void m2_conv_silu(__global const float *ZXD, __global float *XBC, int ldx, int T, int cd, int row0, int K,
                           __global const float *w, __global const float *bias, __global float *win, int woff) {
    int c = get_global_id(0);
    if (c >= cd) return;
    __global const float *x = ZXD + (size_t)(row0 + c) * ldx, *wc = w + (size_t)c * K;
    __global float *xc = XBC + (size_t)c * ldx, *st = win + woff + (size_t)c * (K - 1);
    for (int t = 0; t < T; t++) {
        float acc = bias[c];
        for (int j = 0; j < K; j++) {
            int src = t - (K - 1) + j;
            acc += wc[j] * (src >= 0 ? x[src] : st[K - 1 + src]);
        }
        xc[t] = sb_silu(acc);
    }
    for (int j = 0; j < K - 1; j++) {
        int src = T - (K - 1) + j;
        st[j] = src >= 0 ? x[src] : st[T + j];
    }
}

/* DT[j, t] = clamp(softplus(ZXD[row0 + j, t] + dt_bias[j]), lo, hi), heads j < h */
__kernel void m2_delta(__global const float *ZXD, __global float *DT, int ldx, int T, int h, int row0,
                       __global const float *dt_bias, float lo, float hi) {
    int j = get_global_id(0), t = get_global_id(1);
    if (j >= h || t >= T) return;
    float v = sb_softplus(ZXD[(size_t)(row0 + j) * ldx + t] + dt_bias[j]);
    DT[(size_t)j * ldx + t] = fmin(fmax(v, lo), hi);
}

/* one work-item per channel c of head j = c / p (group j / r), tokens in order:
 *   s[n] = exp(Δ A[j]) s[n] + Δ x B[n];  y = (Σ s[n] C[n] + D[j] x) · silu(z)
 * x = XBC[c, t], B = XBC rows di + grp N .., C = XBC rows di + gN + grp N .., z = ZXD[c, t] */
__kernel void m2_ssd(__global const float *XBC, __global const float *DT, __global const float *ZXD,
                     __global float *Y, __global float *S, int soff, __global const float *A,
                     __global const float *Dv, int ldx, int T, int di, int p, int r, int N, int gN) {
    int c = get_global_id(0);
    if (c >= di) return;
    int j = c / p, grp = j / r;
    __global float *s = S + soff + (size_t)c * N;
    size_t b0 = (size_t)(di + grp * N), c0 = (size_t)(di + gN + grp * N);
    for (int t = 0; t < T; t++) {
        float dt = DT[(size_t)j * ldx + t], decay = exp(dt * A[j]), x = XBC[(size_t)c * ldx + t], dtx = dt * x;
        float acc = 0.0f;
        for (int n = 0; n < N; n++) {
            float sv = decay * s[n] + dtx * XBC[(b0 + n) * ldx + t];
            s[n] = sv;
            acc += sv * XBC[(c0 + n) * ldx + t];
        }
        Y[(size_t)c * ldx + t] = (acc + Dv[j] * x) * sb_silu(ZXD[(size_t)c * ldx + t]);
    }
}

/* the gated RMSNorm, in place: one work-group per (token t, group grp) of gs = di / g channels,
 * Y[c, t] *= rsqrt(mean over the group of Y² + eps) * (w[c] when has_w) */
__kernel __attribute__((reqd_work_group_size(SB_LS, 1, 1))) void m2_gnorm(__global float *Y, int ldx, int T, int g,
                                                                       int gs, __global const float *w, int has_w,
                                                                       float eps) {
    __local float part[SB_LS];
    int id = get_group_id(0), t = id / g, grp = id % g, l = get_local_id(0);
    float ss = 0.0f;
    for (int c = l; c < gs; c += SB_LS) {
        float v = Y[(size_t)(grp * gs + c) * ldx + t];
        ss += v * v;
    }
    part[l] = ss;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = SB_LS / 2; s > 0; s >>= 1) {
        if (l < s) part[l] += part[l + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    float sc = 1.0f / sqrt(part[0] / gs + eps);
    for (int c = l; c < gs; c += SB_LS) {
        size_t i = (size_t)(grp * gs + c) * ldx + t;
        Y[i] *= sc * (has_w ? w[grp * gs + c] : 1.0f);
    }
}
