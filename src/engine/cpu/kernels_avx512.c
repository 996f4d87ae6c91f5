/* AVX-512 F per-channel kernels (this file only is built with AVX-512 flags; chosen at run time): the
 * scan step with one zmm per 16 states, so that a Mamba channel (d_state 16) is one exp, one FMA and
 * one reduction; the decode scan 16 channels at a time; silu, softplus and the gate in 16 lanes. */
#include <immintrin.h>
#include <math.h>

#include "engine.h"
#include "mamba2.h"
#include "simd512.h"

/* expf, expf for x <= 0 and logf: v_exp, v_exp_neg and v_log (simd_math.h, 16 lanes: simd512.h) */

static inline __m512 silu16(__m512 v) {
    return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), v_exp(_mm512_sub_ps(_mm512_setzero_ps(), v))));
}

/* The per-channel ops of kernels_avx2.c in 16 lanes, the tail masked (the same formulas) */
void sb_silu_avx512(float *x, int n) {
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(x + i, m, silu16(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

void sb_softplus_avx512(float *x, int n) {
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        /* log1p(u) = log(w) * u / (w - 1) with w = 1 + u: exact to float rounding even when u is tiny */
        __m512 v = _mm512_maskz_loadu_ps(m, x + i), u = v_exp(v), w = _mm512_add_ps(_mm512_set1_ps(1.0f), u);
        __m512 wm1 = _mm512_sub_ps(w, _mm512_set1_ps(1.0f)), r = _mm512_div_ps(_mm512_mul_ps(v_log(w), u), wm1);
        r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(wm1, _mm512_setzero_ps(), _CMP_EQ_OQ), r, u);
        r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_set1_ps(20.0f), _CMP_GT_OQ), r, v);
        _mm512_mask_storeu_ps(x + i, m, r);
    }
}

void sb_mul_silu_avx512(float *y, const float *z, int n) {
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, y + i), silu16(_mm512_maskz_loadu_ps(m, z + i))));
    }
}

/* s = exp(dt*A)*s + dtx*B, *yc = s . C: 16 states per step, the last step masked. Decode walks the
 * channels in order and each one's A and state come from memory (a layer's are 2 x d_inner x N floats),
 * so the lines that far ahead are prefetched as the products prefetch their streams. */
void sb_scan_step_avx512(int N, const float *A, float dt, float dtx, const float *B, const float *C, float *s,
                         float *yc) {
    __m512 acc = _mm512_setzero_ps(), vdt = _mm512_set1_ps(dt), vdtx = _mm512_set1_ps(dtx);
    size_t pf = sb_v2_prefetch_bytes();
    for (int n = 0; n < N; n += 16) {
        _mm_prefetch((const char *)(A + n) + pf, _MM_HINT_T0);
        _mm_prefetch((const char *)(s + n) + pf, _MM_HINT_T0);
        __mmask16 m = N - n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (N - n)) - 1);
        __m512 a = _mm512_maskz_loadu_ps(m, A + n), h = _mm512_maskz_loadu_ps(m, s + n);
        h = _mm512_fmadd_ps(v_exp_neg(_mm512_mul_ps(vdt, a)), h, _mm512_mul_ps(vdtx, _mm512_maskz_loadu_ps(m, B + n)));
        _mm512_mask_storeu_ps(s + n, m, h);
        acc = _mm512_fmadd_ps(h, _mm512_maskz_loadu_ps(m, C + n), acc);
    }
    *yc = _mm512_reduce_add_ps(acc);
}

/* Lane l of the result: the sum of the 16 lanes of v[4 (l % 4) + l / 4]. A transposed reduction, 16 sums
 * in 30 shuffles and 15 adds where 16 separate reductions take 64 and 64; the slots are permuted so that
 * the last step leaves the sums in order without a final permute. */
static inline __m512 sum16x16(const __m512 v[16]) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) /* 128-bit blocks: v[2i]'s halves folded in 0-1, v[2i+1]'s in 2-3 */
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int j = 0; j < 4; j++) /* block k: 4 partial sums of v[4j + k] */
        b[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xDD));
    for (int m = 0; m < 2; m++) /* block k: 2 partials of v[8m + k], 2 of v[8m + 4 + k] */
        c[m] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * m], b[2 * m + 1], 0x44), _mm512_shuffle_ps(b[2 * m], b[2 * m + 1], 0xEE));
    /* block k: the sums of v[k], v[4 + k], v[8 + k], v[12 + k] */
    return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
}

