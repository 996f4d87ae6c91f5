/* Internal structures of the engine: the model as views into the mapped file, and the kernel
 * table that the scalar reference and each SIMD family fill in. */
#ifndef SB_ENGINE_H
#define SB_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "cpu/linear_v2.h"
#include "gguf.h"
#include "sparsamba.h"

/* One matrix (out, in): its packed-format-v2 blob, checked at load (cpu/linear_v2.h), viewed in place */
typedef struct {
    int out, in;
    sb_v2_matrix w;       /* classes n ascending, views into the mapping */
    const float *bias;    /* (out,) or NULL */
    size_t bytes;         /* the blob's size: what one product reads */
} sb_linear;

typedef struct {
    const float *norm;    /* attn_norm (d,), NULL when folded into in_proj */
    sb_linear in, x, dt, out;
    const float *conv_w, *conv_b, *A, *D, *dt_bias;
    const float *conv_wt; /* conv_w tap-major (K, di), as the decode conv reads it: a view into sb_model.conv_wt */
} sb_layer;

struct sb_model {
    void *map;
    size_t map_size;
    gg_file gf;
    sb_info info;
    float eps;
    sb_linear embd;       /* (V, d), one n = 0 class in token order: the embedding, and the head when tied */
    sb_linear head;       /* the LM head (a copy of embd's description when tied) */
    const float *out_norm;
    sb_layer *layers;     /* Mamba-1 blocks; NULL for Mamba-2 */
    float *conv_wt;       /* every layer's conv_w transposed (owned; Mamba-1) */
    struct sb_m2 *m2;     /* Mamba-2 dims and blocks (mamba2.h); NULL for Mamba-1 */
};

/* Kernels: the matrix products of packed format v2 (cpu/linear_v2.h: y[index[r]] += W_r . x for the
 * blocks [b0, b1) of one class, on activations prepared once per product), and the per-channel ops. */
typedef struct {
    const char *name;
    sb_v2_gemv_fn gemv;
    sb_v2_gemm_fn gemm;
    void (*scan_step)(int N, const float *A, float dt, float dtx, const float *B, const float *C,
                      float *s, float *yc); /* s = exp(dt*A)*s + dtx*B ; *yc = s . C */
    void (*silu)(float *x, int n);                   /* x = x * sigmoid(x), in place */
    void (*softplus)(float *x, int n);               /* x = log(1 + e^x) (x above 20 stays x) */
    void (*mul_silu)(float *y, const float *z, int n); /* y = y * silu(z): the gate */
    /* the read probe's reader: the sum of x[0..n) read as `streams` equal contiguous parts side by side
     * (n a multiple of 64 * streams), each line prefetched as the decode kernels prefetch their streams
     * where `prefetch` is set (sb_v2_prefetch_bytes ahead; the scalar family ignores it) */
    float (*read_sum)(const float *x, size_t n, int streams, int prefetch);
    /* Prefill scan (Mamba-1) of channels [c0, c1) (at most 16) over T tokens, the state carried in s:
     *     s_c = exp(Δ A_c) * s_c + Δ x B_t,   y = s_c . C_t + D_c x     (Δ = dt[c][t], x = x[c][t])
     * dt, x, y channel-major rows of stride ld; B, C token-major (T, N); A, s (d_inner, N). NULL in a
     * family without one: the forward runs scan_step token by token. */
    void (*scan_chunk)(int N, int T, const float *A, const float *D, const float *dt, const float *x, int ld,
                       const float *B, const float *C, float *s, float *y, int c0, int c1);
    /* Decode scan (Mamba-1, one token) of channels [c0, c1), Δ already through softplus:
     *     s_c = exp(Δ_c A_c) * s_c + Δ_c x_c B,   y_c = s_c . C + D_c x_c
     * A, s (d_inner, N); dt, x, D, y by channel. The SIMD families take a group of channels at once and
     * sum their dot products with one transposed reduction; sb_scan_decode_steps is the same per channel
     * with a family's scan_step. */
    void (*scan_decode)(int N, const float *A, const float *D, const float *dt, const float *x, const float *B,
                        const float *C, float *s, float *y, int c0, int c1);
    /* the int8 products' activations: xq and xs as sb_v2_quantise_ref makes them (the same bits in every
     * family), and xt where this family's kernels read it (AVX2) */
    sb_v2_quantise_fn quantise;
} sb_kernels;

