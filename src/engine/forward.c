/* The forward pass: the state, decode (one token, vectors) and prefill (a chunk of tokens at once, with
 * channel-major activations X[channel * ldx + t] so that every matrix is a sparse x dense GEMM and
 * every per-channel op — conv, scan, gate — walks contiguous memory). The fusions of the design are
 * loops here: RMSNorm's weight is folded into in_proj by the compiler and its scale applied while
 * normalising; conv1d + SiLU, dt_proj + softplus, scan + D skip + SiLU(z) gate each run as one pass;
 * out_proj accumulates straight into the residual stream. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"

#define PREFILL_CHUNK 256 /* longer prompts run in chunks: bounded scratch, state carried */

static int pad16(int n) { return (n + 15) / 16 * 16 + 16; }

struct sb_state {
    const sb_model *m;
    float *conv, *ssm; /* (L, di, K-1) and (L, di, N) */
    /* decode scratch: inputs to matrices are padded with zeros (kernels read whole groups) */
    float *h, *un, *xz, *xc, *xdbl, *dtin, *dt, *y;
    /* prefill scratch for up to cap columns */
    int cap;
    float *H, *HN, *XZ, *XC, *XDBL, *DTIN, *DT, *Y, *BT, *CT, *rs;
    void *gscratch;
    int gthreads;
    size_t gsize;
};

/* ---------------------------------------------------------------- small ops */

/* y[i] = bias[i] (or 0): the kernels accumulate, and removed rows must read as the bias alone */
static void fill_bias(float *y, const float *bias, int n) {
    if (bias) memcpy(y, bias, sizeof(float) * (size_t)n);
    else memset(y, 0, sizeof(float) * (size_t)n);
}

/* the embedding row of token t, as fp32 */
static void embed(const sb_model *m, int32_t tok, float *out, int stride) {
    const sb_class *e = &m->embd.cls[0];
    float s = e->scale ? e->scale[tok] : 1.0f;
    for (int j = 0; j < e->len; j++) out[(size_t)j * stride] = sb_value(e, tok, j) * s;
}

/* ---------------------------------------------------------------- state */

static void free_prefill(sb_state *s) {
    float **bufs[] = {&s->H, &s->HN, &s->XZ, &s->XC, &s->XDBL, &s->DTIN, &s->DT, &s->Y, &s->BT, &s->CT, &s->rs};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) {
        free(*bufs[i]);
        *bufs[i] = NULL;
    }
    free(s->gscratch);
    s->gscratch = NULL;
    s->cap = 0;
}

void sb_state_free(sb_state *s) {
    if (!s) return;
    free_prefill(s);
    float *bufs[] = {s->conv, s->ssm, s->h, s->un, s->xz, s->xc, s->xdbl, s->dtin, s->dt, s->y};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) free(bufs[i]);
    free(s);
}

void sb_state_reset(sb_state *s) {
    const sb_info *I = &s->m->info;
    memset(s->conv, 0, sizeof(float) * (size_t)I->n_layer * I->d_inner * (I->d_conv - 1 ? I->d_conv - 1 : 1));
    memset(s->ssm, 0, sizeof(float) * (size_t)I->n_layer * I->d_inner * I->d_state);
}

int sb_state_new(const sb_model *m, sb_state **out, char *err, size_t errlen) {
    const sb_info *I = &m->info;
    int d = I->d_model, di = I->d_inner, N = I->d_state, R = I->dt_rank, K = I->d_conv;
    sb_state *s = calloc(1, sizeof *s);
    *out = NULL;
    if (!s) goto oom;
    s->m = m;
    s->conv = calloc((size_t)I->n_layer * di * (K > 1 ? K - 1 : 1), sizeof(float));
    s->ssm = calloc((size_t)I->n_layer * di * N, sizeof(float));
    s->h = calloc((size_t)pad16(d), sizeof(float));
    s->un = calloc((size_t)pad16(d), sizeof(float));
    s->xz = calloc((size_t)pad16(2 * di), sizeof(float));
    s->xc = calloc((size_t)pad16(di), sizeof(float));
    s->xdbl = calloc((size_t)pad16(R + 2 * N), sizeof(float));
    s->dtin = calloc((size_t)pad16(R), sizeof(float));
    s->dt = calloc((size_t)pad16(di), sizeof(float));
    s->y = calloc((size_t)pad16(di), sizeof(float));
    if (!s->conv || !s->ssm || !s->h || !s->un || !s->xz || !s->xc || !s->xdbl || !s->dtin || !s->dt || !s->y)
        goto oom;
    *out = s;
    return SB_OK;
oom:
    sb_state_free(s);
    snprintf(err, errlen, "out of memory allocating the state (d_inner %d, d_state %d, %d layers)", di, N,
             I->n_layer);
    return SB_ERR_NOMEM;
}