/* The decode scan (engine.h, scan_decode) 16 channels at a time: per channel and 16 states one exp, one
 * FMA and the dot product with C kept as a vector; the group's 16 dot products then sum in one transposed
 * reduction (sum16x16). A and the state stream from memory (a layer's are 2 x d_inner x N floats), one
 * line each per channel for N = 16, prefetched as the products prefetch their streams. N not a multiple
 * of 16: scan_step per channel. */
void sb_scan_decode_avx512(int N, const float *A, const float *D, const float *dt, const float *x, const float *B,
                           const float *C, float *s, float *y, int c0, int c1) {
    if (N % 16) {
        sb_scan_decode_steps(sb_scan_step_avx512, N, A, D, dt, x, B, C, s, y, c0, c1);
        return;
    }
    size_t pf = sb_v2_prefetch_bytes();
    for (int g = c0; g < c1; g += 16) {
        int mc = c1 - g < 16 ? c1 - g : 16;
        __m512 acc[16];
#pragma GCC unroll 16
        for (int l = 0; l < 16; l++) {
            __m512 dot = _mm512_setzero_ps();
            if (l < mc) {
                int c = g + l;
                const float *a = A + (size_t)c * N;
                float *h = s + (size_t)c * N;
                __m512 vdt = _mm512_set1_ps(dt[c]), vdtx = _mm512_set1_ps(dt[c] * x[c]);
                for (int n = 0; n < N; n += 16) {
                    _mm_prefetch((const char *)(a + n) + pf, _MM_HINT_T0);
                    _mm_prefetch((const char *)(h + n) + pf, _MM_HINT_T0);
                    __m512 hn = _mm512_fmadd_ps(v_exp_neg(_mm512_mul_ps(vdt, _mm512_loadu_ps(a + n))), _mm512_loadu_ps(h + n),
                                                _mm512_mul_ps(vdtx, _mm512_loadu_ps(B + n)));
                    _mm512_storeu_ps(h + n, hn);
                    dot = _mm512_fmadd_ps(hn, _mm512_loadu_ps(C + n), dot);
                }
            }
            acc[4 * (l % 4) + l / 4] = dot;
        }
        __mmask16 m = (__mmask16)((1u << mc) - 1);
        __m512 xv = _mm512_maskz_loadu_ps(m, x + g);
        _mm512_mask_storeu_ps(y + g, m, _mm512_add_ps(sum16x16(acc), _mm512_mul_ps(_mm512_maskz_loadu_ps(m, D + g), xv)));
    }
}

/* The prefill scan with 16 channels in lanes (engine.h, scan_chunk): per token and state n one exp of the
 * 16 channels' Δ A, the state update and the output's FMA with B and C broadcast, no horizontal sum.
 * N = 16 (every Mamba-1) keeps the 16 states in registers; other N keep them in a small array. */
static inline void scan16(int N, int T, const float *at, float *h, const __m512 vD, const float *dt, const float *x,
                          __m512i rows, __mmask16 m, const float *B, const float *C, float *y) {
    __m512 hr[16];
    if (N == 16)
        for (int n = 0; n < 16; n++) hr[n] = _mm512_load_ps(h + 16 * n);
    for (int t = 0; t < T; t++) {
        __m512 d = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, rows, dt + t, 4);
        __m512 xc = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, rows, x + t, 4);
        __m512 dx = _mm512_mul_ps(d, xc), acc = _mm512_mul_ps(vD, xc);
        const float *Bt = B + (size_t)t * N, *Ct = C + (size_t)t * N;
        if (N == 16) {
#pragma GCC unroll 16
            for (int n = 0; n < 16; n++) {
                hr[n] = _mm512_fmadd_ps(v_exp_neg(_mm512_mul_ps(d, _mm512_load_ps(at + 16 * n))), hr[n],
                                        _mm512_mul_ps(dx, _mm512_set1_ps(Bt[n])));
                acc = _mm512_fmadd_ps(hr[n], _mm512_set1_ps(Ct[n]), acc);
            }
        } else {
            for (int n = 0; n < N; n++) {
                __m512 hn = _mm512_fmadd_ps(v_exp_neg(_mm512_mul_ps(d, _mm512_load_ps(at + 16 * n))), _mm512_load_ps(h + 16 * n),
                                            _mm512_mul_ps(dx, _mm512_set1_ps(Bt[n])));
                _mm512_store_ps(h + 16 * n, hn);
                acc = _mm512_fmadd_ps(hn, _mm512_set1_ps(Ct[n]), acc);
            }
        }
        _mm512_mask_i32scatter_ps(y + t, m, rows, acc, 4);
    }
    if (N == 16)
        for (int n = 0; n < 16; n++) _mm512_store_ps(h + 16 * n, hr[n]);
}