extern const sb_kernels sb_kernels_ref;
/* scan_chunk's meaning run token by token with a family's scan_step (kernels_ref.c): the reference, and
 * the SIMD families' fallback for states past what their chunk kernels keep in registers */
void sb_scan_chunk_steps(void (*step)(int N, const float *A, float dt, float dtx, const float *B, const float *C,
                                      float *s, float *yc),
                         int N, int T, const float *A, const float *D, const float *dt, const float *x, int ld,
                         const float *B, const float *C, float *s, float *y, int c0, int c1);
/* One token's conv1d (forward.c) of the channels [c0, c1) of cd: xc = b + the K taps over the window (K-1
 * inputs, oldest first) and x, the window then shifted in place. The window and the weights are tap-major,
 * (K-1, cd) and (K, cd), so that every step is a loop over contiguous channels that the compiler
 * vectorises (per channel, scalar, the conv stage took 0.28-0.38 ms of a 130M 50% f16 token, now
 * 0.14-0.16). The sum runs as decode always summed: bias plus the newest tap, then the window oldest to
 * newest (the prefill adds the newest tap last; the two differ by rounding). sb_conv_tap_major writes the
 * (cd, K) weights of a file tap-major. */
void sb_conv_decode(const float *wt, const float *b, float *win, int cd, int K, const float *x, float *xc, int c0,
                    int c1);
void sb_conv_tap_major(float *wt, const float *w, int cd, int K);

/* scan_decode's meaning channel by channel with a family's scan_step (kernels_ref.c): the reference, and
 * the families' fallback for an N their group kernels do not take */
void sb_scan_decode_steps(void (*step)(int N, const float *A, float dt, float dtx, const float *B, const float *C,
                                       float *s, float *yc),
                          int N, const float *A, const float *D, const float *dt, const float *x, const float *B,
                          const float *C, float *s, float *y, int c0, int c1);
#if defined(__x86_64__) || defined(_M_X64)
extern const sb_kernels sb_kernels_avx2;
extern const sb_kernels sb_kernels_avx512; /* AVX-512 products (VNNI at run time) and scan step, AVX2's other ops */
float sb_read_sum_avx512(const float *x, size_t n, int streams, int prefetch); /* n a multiple of 64 * streams */
void sb_scan_step_avx512(int N, const float *A, float dt, float dtx, const float *B, const float *C, float *s,
                         float *yc); /* kernels_avx512.c */
void sb_scan_chunk_avx512(int N, int T, const float *A, const float *D, const float *dt, const float *x, int ld,
                          const float *B, const float *C, float *s, float *y, int c0, int c1);
void sb_silu_avx512(float *x, int n);
void sb_softplus_avx512(float *x, int n);
void sb_mul_silu_avx512(float *y, const float *z, int n);
void sb_scan_decode_avx512(int N, const float *A, const float *D, const float *dt, const float *x, const float *B,
                           const float *C, float *s, float *y, int c0, int c1);
#endif
#if defined(__aarch64__)
extern const sb_kernels sb_kernels_neon;
#endif
/* the family in effect (cpu/dispatch.c): the best this CPU has, unless sb_set_isa forced one */
const sb_kernels *sb_active_kernels(void);
/* tokens, count and logits mode checked as every forward does (the messages users see) */
int sb_check_forward(const sb_model *m, const int32_t *tokens, int32_t n, const float *logits, int32_t mode, char *err,
                     size_t errlen);
/* threads.c: the thread count of the next parallel region, and the products split over it in whole
 * blocks of 16 rows (decode by bytes over all classes, prefill each class evenly). Called inside a parallel region (forward.c opens one per token /
 * per prefill chunk) every thread of the team must call them; called outside one they open their own
 * when the product is large enough. Tiny products run on one thread. Both end with the team synced.
 * sb_linear_vec: y[out] += W a (a prepared by sb_v2_act_set).
 * sb_linear_mat: Y[o * ldy + t] += W act[t] for t < T (channel-major Y, activations per token). */