static int grow_prefill(sb_state *s, int T) {
    int threads = sb_n_threads();
    if (T <= s->cap && threads <= s->gthreads) return SB_OK;
    free_prefill(s);
    const sb_info *I = &s->m->info;
    int d = I->d_model, di = I->d_inner, N = I->d_state, R = I->dt_rank;
    /* rows a multiple of 8 floats apart, but not of 64: a power-of-two stride would put every
     * channel row of a GEMM slab in the same few L1 sets */
    size_t ldx = (size_t)(T + 7) / 8 * 8;
    if (ldx % 64 == 0) ldx += 8;
    /* calloc: padding rows must read as zeros, and padding columns must hold numbers */
    s->H = calloc((size_t)pad16(d) * ldx, sizeof(float));
    s->HN = calloc((size_t)pad16(d) * ldx, sizeof(float));
    s->XZ = calloc((size_t)pad16(2 * di) * ldx, sizeof(float));
    s->XC = calloc((size_t)pad16(di) * ldx, sizeof(float));
    s->XDBL = calloc((size_t)pad16(R + 2 * N) * ldx, sizeof(float));
    s->DTIN = calloc((size_t)pad16(R) * ldx, sizeof(float));
    s->DT = calloc((size_t)pad16(di) * ldx, sizeof(float));
    s->Y = calloc((size_t)pad16(di) * ldx, sizeof(float));
    s->BT = calloc(ldx * (size_t)N, sizeof(float));
    s->CT = calloc(ldx * (size_t)N, sizeof(float));
    s->rs = calloc(ldx, sizeof(float));
    int maxin = d > di ? d : di;
    s->gsize = (SB_GEMM_SCRATCH((maxin + 3) / 4) + 63) / 64 * 64;
    s->gscratch = aligned_alloc(64, s->gsize * (size_t)threads);
    if (!s->H || !s->HN || !s->XZ || !s->XC || !s->XDBL || !s->DTIN || !s->DT || !s->Y || !s->BT || !s->CT ||
        !s->rs || !s->gscratch) {
        free_prefill(s);
        return SB_ERR_NOMEM;
    }
    s->cap = (int)ldx;
    s->gthreads = threads;
    return SB_OK;
}

/* ---------------------------------------------------------------- decode: one token */

static void rmsnorm_vec(const float *h, const float *w, float eps, int d, float *out) {
    double ss = 0.0;
    for (int j = 0; j < d; j++) ss += (double)h[j] * h[j];
    float r = 1.0f / sqrtf((float)(ss / d) + eps);
    for (int j = 0; j < d; j++) out[j] = h[j] * r * (w ? w[j] : 1.0f);
}

static void decode_layer(const sb_model *m, sb_state *s, int i, const sb_kernels *k) {
    const sb_info *I = &m->info;
    const sb_layer *ly = &m->layers[i];
    int d = I->d_model, di = I->d_inner, N = I->d_state, R = I->dt_rank, K = I->d_conv;
    rmsnorm_vec(s->h, ly->norm, m->eps, d, s->un);
    fill_bias(s->xz, ly->in.bias, 2 * di);
    sb_linear_vec(k, &ly->in, s->un, s->xz);
    float *cst = s->conv + (size_t)i * di * (K > 1 ? K - 1 : 1);
    for (int c = 0; c < di; c++) { /* conv1d + SiLU, window shifted in place */
        const float *w = ly->conv_w + (size_t)c * K;
        float *st = cst + (size_t)c * (K - 1), x = s->xz[c], acc = ly->conv_b[c] + w[K - 1] * x;
        for (int j = 0; j < K - 1; j++) acc += w[j] * st[j];
        for (int j = 0; j + 1 < K - 1; j++) st[j] = st[j + 1];
        if (K > 1) st[K - 2] = x;
        s->xc[c] = acc;
    }
    k->silu(s->xc, di);
    memset(s->xdbl, 0, sizeof(float) * (size_t)(R + 2 * N));
    sb_linear_vec(k, &ly->x, s->xc, s->xdbl);
    memcpy(s->dtin, s->xdbl, sizeof(float) * (size_t)R);
    fill_bias(s->dt, ly->dt_bias, di);
    sb_linear_vec(k, &ly->dt, s->dtin, s->dt);
    k->softplus(s->dt, di);
    const float *B = s->xdbl + R, *C = s->xdbl + R + N;
    float *ssm = s->ssm + (size_t)i * di * N;
#pragma omp parallel for schedule(static) if (di * N > 8192)
    for (int c = 0; c < di; c++) { /* scan step + D skip */
        float dt = s->dt[c], x = s->xc[c], yc;
        k->scan_step(N, ly->A + (size_t)c * N, dt, dt * x, B, C, ssm + (size_t)c * N, &yc);
        s->y[c] = yc + ly->D[c] * x;
    }
    k->mul_silu(s->y, s->xz + di, di); /* the SiLU(z) gate */
    if (ly->out.bias)
        for (int j = 0; j < d; j++) s->h[j] += ly->out.bias[j];
    sb_linear_vec(k, &ly->out, s->y, s->h); /* out_proj accumulates into the residual */
}

