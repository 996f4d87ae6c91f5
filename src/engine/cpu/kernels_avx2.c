/* AVX2 + FMA + F16C per-channel kernels (compiled with those flags for this file only; chosen at run
 * time): scan step, silu, softplus, gate, the bandwidth probe. The matrix products are
 * linear_v2_avx2.c's. The AVX-512 family (its table at the end of this file) takes kernels_avx512.c's
 * per-channel ops and linear_v2_avx512.c's products (VNNI for int8 where the CPU has it). */
#include <math.h>

#include "engine.h"
#include "simd.h"

static void scan_step_avx2(int N, const float *A, float dt, float dtx, const float *B, const float *C, float *s,
                           float *yc) {
    f32x8 acc = v_zero(), vdt = v_set1(dt), vdtx = v_set1(dtx);
    int n = 0;
    for (; n + 8 <= N; n += 8) {
        f32x8 h = v_fma(v_exp_neg(v_mul(vdt, v_load(A + n))), v_load(s + n), v_mul(vdtx, v_load(B + n)));
        v_store(s + n, h);
        acc = v_fma(h, v_load(C + n), acc);
    }
    float tail = 0.0f;
    for (; n < N; n++) {
        s[n] = expf(dt * A[n]) * s[n] + dtx * B[n];
        tail += s[n] * C[n];
    }
    *yc = v_hsum(acc) + tail;
}

/* Lane l of the result: the sum of v[l]'s 8 lanes (a transposed reduction: 6 hadds, 2 lane permutes) */
static inline f32x8 sum8x8(const f32x8 v[8]) {
    f32x8 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
    f32x8 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
    f32x8 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3); /* halves: v[0..3] (u0), v[4..7] (u1) */
    return v_add(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* The decode scan (engine.h, scan_decode) 8 channels at a time, their 8 dot products summed by one
 * transposed reduction (kernels_avx512.c has the reasoning); N not a multiple of 8: scan_step per channel */
static void scan_decode_avx2(int N, const float *A, const float *D, const float *dt, const float *x, const float *B,
                             const float *C, float *s, float *y, int c0, int c1) {
    if (N % 8) {
        sb_scan_decode_steps(scan_step_avx2, N, A, D, dt, x, B, C, s, y, c0, c1);
        return;
    }
    size_t pf = sb_v2_prefetch_bytes();
    for (int g = c0; g < c1; g += 8) {
        int mc = c1 - g < 8 ? c1 - g : 8;
        f32x8 acc[8];
#pragma GCC unroll 8
        for (int l = 0; l < 8; l++) {
            f32x8 dot = v_zero();
            if (l < mc) {
                int c = g + l;
                const float *a = A + (size_t)c * N;
                float *h = s + (size_t)c * N;
                f32x8 vdt = v_set1(dt[c]), vdtx = v_set1(dt[c] * x[c]);
                for (int n = 0; n < N; n += 8) {
                    if (!(n & 15)) {
                        _mm_prefetch((const char *)(a + n) + pf, _MM_HINT_T0);
                        _mm_prefetch((const char *)(h + n) + pf, _MM_HINT_T0);
                    }
                    f32x8 hn = v_fma(v_exp_neg(v_mul(vdt, v_load(a + n))), v_load(h + n), v_mul(vdtx, v_load(B + n)));
                    v_store(h + n, hn);
                    dot = v_fma(hn, v_load(C + n), dot);
                }
            }
            acc[l] = dot;
        }
        float out[8];
        v_store(out, sum8x8(acc));
        for (int l = 0; l < mc; l++) y[g + l] = out[l] + D[g + l] * x[g + l];
    }
}

static void silu_avx2(float *x, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        f32x8 v = v_load(x + i);
        v_store(x + i, _mm256_div_ps(v, v_add(v_set1(1.0f), v_exp(_mm256_sub_ps(v_zero(), v)))));
    }
    for (; i < n; i++) x[i] = x[i] / (1.0f + expf(-x[i]));
}

static void softplus_avx2(float *x, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        /* log1p(u) = log(w) * u / (w - 1) with w = 1 + u: exact to float rounding even when u is tiny */
        f32x8 v = v_load(x + i), u = v_exp(v), w = v_add(v_set1(1.0f), u), wm1 = _mm256_sub_ps(w, v_set1(1.0f));
        f32x8 r = _mm256_div_ps(v_mul(v_log(w), u), wm1);
        r = _mm256_blendv_ps(r, u, _mm256_cmp_ps(wm1, v_zero(), _CMP_EQ_OQ));
        v_store(x + i, _mm256_blendv_ps(r, v, _mm256_cmp_ps(v, v_set1(20.0f), _CMP_GT_OQ)));
    }
    for (; i < n; i++) x[i] = x[i] > 20.0f ? x[i] : log1pf(expf(x[i]));
}

static void mul_silu_avx2(float *y, const float *z, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        f32x8 v = v_load(z + i);
        f32x8 sv = _mm256_div_ps(v, v_add(v_set1(1.0f), v_exp(_mm256_sub_ps(v_zero(), v))));
        v_store(y + i, v_mul(v_load(y + i), sv));
    }
    for (; i < n; i++) y[i] *= z[i] / (1.0f + expf(-z[i]));
}

