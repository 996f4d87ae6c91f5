/* Mamba-2 in the engine (`sparsamba.mamba2` files, docs/packed-format.md "Mamba-2"): the model's
 * views, its loader (model_mamba2.c), its forward (forward_mamba2.c) and its one new kernel, the SSD
 * state step of one head (cpu/ssd*.c). The matrix products and the per-channel silu / softplus / gate
 * are the Mamba-1 kernels (sb_kernels).
 * Letters: h heads of p channels (di = h p), g groups of B/C (N each), cd = di + 2 g N conv channels. */
#ifndef SB_MAMBA2_H
#define SB_MAMBA2_H

#include "engine.h"

typedef struct {
    const float *norm;      /* attn_norm (d,), NULL when folded into ssm_in */
    sb_linear in, out;      /* ssm_in (di + cd + h, d): rows [z | x | B | C | dt]; ssm_out (d, di) */
    const float *conv_w;    /* (cd, K) */
    const float *conv_wt;   /* conv_w tap-major (K, cd), as the decode conv reads it: a view into sb_m2.conv_wt */
    const float *conv_b;    /* (cd,) */
    const float *dt_bias;   /* (h,) */
    const float *A, *D;     /* (h,): A = -exp(A_log) */
    const float *gnorm;     /* ssm_norm (di,), NULL when folded into ssm_out's columns */
} sb_m2_layer;

typedef struct sb_m2 {
    int d, di, N, K, h, p, g, cd, n_in; /* n_in = di + cd + h, ssm_in's rows */
    float dt_min, dt_max;               /* Δ clamped into [dt_min, dt_max] (dt_max may be +inf) */
    sb_m2_layer *layers;                /* (L,) */
    float *conv_wt;                     /* every layer's conv_w tap-major (owned) */
} sb_m2;

/* The loader's checked accessors (model.c), for an architecture's own loader */
typedef struct sb_loader sb_loader;
sb_model *sb_loader_model(sb_loader *L);
int sb_load_err(sb_loader *L, const char *fmt, ...);
const gg_tensor *sb_load_tensor(sb_loader *L, const char *name, uint32_t type, uint64_t rows, uint64_t cols, int *rc);
const float *sb_load_vec(sb_loader *L, const char *name, uint64_t n, int *rc);
int sb_load_linear(sb_loader *L, const char *prefix, int out, int in, sb_linear *lin, int64_t *bytes);
int sb_load_no_leftovers(sb_loader *L, const char *arch);

int sb_m2_load(sb_loader *L); /* after general.architecture = sparsamba.mamba2 */
void sb_m2_free(sb_m2 *m2);

typedef struct sb_m2_state sb_m2_state;
int sb_m2_state_new(const sb_model *m, sb_m2_state **out, char *err, size_t errlen);
void sb_m2_state_reset(sb_m2_state *s);
void sb_m2_state_free(sb_m2_state *s);
/* sb_forward for a Mamba-2 model (tokens, count and mode already checked) */
int sb_m2_forward(const sb_model *m, sb_m2_state *s, const int32_t *tokens, int32_t n, float *logits, int32_t mode,
                  char *err, size_t errlen);

/* One head's state step over its p channels (S row-major (p, N)):
 *     S[c] = decay * S[c] + dtx[c] * B,   y[c] = S[c] . C
 * decay = exp(Δ A) and dtx = Δ x computed by the caller. */
typedef void (*sb_ssd_head_fn)(int p, int N, float decay, const float *dtx, const float *B, const float *C, float *S,
                               float *y);
void sb_ssd_head_ref(int p, int N, float decay, const float *dtx, const float *B, const float *C, float *S, float *y);
#if defined(__x86_64__) || defined(_M_X64)
void sb_ssd_head_avx2(int p, int N, float decay, const float *dtx, const float *B, const float *C, float *S, float *y);
#endif
#if defined(__aarch64__)
void sb_ssd_head_neon(int p, int N, float decay, const float *dtx, const float *B, const float *C, float *S, float *y);
#endif
/* the SSD step of a kernel family: its SIMD twin, or the scalar reference */
sb_ssd_head_fn sb_ssd_head_for(const sb_kernels *k);

/* Prefill: one head's state over T tokens (the step above, token after token):
 *     S[c] = decay[t] * S[c] + dtx[t * p + c] * B_t,   y[c * ldy + t] = S[c] . C_t     (B_t = B + t * ldbc)
 * The AVX-512 (AVX2) version holds 16 x 16 (8 x 8) channels x states in registers over all T tokens
 * (channels in lanes, no horizontal sum); it takes p and N multiples of 16 (8); sb_ssd_chunk_for gives
 * NULL elsewhere, where the forward runs the step per token. sb_ssd_chunk_ref is the definition. */
typedef void (*sb_ssd_chunk_fn)(int p, int N, int T, const float *decay, const float *dtx, const float *B, const float *C,
                                int ldbc, float *S, float *y, int ldy);
void sb_ssd_chunk_ref(int p, int N, int T, const float *decay, const float *dtx, const float *B, const float *C, int ldbc,
                      float *S, float *y, int ldy);
#if defined(__x86_64__) || defined(_M_X64)
void sb_ssd_chunk_avx2(int p, int N, int T, const float *decay, const float *dtx, const float *B, const float *C, int ldbc,
                       float *S, float *y, int ldy);
void sb_ssd_chunk_avx512(int p, int N, int T, const float *decay, const float *dtx, const float *B, const float *C,
                         int ldbc, float *S, float *y, int ldy);
#endif
sb_ssd_chunk_fn sb_ssd_chunk_for(const sb_kernels *k, int p, int N);

#endif