static void head_vec(const sb_model *m, sb_state *s, const sb_kernels *k, float *logits) {
    rmsnorm_vec(s->h, m->out_norm, m->eps, m->info.d_model, s->un);
    memset(logits, 0, sizeof(float) * (size_t)m->info.vocab_size);
    sb_linear_vec(k, &m->head, s->un, logits);
}

/* ---------------------------------------------------------------- prefill: T tokens at once */

static void prefill_chunk(const sb_model *m, sb_state *s, const int32_t *tok, int T, float *logits, int mode) {
    const sb_info *I = &m->info;
    const sb_kernels *k = sb_active_kernels();
    int d = I->d_model, di = I->d_inner, N = I->d_state, R = I->dt_rank, K = I->d_conv, ldx = s->cap;
    void *scr = s->gscratch;
    size_t ss = s->gsize;
    for (int t = 0; t < T; t++) embed(m, tok[t], s->H + t, ldx);
    for (int i = 0; i < I->n_layer; i++) {
        const sb_layer *ly = &m->layers[i];
        /* RMSNorm: per-token scale, then channel rows scaled (weight only when not folded) */
        for (int t = 0; t < T; t++) s->rs[t] = 0.0f;
        for (int c = 0; c < d; c++)
            for (int t = 0; t < T; t++) s->rs[t] += s->H[(size_t)c * ldx + t] * s->H[(size_t)c * ldx + t];
        for (int t = 0; t < T; t++) s->rs[t] = 1.0f / sqrtf(s->rs[t] / d + m->eps);
        for (int c = 0; c < d; c++) {
            float w = ly->norm ? ly->norm[c] : 1.0f;
            for (int t = 0; t < T; t++) s->HN[(size_t)c * ldx + t] = s->H[(size_t)c * ldx + t] * s->rs[t] * w;
        }
        for (int c = 0; c < 2 * di; c++) {
            float b = ly->in.bias ? ly->in.bias[c] : 0.0f;
            for (int t = 0; t < ldx; t++) s->XZ[(size_t)c * ldx + t] = b;
        }
        sb_linear_mat(k, &ly->in, s->HN, ldx, T, s->XZ, scr, ss);
        float *cst = s->conv + (size_t)i * di * (K > 1 ? K - 1 : 1);
#pragma omp parallel for schedule(static)
        for (int c = 0; c < di; c++) { /* conv1d + SiLU over the chunk, carried window first */
            const float *w = ly->conv_w + (size_t)c * K, *x = s->XZ + (size_t)c * ldx;
            float *st = cst + (size_t)c * (K - 1), *xc = s->XC + (size_t)c * ldx;
            for (int t = 0; t < T; t++) {
                float acc = ly->conv_b[c];
                for (int j = 0; j < K; j++) {
                    int src = t - (K - 1) + j; /* < 0: from the carried window */
                    acc += w[j] * (src >= 0 ? x[src] : st[K - 1 + src]);
                }
                xc[t] = acc;
            }
            k->silu(xc, T);
            for (int j = 0; j < K - 1; j++) { /* the new window: the last K-1 inputs */
                int src = T - (K - 1) + j;
                st[j] = src >= 0 ? x[src] : st[K - 1 + src]; /* T < K - 1: an old input */
            }
        }
        memset(s->XDBL, 0, sizeof(float) * (size_t)(R + 2 * N) * ldx);
        sb_linear_mat(k, &ly->x, s->XC, ldx, T, s->XDBL, scr, ss);
        memcpy(s->DTIN, s->XDBL, sizeof(float) * (size_t)R * ldx);
        for (int c = 0; c < di; c++)
            for (int t = 0; t < ldx; t++) s->DT[(size_t)c * ldx + t] = ly->dt_bias[c];
        sb_linear_mat(k, &ly->dt, s->DTIN, ldx, T, s->DT, scr, ss);
        for (int n = 0; n < N; n++) /* B, C token-major: the scan reads all N of one token at once */
            for (int t = 0; t < T; t++) {
                s->BT[(size_t)t * N + n] = s->XDBL[(size_t)(R + n) * ldx + t];
                s->CT[(size_t)t * N + n] = s->XDBL[(size_t)(R + N + n) * ldx + t];
            }
        float *ssm = s->ssm + (size_t)i * di * N;
#pragma omp parallel for schedule(static)
        for (int c = 0; c < di; c++) {
            const float *A = ly->A + (size_t)c * N, *xc = s->XC + (size_t)c * ldx, *z = s->XZ + (size_t)(di + c) * ldx;
            float *dtr = s->DT + (size_t)c * ldx, *y = s->Y + (size_t)c * ldx, *h = ssm + (size_t)c * N;
            k->softplus(dtr, T);
            for (int t = 0; t < T; t++) {
                float dt = dtr[t], yc;
                k->scan_step(N, A, dt, dt * xc[t], s->BT + (size_t)t * N, s->CT + (size_t)t * N, h, &yc);
                y[t] = yc + ly->D[c] * xc[t];
            }
            k->mul_silu(y, z, T);
        }
        if (ly->out.bias)
            for (int c = 0; c < d; c++)
                for (int t = 0; t < T; t++) s->H[(size_t)c * ldx + t] += ly->out.bias[c];
        sb_linear_mat(k, &ly->out, s->Y, ldx, T, s->H, scr, ss);
    }
    /* logits only where asked: the last position, or (tests, scoring) every position */
    for (int t = mode == 2 ? 0 : T - 1; mode && t < T; t++) {
        for (int c = 0; c < d; c++) s->h[c] = s->H[(size_t)c * ldx + t];
        head_vec(m, s, k, logits + (mode == 2 ? (size_t)t * I->vocab_size : 0));
    }
    for (int c = 0; c < d; c++) s->h[c] = s->H[(size_t)c * ldx + T - 1];
}