int sb_n_threads(void);
void sb_linear_vec(const sb_kernels *k, const sb_linear *lin, const sb_v2_act *a, float *y);
void sb_linear_mat(const sb_kernels *k, const sb_linear *lin, const sb_v2_act *act, int T, float *Y, int ldy);
/* Decode inside a parallel region, with no wait (the forward places its barriers): sb_vec_share gives the
 * calling thread's blocks [b0[ci], b1[ci]) of each class (the split of sb_linear_vec; a product under the
 * size floor all thread 0's); sb_linear_vec_part runs that share. */
void sb_vec_share(const sb_linear *lin, int *b0, int *b1);
void sb_linear_vec_part(const sb_kernels *k, const sb_linear *lin, const sb_v2_act *a, float *y);
/* the calling thread's number and its team's size (0 and 1 outside a parallel region) */
int sb_thread_id(void);
int sb_team_size(void);
/* [n * id / nt, n * (id + 1) / nt): the calling thread's slice of n items */
void sb_thread_slice(int n, int *lo, int *hi);
/* y[i] = bias[i] (or 0; the kernels accumulate, and removed rows must read as the bias alone): all n, or
 * the calling thread's slice of them */
void sb_fill_bias(float *y, const float *bias, int n);
void sb_fill_bias_slice(float *y, const float *bias, int n);
/* Decode stage timing (profile.c's sb_profile_decode, forward.c's marks): while sb_decode_stages points
 * at (n_layer + 1) * SB_NSTAGE doubles, each decode step adds the seconds of stage s of block i to
 * [i * SB_NSTAGE + s]; row n_layer holds the embedding lookup, the final norm and the head. */
enum {
    SB_ST_NORM,  /* RMSNorm + in_proj's activations (row n_layer: the final norm) */
    SB_ST_IN,    /* in_proj */
    SB_ST_CONV,  /* conv1d + SiLU + x_proj's activations */
    SB_ST_X,     /* x_proj */
    SB_ST_PREP,  /* dt_proj's and out_proj's activations */
    SB_ST_DT,    /* dt_proj */
    SB_ST_SCAN,  /* softplus, scan step, D skip, SiLU(z) gate */
    SB_ST_OUT,   /* out_proj */
    SB_ST_EMBED, /* the embedding row (row n_layer) */
    SB_ST_HEAD,  /* the LM head product (row n_layer) */
    SB_NSTAGE
};
extern double *sb_decode_stages;
/* While sb_decode_stages is set, the team syncs at the end of each stage and one thread adds the seconds
 * since the previous mark to st[stage] (stage SB_NSTAGE only restarts the clock); off, SB_STAGE is one
 * test per stage. Every thread of the team runs it. */
void sb_stage_mark(double *st, int stage);
#define SB_STAGE(st, stage)                                                                                  \
    do {                                                                                                    \
        if (st) {                                                                                           \
            _Pragma("omp barrier");                                                                         \
            _Pragma("omp master") sb_stage_mark(st, stage);                                                 \
            _Pragma("omp barrier");                                                                         \
        }                                                                                                   \
    } while (0)
/* Every thread of the team (forward.c, forward_mamba2.c): RMSNorm of h (weight norm, or none where the
 * compiler folded it) into its own un / ad, the SB_ST_NORM mark, its share of lin into y (prefilled with
 * the bias), one wait, then the mark of `stage` (a block's in_proj, or the LM head). */
void sb_decode_norm_product(const sb_kernels *k, const float *h, const float *norm, float eps, int d, float *un,
                            sb_v2_act *ad, sb_v2_quantise_fn quantise, const sb_linear *lin, float *y, double *st,
                            int stage);
double sb_now(void); /* CLOCK_MONOTONIC seconds */
/* bytes the profiler spreads its weights over, so that they come from memory: max(64 MiB, 2 x LLC) */
size_t sb_profile_working_set(void);

#endif
