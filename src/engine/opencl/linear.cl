/* Linear layers straight from the packed file (docs/packed-format.md), one launch per class: values
 * (rows, len) in the storage type, 4-bit codes (rows, cb) when packed (bit j of group g: input 4g + j
 * is kept, 4 - n bits per group, so group g's values start at g * (4 - n)), the output row each row
 * writes (idx, or row r writes r) and int8 row scales. Activations are channel-major,
 * X[xoff + col * ldx + t]; a result is *added* at Y[o * ys_o + t * ys_t], so the same kernels write the
 * residual stream (ys_o = ldx, ys_t = 1) and the logits (ys_o = 1, ys_t = V). Inputs at col >= in (the
 * padding of the last group, whose weights are 0) are never read: no buffer needs zero padding. */

/* a row (w: its values, code: its masks) dotted with one column x of stride xs */
float row_dot(__global const wstore *w, __global const uchar *code, int packed, int len, int G, int in,
              __global const float *x, int xs) {
    float acc = 0.0f;
    if (!packed) { /* a dense row, or class c0: every position kept */
        int n = min(len, in);
        for (int j = 0; j < n; j++) acc += MUL(LOADW(w, j), x[(size_t)j * xs]);
        return acc;
    }
    int e = 0;
    for (int g = 0; g < G; g++) {
        int mask = (code[g >> 1] >> ((g & 1) * 4)) & 15;
        for (int j = 0; j < 4; j++) {
            if (!((mask >> j) & 1)) continue;
            int col = 4 * g + j;
            if (col < in) acc += MUL(LOADW(w, e), x[(size_t)col * xs]);
            e++;
        }
    }
    return acc;
}

/* prefill: one work-item per (row, token) */
__kernel void linear_gemm(__global const wstore *v, __global const uchar *codes, __global const int *idx,
                          __global const float *scale, int rows, int len, int G, int cb, int packed, int has_idx,
                          int in, __global const float *X, int xoff, int ldx, int T, __global float *Y, int ys_o,
                          int ys_t) {
    int r = get_global_id(0), t = get_global_id(1);
    if (r >= rows || t >= T) return;
    float acc = row_dot(v + (size_t)r * len, packed ? codes + (size_t)r * cb : codes, packed, len, G, in,
                        X + xoff + t, ldx);
#ifdef SB_W_I8
    acc *= scale[r];
#endif
    int o = has_idx ? idx[r] : r;
    Y[(size_t)o * ys_o + (size_t)t * ys_t] += acc;
}

/* decode: one work-group per row, its SB_LS lanes striding over the groups of 4 (or the columns of a
 * dense row), then a tree sum in local memory */
__kernel __attribute__((reqd_work_group_size(SB_LS, 1, 1))) void linear_gemv(
    __global const wstore *v, __global const uchar *codes, __global const int *idx, __global const float *scale,
    int len, int G, int cb, int packed, int has_idx, int in, __global const float *X, int xoff, int ldx,
    __global float *Y, int ys_o) {
    __local float part[SB_LS];
    int r = get_group_id(0), l = get_local_id(0);
    __global const wstore *w = v + (size_t)r * len;
    __global const float *x = X + xoff;
    float acc = 0.0f;
    if (!packed) {
        int n = min(len, in);
        for (int j = l; j < n; j += SB_LS) acc += MUL(LOADW(w, j), x[(size_t)j * ldx]);
    } else {
        __global const uchar *code = codes + (size_t)r * cb;
        int keep = len / G;
        for (int g = l; g < G; g += SB_LS) {
            int mask = (code[g >> 1] >> ((g & 1) * 4)) & 15, e = g * keep;
            for (int j = 0; j < 4; j++) {
                if (!((mask >> j) & 1)) continue;
                int col = 4 * g + j;
                if (col < in) acc += MUL(LOADW(w, e), x[(size_t)col * ldx]);
                e++;
            }
        }
    }
    part[l] = acc;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = SB_LS / 2; s > 0; s >>= 1) {
        if (l < s) part[l] += part[l + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (l == 0) {
        float a = part[0];
#ifdef SB_W_I8
        a *= scale[r];
#endif
        Y[(size_t)(has_idx ? idx[r] : r) * ys_o] += a;
    }
}