/* the checks every backend makes before a forward, with the same messages */
int sb_check_forward(const sb_model *m, const int32_t *tokens, int32_t n, const float *logits, int32_t mode, char *err,
                     size_t errlen) {
    if (n <= 0) {
        snprintf(err, errlen, "no tokens to run (n = %d); give at least one token", n);
        return SB_ERR_ARG;
    }
    if (mode < 0 || mode > 2 || (mode && !logits)) {
        snprintf(err, errlen, "logits_mode %d is not 0, 1 or 2 (or no logits buffer given)", mode);
        return SB_ERR_ARG;
    }
    for (int t = 0; t < n; t++)
        if (tokens[t] < 0 || tokens[t] >= m->info.vocab_size) {
            snprintf(err, errlen, "token %d at position %d is outside the vocabulary (0 to %d)", tokens[t], t,
                     m->info.vocab_size - 1);
            return SB_ERR_ARG;
        }
    return SB_OK;
}

int sb_forward(const sb_model *m, sb_state *s, const int32_t *tokens, int32_t n, float *logits, int32_t mode,
               char *err, size_t errlen) {
    const sb_info *I = &m->info;
    int rc = sb_check_forward(m, tokens, n, logits, mode, err, errlen);
    if (rc) return rc;
    if (s->m != m) {
        snprintf(err, errlen, "the state belongs to another model");
        return SB_ERR_ARG;
    }
    const sb_kernels *k = sb_active_kernels();
    if (n == 1) {
        embed(m, tokens[0], s->h, 1);
        for (int i = 0; i < I->n_layer; i++) decode_layer(m, s, i, k);
        if (mode) head_vec(m, s, k, logits);
        return SB_OK;
    }
    for (int t0 = 0; t0 < n; t0 += PREFILL_CHUNK) {
        int T = n - t0 < PREFILL_CHUNK ? n - t0 : PREFILL_CHUNK;
        if (grow_prefill(s, T > 8 ? T : 8)) {
            snprintf(err, errlen, "out of memory allocating prefill buffers for %d tokens", T);
            return SB_ERR_NOMEM;
        }
        int last = t0 + T == n;
        prefill_chunk(m, s, tokens + t0, T, mode == 2 ? logits + (size_t)t0 * I->vocab_size : logits,
                      mode == 2 ? 2 : (last ? mode : 0));
    }
    return SB_OK;
}