void sb_scan_chunk_avx512(int N, int T, const float *A, const float *D, const float *dt, const float *x, int ld,
                          const float *B, const float *C, float *s, float *y, int c0, int c1) {
    for (int g0 = c0; g0 < c1; g0 += 16) {
        int mc = c1 - g0 < 16 ? c1 - g0 : 16;
        if (N > 64) { /* states past 64: the step kernel */
            sb_scan_chunk_steps(sb_scan_step_avx512, N, T, A, D, dt, x, ld, B, C, s, y, g0, g0 + mc);
            continue;
        }
        _Alignas(64) float at[16 * 64], h[16 * 64]; /* (N, 16 channels): A and the states transposed */
        for (int n = 0; n < N; n++)
            for (int l = 0; l < 16; l++) {
                at[16 * n + l] = l < mc ? A[(size_t)(g0 + l) * N + n] : 0.0f;
                h[16 * n + l] = l < mc ? s[(size_t)(g0 + l) * N + n] : 0.0f;
            }
        __mmask16 m = (__mmask16)((1u << mc) - 1);
        __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(ld));
        __m512 vD = _mm512_maskz_loadu_ps(m, D + g0);
        size_t o = (size_t)g0 * ld;
        if (N == 16) scan16(16, T, at, h, vD, dt + o, x + o, rows, m, B, C, y + o);
        else scan16(N, T, at, h, vD, dt + o, x + o, rows, m, B, C, y + o);
        for (int n = 0; n < N; n++)
            for (int l = 0; l < mc; l++) s[(size_t)(g0 + l) * N + n] = h[16 * n + l];
    }
}

/* Mamba-2 prefill (mamba2.h, sb_ssd_chunk_fn): per block of 16 channels and 16 states, the block's state
 * transposed into 16 registers (register n: state n of the 16 channels) and run over all T tokens:
 * per token and state one multiply of the channels' dtx by B_t[n] broadcast, one FMA with the decay and
 * one FMA of C_t[n] into the output, so the state stays in registers and no sum is horizontal. The
 * outputs of a token add up over the N / 16 state blocks in a small token-major buffer. */
