/* Linear layers from packed format v2 matrix blobs (docs/packed-format.md, "Matrix blob"), one launch
 * per class: work-item (r, t) is packed row r of the class (16 per block: the lanes of a work-group read
 * one block's slot-major values side by side) and token t. `cls` points at the class section (its
 * header, row index, int8 scales, stream). Activations are channel-major, X[xoff + col * ldx + t]; the
 * result is *added* at Y[o * ys_o + t * ys_t] (a product accumulates). Inputs at col >= K (a chunk's zero
 * padding) are never read. int8 follows the CPU kernels' numerics: per chunk of 64 inputs x is
 * rounded to int16 steps of max|x| / 32767, the int32 sum of the chunk scaled back, then the row scale. */

int v2_code_bytes(int n) { return n == 0 ? 0 : n == 2 ? 128 : 64; }

#ifdef SB_W_I8
#define V2_ESIZE 1
#define V2_META 2
#elif defined(SB_W_F16)
#define V2_ESIZE 2
#define V2_META 1
#else
#define V2_ESIZE 4
#define V2_META 1
#endif

int v2_record_bytes(int n, int G) {
    int s = G * (4 - n);
#ifdef SB_W_I8
    s = (s + 1) & ~1;
#endif
    return (v2_code_bytes(n) + s * 16 * V2_ESIZE + 63) / 64 * 64;
}

long v2_block_panel_bytes(int n, int K, int P, int p) {
    int len = min(P, K - p * P), full = len / 64, rest = len % 64;
    return (long)full * v2_record_bytes(n, 16) + (rest ? v2_record_bytes(n, (rest + 3) / 4) : 0);
}

/* position in the chunk of kept slot t, from the row's code words */
int v2_slot_pos(int n, uint w0, uint w1, int t) {
    if (n == 0) return t;
    if (n == 1) return 4 * (t / 3) + (int)(((w0 >> (2 * (t / 3))) + 1 + t % 3) & 3);
    if (n == 2) return 4 * (t / 2) + (int)(((t < 16 ? w0 : w1) >> (2 * (t % 16))) & 3);
    return 4 * t + (int)((w0 >> (2 * t)) & 3);
}

__kernel void linear_v2(__global const uchar *cls, int n, int K, int P, int nb, __global const float *X, int xoff,
                        int ldx, int T, __global float *Y, int ys_o, int ys_t) {
    int r = get_global_id(0), t = get_global_id(1);
    if (r >= 16 * nb || t >= T) return;
    int o = ((__global const int *)(cls + 64))[r];
    if (o < 0) return; /* a padding row */
    int b = r / 16, l = r % 16;
    __global const uchar *stream = cls + 64 + 64 * (long)nb * V2_META;
    __global const float *x = X + xoff + t;
    float acc = 0.0f;
    long base = 0;
    for (int p = 0; p * P < K; p++) {
        int len = min(P, K - p * P);
        long bpb = v2_block_panel_bytes(n, K, P, p);
        __global const uchar *rec = stream + base + b * bpb;
        for (int j0 = 0; j0 < len; j0 += 64) {
            int rest = len - j0, G = rest >= 64 ? 16 : (rest + 3) / 4, S = G * (4 - n), jb = p * P + j0;
            uint w0 = n ? ((__global const uint *)rec)[l] : 0u, w1 = n == 2 ? ((__global const uint *)rec)[16 + l] : 0u;
            __global const wstore *v = (__global const wstore *)(rec + v2_code_bytes(n));
#ifdef SB_W_I8
            float m = 0.0f;
            for (int i = 0; i < 64 && jb + i < K; i++) m = fmax(m, fabs(x[(long)(jb + i) * ldx]));
            float s = m > 0.0f ? m / 32767.0f : 1.0f, inv = 1.0f / s;
            int sum = 0;
            for (int k = 0; k < S; k++) {
                int j = jb + v2_slot_pos(n, w0, w1, k);
                int q = j < K ? clamp((int)rint(x[(long)j * ldx] * inv), -32767, 32767) : 0;
                sum += (int)v[32 * (k / 2) + 2 * l + (k & 1)] * q;
            }
            acc += (float)sum * s;
#else
            for (int k = 0; k < S; k++) {
                int j = jb + v2_slot_pos(n, w0, w1, k);
                if (j < K) acc += MUL(LOADW(v, 16 * k + l), x[(long)j * ldx]);
            }
#endif
            rec += v2_record_bytes(n, G);
        }
        base += bpb * nb;
    }
#ifdef SB_W_I8
    acc *= ((__global const float *)(cls + 64 + 64 * (long)nb))[r];
#endif
    Y[(long)o * ys_o + (long)t * ys_t] += acc;
}

/* The token embedding into the channel-major residual stream: H[j, t] = row tok[t] of token_embd's one
 * n = 0 class (· its int8 row scale). The LM head is an ordinary linear_v2 launch whose output strides
 * write logits (T, V). */
__kernel void embed(__global const uchar *cls, int K, int P, int nb, __global const int *tok, __global float *H, int ldx,
                    int T) {
    int j = get_global_id(0), t = get_global_id(1);
    if (j >= K || t >= T) return;
    int k = tok[t], b = k / 16, l = k % 16, p = j / P, jj = j - p * P, s = jj % 64;
    long off = 0; /* the record of (panel p, block b, chunk jj / 64): every chunk before it is full */
    for (int q = 0; q < p; q++) off += v2_block_panel_bytes(0, K, P, q) * nb;
    off += b * v2_block_panel_bytes(0, K, P, p) + (long)(jj / 64) * v2_record_bytes(0, 16);
    __global const wstore *v = (__global const wstore *)(cls + 64 + 64 * (long)nb * V2_META + off);
#ifdef SB_W_I8
    H[(long)j * ldx + t] = (float)v[32 * (s / 2) + 2 * l + (s & 1)] * ((__global const float *)(cls + 64 + 64 * (long)nb))[k];
#else
    H[(long)j * ldx + t] = (float)LOADW(v, 16 * s + l);
#endif
}
