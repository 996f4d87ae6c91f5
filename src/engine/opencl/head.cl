/* The ends of the model: the token embedding into the channel-major residual stream (the LM head
 * is an ordinary linear_gemm / linear_gemv launch, with output strides that write logits (T, V)). */

/* H[j, t] = E[tok[t], j] (· scale[tok[t]] for int8) */
__kernel void embed(__global const wstore *E, __global const float *scale, __global const int *tok,
                    __global float *H, int ldx, int d, int T) {
    int j = get_global_id(0), t = get_global_id(1);
    if (j >= d || t >= T) return;
    int k = tok[t];
    float v = (float)LOADW(E, (size_t)k * d + j);
#ifdef SB_W_I8
    v *= scale[k];
#endif
    H[(size_t)j * ldx + t] = v;
}