/* the read probe of the AVX2 family streams as its decode kernels do: the same prefetch distance and
 * hint (sb_v2_prefetch_bytes; one stream into L2: 5% faster than into L1 with 32-byte loads,
 * bench/README.md; streams side by side into L1, as the kernels' 4 block streams), so that "% of the
 * probe" compares like with like */
/* S parts side by side, one 64-byte line of each in turn (a[] by line: any S), each line prefetched pf
 * bytes ahead where pf is not 0; S a constant where inlined, so that a[] stays in registers */
static inline __attribute__((always_inline)) void read_parts(const float *x, size_t part, int S, f32x8 a[8], size_t pf) {
    for (size_t i = 0; i < part; i += 16)
        for (int s = 0; s < S; s++) {
            const float *p = x + (size_t)s * part + i;
            if (pf) _mm_prefetch((const char *)p + pf, _MM_HINT_T0);
            a[2 * s & 7] = v_add(a[2 * s & 7], v_load(p));
            a[(2 * s + 1) & 7] = v_add(a[(2 * s + 1) & 7], v_load(p + 8));
        }
}

static float read_sum_avx2(const float *x, size_t n, int streams, int prefetch) {
    f32x8 a[8];
    for (int l = 0; l < 8; l++) a[l] = v_zero();
    size_t part = n / (size_t)(streams > 0 ? streams : 1), pfb = prefetch ? sb_v2_prefetch_bytes() : 0;
    if (streams == 8) read_parts(x, part, 8, a, pfb);
    else if (streams == 4) read_parts(x, part, 4, a, pfb);
    else if (streams > 1) read_parts(x, part, streams, a, pfb);
    else {
        size_t pf = pfb / sizeof(float);
        for (size_t i = 0; i < n; i += 64) {
            for (int l = 0; l < 4; l++) _mm_prefetch((const char *)(x + i + pf + 16 * l), _MM_HINT_T1);
            for (int l = 0; l < 8; l++) a[l] = v_add(a[l], v_load(x + i + 8 * l));
        }
    }
    for (int l = 1; l < 8; l++) a[0] = v_add(a[0], a[l]);
    return v_hsum(a[0]);
}

/* the prefill scan with 8 channels in lanes: per token and state n one exp of 8 channels' Δ A, the state
 * update and the output's FMA, B and C broadcast; no horizontal sum. The states live in a small
 * array (16 ymm registers would not hold N = 16 of them and the temporaries). */
static void scan_chunk_avx2(int N, int T, const float *A, const float *D, const float *dt, const float *x, int ld,
                            const float *B, const float *C, float *s, float *y, int c0, int c1) {
    for (int g0 = c0; g0 < c1; g0 += 8) {
        int m = c1 - g0 < 8 ? c1 - g0 : 8;
        __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(m), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        float at[8 * 64], h[8 * 64], tmp[8];
        if (N > 64) { /* states past 64: the step kernel */
            sb_scan_chunk_steps(scan_step_avx2, N, T, A, D, dt, x, ld, B, C, s, y, g0, g0 + m);
            continue;
        }
        for (int n = 0; n < N; n++)
            for (int l = 0; l < 8; l++) {
                at[8 * n + l] = l < m ? A[(size_t)(g0 + l) * N + n] : 0.0f;
                h[8 * n + l] = l < m ? s[(size_t)(g0 + l) * N + n] : 0.0f;
            }
        __m256i rows = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(ld));
        __m256 vD = _mm256_maskload_ps(D + g0, lanes);
        for (int t = 0; t < T; t++) {
            __m256 d = _mm256_mask_i32gather_ps(v_zero(), dt + (size_t)g0 * ld + t, rows, _mm256_castsi256_ps(lanes), 4);
            __m256 xc = _mm256_mask_i32gather_ps(v_zero(), x + (size_t)g0 * ld + t, rows, _mm256_castsi256_ps(lanes), 4);
            __m256 dx = v_mul(d, xc), acc = v_zero();
            const float *Bt = B + (size_t)t * N, *Ct = C + (size_t)t * N;
            for (int n = 0; n < N; n++) {
                __m256 hn = v_fma(v_exp_neg(v_mul(d, v_load(at + 8 * n))), v_load(h + 8 * n), v_mul(dx, v_set1(Bt[n])));
                v_store(h + 8 * n, hn);
                acc = v_fma(hn, v_set1(Ct[n]), acc);
            }
            v_store(tmp, v_fma(vD, xc, acc));
            for (int l = 0; l < m; l++) y[(size_t)(g0 + l) * ld + t] = tmp[l];
        }
        for (int n = 0; n < N; n++)
            for (int l = 0; l < m; l++) s[(size_t)(g0 + l) * N + n] = h[8 * n + l];
    }
}

const sb_kernels sb_kernels_avx2 = {"avx2",        sb_v2_gemv_avx2, sb_v2_gemm_avx2, scan_step_avx2, silu_avx2,
                                    softplus_avx2, mul_silu_avx2,   read_sum_avx2,   scan_chunk_avx2,
                                    scan_decode_avx2, sb_v2_quantise_avx2};
const sb_kernels sb_kernels_avx512 = {"avx512",      sb_v2_gemv_avx512, sb_v2_gemm_avx512, sb_scan_step_avx512, sb_silu_avx512,
                                      sb_softplus_avx512, sb_mul_silu_avx512,     sb_read_sum_avx512, sb_scan_chunk_avx512,
                                      sb_scan_decode_avx512, sb_v2_quantise_avx512};