void sb_ssd_chunk_avx512(int p, int N, int T, const float *decay, const float *dtx, const float *B, const float *C,
                         int ldbc, float *S, float *y, int ldy) {
    _Alignas(64) float ybuf[256 * 16], blk[16 * 16];
    for (int t0 = 0; t0 < T; t0 += 256) {
        int nt = T - t0 < 256 ? T - t0 : 256;
        for (int c0 = 0; c0 < p; c0 += 16) {
            for (int n0 = 0; n0 < N; n0 += 16) {
                __m512 h[16];
                for (int l = 0; l < 16; l++) /* S[c0 + l][n0 .. n0 + 15] -> column l of blk */
                    for (int n = 0; n < 16; n++) blk[16 * n + l] = S[(size_t)(c0 + l) * N + n0 + n];
                for (int n = 0; n < 16; n++) h[n] = _mm512_load_ps(blk + 16 * n);
                for (int t = 0; t < nt; t++) {
                    const float *Bt = B + (size_t)(t0 + t) * ldbc + n0, *Ct = C + (size_t)(t0 + t) * ldbc + n0;
                    __m512 d = _mm512_set1_ps(decay[t0 + t]), x = _mm512_loadu_ps(dtx + (size_t)(t0 + t) * p + c0);
                    __m512 acc = n0 ? _mm512_load_ps(ybuf + 16 * t) : _mm512_setzero_ps();
#pragma GCC unroll 16
                    for (int n = 0; n < 16; n++) {
                        h[n] = _mm512_fmadd_ps(d, h[n], _mm512_mul_ps(x, _mm512_set1_ps(Bt[n])));
                        acc = _mm512_fmadd_ps(h[n], _mm512_set1_ps(Ct[n]), acc);
                    }
                    _mm512_store_ps(ybuf + 16 * t, acc);
                }
                for (int n = 0; n < 16; n++) _mm512_store_ps(blk + 16 * n, h[n]);
                for (int l = 0; l < 16; l++)
                    for (int n = 0; n < 16; n++) S[(size_t)(c0 + l) * N + n0 + n] = blk[16 * n + l];
            }
            for (int l = 0; l < 16; l++) /* the token-major outputs into y's channel rows */
                for (int t = 0; t < nt; t++) y[(size_t)(c0 + l) * ldy + t0 + t] = ybuf[16 * t + l];
        }
    }
}

/* The read probe's reader (sb_read_bandwidth): one 64-byte load per line (with 32-byte loads the same
 * sum reads ~7% slower on Intel: two load uops per line fill the out-of-order window with half as many
 * lines in flight). One stream: each line prefetched sb_v2_prefetch_bytes ahead into L1, as the decode
 * kernels prefetch their streams. Several streams: one line of each part in turn, with that prefetch
 * or none; on the Intel Xeon here 4-8 streams read ~18% faster than one (more hardware prefetch streams
 * in flight), and 4 prefetched streams are what the decode kernels read. bench/README.md has the
 * figures. */
/* S parts side by side, two lines of each in turn (a[] by line: any S), each line prefetched pf bytes
 * ahead where pf is not 0; S a constant where inlined, so that a[] stays in registers */
static inline __attribute__((always_inline)) void read_parts(const float *x, size_t part, int S, __m512 a[8], size_t pf) {
    for (size_t i = 0; i < part; i += 32)
        for (int s = 0; s < S; s++) {
            const float *p = x + (size_t)s * part + i;
            if (pf) {
                _mm_prefetch((const char *)p + pf, _MM_HINT_T0);
                _mm_prefetch((const char *)(p + 16) + pf, _MM_HINT_T0);
            }
            a[2 * s & 7] = _mm512_add_ps(a[2 * s & 7], _mm512_loadu_ps(p));
            a[(2 * s + 1) & 7] = _mm512_add_ps(a[(2 * s + 1) & 7], _mm512_loadu_ps(p + 16));
        }
}

float sb_read_sum_avx512(const float *x, size_t n, int streams, int prefetch) {
    __m512 a[8];
    for (int l = 0; l < 8; l++) a[l] = _mm512_setzero_ps();
    size_t part = n / (size_t)(streams > 0 ? streams : 1), pfb = prefetch ? sb_v2_prefetch_bytes() : 0;
    if (streams == 8) read_parts(x, part, 8, a, pfb);
    else if (streams == 4) read_parts(x, part, 4, a, pfb);
    else if (streams > 1) read_parts(x, part, streams, a, pfb);
    else {
        size_t pf = pfb, i = 0;
        for (; i + 128 <= n; i += 128) {
            for (int l = 0; l < 8; l++) {
                _mm_prefetch((const char *)(x + i + 16 * l) + pf, _MM_HINT_T0);
                a[l] = _mm512_add_ps(a[l], _mm512_loadu_ps(x + i + 16 * l));
            }
        }
        for (int l = 0; i < n; i += 16, l++) a[l] = _mm512_add_ps(a[l], _mm512_loadu_ps(x + i)); /* a 64 tail */
    }
    for (int l = 1; l < 8; l++) a[0] = _mm512_add_ps(a[0], a[l]);
    return _mm512_reduce_add_ps(a[0]);
}
