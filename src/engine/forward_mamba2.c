/* The Mamba-2 forward (docs/packed-format.md, "What the engine computes" for sparsamba.mamba2): decode
 * (one token, vectors) and prefill (a chunk of tokens, channel-major activations X[c * ldx + t] as in
 * forward.c, so both matrices are sparse x dense GEMMs and every per-channel op reads a row). The scan
 * of prefill is the recurrence token by token (per head, heads in parallel).
 *
 * The fusions are loops here: the block RMSNorm's weight is folded into ssm_in and the gated norm's
 * into ssm_out by the compiler; conv1d over x, B, C + SiLU is one pass; dt bias + softplus + the
 * time_step_limit clamp one; the state step + D skip + SiLU(z) gate one per head; the group RMSNorm
 * scales y as the activations of ssm_out are prepared; ssm_out accumulates into the residual.
 *
 * Threads: one parallel region per token or chunk, as forward.c: prefill's serial steps in `omp single`,
 * per-channel and per-head loops in `omp for`, the products split by threads.c; decode waits only where
 * a step reads what other threads wrote (decode_layer). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mamba2.h"

#define PREFILL_CHUNK 256

static int pad16(int n) { return (n + 15) / 16 * 16 + 16; }

struct sb_m2_state {
    const sb_model *m;
    int quantise;
    float *conv, *ssm;                 /* (L, K-1, cd): the windows tap-major; (L, h, p, N) */
    float *h, *un, *zxd, *xbc, *y, *dtx; /* decode scratch: (d) (d) (n_in) (cd) (di) (di) */
    sb_v2_act *ad, *adi;
    int cap;                           /* prefill: columns (ldx) of the buffers below */
    float *H, *HN, *ZXD, *XBC, *DT, *Y, *BT, *CT, *rs, *grs; /* grs (g, ldx): the group norm's scales */
    float *XQ;                                               /* int8: a product's input quantised (max(d, di), ldx) */
    float *DTX, *DEC;                                        /* per head Δx token-major (h, ldx, p), exp(Δ A) (h, ldx) */
    sb_v2_act *Ad, *Adi;                                     /* one each: the products read act[0].cm */
    /* decode: each thread's own normed residual and gated-normed y with their activations (forward.c) */
    int nteam;
    struct m2_team_buf {
        float *un, *yn;       /* (d), (di) */
        sb_v2_act *ad, *ao;   /* ssm_in's / the head's (d), ssm_out's (di) */
    } *tb;
};

static int grow_team(sb_m2_state *s, int nt) {
    if (nt <= s->nteam) return SB_OK;
    const sb_m2 *M = s->m->m2;
    struct m2_team_buf *tb = realloc(s->tb, sizeof *tb * (size_t)nt);
    if (!tb) return SB_ERR_NOMEM;
    s->tb = tb;
    for (; s->nteam < nt; s->nteam++) {
        struct m2_team_buf *b = &tb[s->nteam];
        b->un = malloc(sizeof(float) * (size_t)M->d), b->yn = malloc(sizeof(float) * (size_t)M->di);
        b->ad = sb_v2_acts_new(M->d, 1), b->ao = sb_v2_acts_new(M->di, 1);
        if (!b->un || !b->yn || !b->ad || !b->ao) {
            free(b->un), free(b->yn), sb_v2_acts_free(b->ad), sb_v2_acts_free(b->ao);
            return SB_ERR_NOMEM;
        }
    }
    return SB_OK;
}

static size_t conv_len(const sb_m2 *M) { return (size_t)M->cd * (M->K > 1 ? M->K - 1 : 1); }

static void free_prefill(sb_m2_state *s) {
    float **bufs[] = {&s->H, &s->HN, &s->ZXD, &s->XBC, &s->DT, &s->Y, &s->BT, &s->CT, &s->rs, &s->grs, &s->XQ, &s->DTX, &s->DEC};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) {
        free(*bufs[i]);
        *bufs[i] = NULL;
    }
    sb_v2_acts_free(s->Ad), sb_v2_acts_free(s->Adi);
    s->Ad = s->Adi = NULL;
    s->cap = 0;
}

void sb_m2_state_free(sb_m2_state *s) {
    if (!s) return;
    free_prefill(s);
    float *bufs[] = {s->conv, s->ssm, s->h, s->un, s->zxd, s->xbc, s->y, s->dtx};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) free(bufs[i]);
    sb_v2_acts_free(s->ad), sb_v2_acts_free(s->adi);
    for (int t = 0; t < s->nteam; t++) {
        free(s->tb[t].un), free(s->tb[t].yn);
        sb_v2_acts_free(s->tb[t].ad), sb_v2_acts_free(s->tb[t].ao);
    }
    free(s->tb);
    free(s);
}

void sb_m2_state_reset(sb_m2_state *s) {
    const sb_m2 *M = s->m->m2;
    int L = s->m->info.n_layer;
    memset(s->conv, 0, sizeof(float) * (size_t)L * conv_len(M));
    memset(s->ssm, 0, sizeof(float) * (size_t)L * M->di * M->N);
}

int sb_m2_state_new(const sb_model *m, sb_m2_state **out, char *err, size_t errlen) {
    const sb_m2 *M = m->m2;
    int L = m->info.n_layer;
    sb_m2_state *s = calloc(1, sizeof *s);
    *out = NULL;
    if (!s) goto oom;
    s->m = m;
    s->quantise = m->info.dtype == GG_I8;
    s->conv = calloc((size_t)L * conv_len(M), sizeof(float));
    s->ssm = calloc((size_t)L * M->di * M->N, sizeof(float));
    s->h = calloc((size_t)pad16(M->d), sizeof(float));
    s->un = calloc((size_t)pad16(M->d), sizeof(float));
    s->zxd = calloc((size_t)pad16(M->n_in), sizeof(float));
    s->xbc = calloc((size_t)pad16(M->cd), sizeof(float));
    s->y = calloc((size_t)pad16(M->di), sizeof(float));
    s->dtx = calloc((size_t)pad16(M->di), sizeof(float));
    s->ad = sb_v2_acts_new(M->d, 1), s->adi = sb_v2_acts_new(M->di, 1);
    if (!s->conv || !s->ssm || !s->h || !s->un || !s->zxd || !s->xbc || !s->y || !s->dtx || !s->ad ||
        !s->adi)
        goto oom;
    *out = s;
    return SB_OK;
oom:
    sb_m2_state_free(s);
    snprintf(err, errlen, "out of memory allocating the Mamba-2 state (d_inner %d, d_state %d, %d layers)", M->di,
             M->N, L);
    return SB_ERR_NOMEM;
}

/* zeroed floats, 64-byte aligned (calloc's large blocks start 16 bytes into a page: every vector load of
 * a channel row would straddle two cache lines) */
static float *zalloc(size_t n) {
    size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
    float *p = aligned_alloc(64, bytes ? bytes : 64);
    if (p) memset(p, 0, bytes);
    return p;
}

static int grow_prefill(sb_m2_state *s, int T) {
    if (T <= s->cap) return SB_OK;
    free_prefill(s);
    const sb_m2 *M = s->m->m2;
    size_t ldx = (size_t)(T + 15) / 16 * 16; /* every channel row 64-byte aligned: the products load whole lines */
    if (ldx % 64 == 0) ldx += 16; /* not a power-of-two stride (forward.c) */
    s->H = zalloc((size_t)pad16(M->d) * ldx);
    s->HN = zalloc((size_t)pad16(M->d) * ldx);
    s->ZXD = zalloc((size_t)pad16(M->n_in) * ldx);
    s->XBC = zalloc((size_t)pad16(M->cd) * ldx);
    s->DT = zalloc((size_t)pad16(M->h) * ldx);
    s->Y = zalloc((size_t)pad16(M->di) * ldx);
    s->BT = zalloc(ldx * (size_t)M->g * M->N);
    s->CT = zalloc(ldx * (size_t)M->g * M->N);
    s->rs = zalloc(ldx);
    s->grs = zalloc(ldx * (size_t)M->g);
    s->XQ = s->quantise ? zalloc((size_t)pad16(M->d > M->di ? M->d : M->di) * ldx) : NULL;
    s->DTX = zalloc((size_t)M->di * ldx), s->DEC = zalloc((size_t)M->h * ldx);
    s->Ad = sb_v2_acts_new(M->d, 1), s->Adi = sb_v2_acts_new(M->di, 1);
    if (!s->DTX || !s->DEC ||!s->H || !s->HN || !s->ZXD || !s->XBC || !s->DT || !s->Y || !s->BT || !s->CT || !s->rs || !s->grs || !s->Ad ||
        !s->Adi || (s->quantise && !s->XQ)) {
        free_prefill(s);
        return SB_ERR_NOMEM;
    }
    s->cap = (int)ldx;
    return SB_OK;
}

static void rmsnorm_vec(const float *h, const float *w, float eps, int d, float *out) {
    double ss = 0.0;
    for (int j = 0; j < d; j++) ss += (double)h[j] * h[j];
    float r = 1.0f / sqrtf((float)(ss / d) + eps);
    for (int j = 0; j < d; j++) out[j] = h[j] * r * (w ? w[j] : 1.0f);
}

/* Δ = clamp(softplus(v + dt_bias), dt_min, dt_max), in place over n values of head hh */
static void delta(const sb_kernels *k, const sb_m2 *M, const sb_m2_layer *ly, int hh, float *v, int n) {
    for (int t = 0; t < n; t++) v[t] += ly->dt_bias[hh];
    k->softplus(v, n);
    for (int t = 0; t < n; t++) v[t] = fminf(fmaxf(v[t], M->dt_min), M->dt_max);
}

/* ---------------------------------------------------------------- decode: one token */

/* Stage timing for sb_profile_decode (engine.h: SB_STAGE, SB_ST_*). Mamba-2's stages: norm, in_proj, conv (+ SiLU), scan (Δ: dt bias, softplus, clamp; the state step, D
 * skip, SiLU(z) gate), prep (the gated norm and out_proj's activations), out_proj, and the head's.
 *
 * Every thread of the team runs this. Four waits per layer (there were seven), as forward.c's: after ssm_in, after the conv
 * (a head's scan reads its group's B and C, which other threads' chunks wrote), after the scan (the group
 * norm reads whole groups) and after ssm_out. The norms and the activations every thread needs whole,
 * each thread prepares itself; Δ of a head is computed where its scan runs. */
static void decode_layer(const sb_model *m, sb_m2_state *s, int i, const sb_kernels *k, sb_ssd_head_fn ssd) {
    const sb_m2 *M = m->m2;
    const sb_m2_layer *ly = &M->layers[i];
    double *st = sb_decode_stages ? sb_decode_stages + (size_t)i * SB_NSTAGE : NULL;
    struct m2_team_buf *tb = &s->tb[sb_thread_id()];
    int d = M->d, di = M->di, N = M->N, K = M->K, p = M->p, cd = M->cd;
    sb_v2_quantise_fn q = s->quantise ? k->quantise : NULL;
    int r = M->h / M->g;
    /* zxd holds ssm_in's bias (the previous layer's ssm_out stage, or the embedding's) */
    sb_decode_norm_product(k, s->h, ly->norm, m->eps, d, tb->un, tb->ad, q, &ly->in, s->zxd, st, SB_ST_IN);
    if (ly->out.bias) { /* h is read by nothing between this layer's norm and its ssm_out */
        int lo, hi;
        sb_thread_slice(d, &lo, &hi);
        for (int j = lo; j < hi; j++) s->h[j] += ly->out.bias[j];
    }
    float *cst = s->conv + (size_t)i * conv_len(M);
#pragma omp for schedule(static)
    for (int c0 = 0; c0 < cd; c0 += 64) { /* conv1d over x, B, C + SiLU, window shifted in place */
        int c1 = c0 + 64 < cd ? c0 + 64 : cd;
        sb_conv_decode(ly->conv_wt, ly->conv_b, cst, cd, K, s->zxd + di, s->xbc, c0, c1);
        k->silu(s->xbc + c0, c1 - c0);
    }
    SB_STAGE(st, SB_ST_CONV);
    const float *x = s->xbc, *B = s->xbc + di, *C = s->xbc + di + M->g * N, *z = s->zxd;
    float *ssm = s->ssm + (size_t)i * di * N;
#pragma omp for schedule(static)
    for (int hh = 0; hh < M->h; hh++) { /* Δ, the state step + D skip + SiLU(z) gate, one head at a time */
        float dt = s->zxd[di + cd + hh], *dtx = s->dtx + (size_t)hh * p, *y = s->y + (size_t)hh * p;
        delta(k, M, ly, hh, &dt, 1);
        const float *xh = x + (size_t)hh * p;
        for (int c = 0; c < p; c++) dtx[c] = dt * xh[c];
        int grp = hh / r;
        ssd(p, N, expf(dt * ly->A[hh]), dtx, B + (size_t)grp * N, C + (size_t)grp * N, ssm + (size_t)hh * p * N, y);
        for (int c = 0; c < p; c++) y[c] += ly->D[hh] * xh[c];
        k->mul_silu(y, z + (size_t)hh * p, p);
    }
    SB_STAGE(st, SB_ST_SCAN);
    { /* the gated RMSNorm over each group's di / g channels (its weight folded into ssm_out) */
        int gs = di / M->g;
        for (int grp = 0; grp < M->g; grp++) {
            const float *y = s->y + (size_t)grp * gs;
            float *yn = tb->yn + (size_t)grp * gs;
            double ss = 0.0;
            for (int c = 0; c < gs; c++) ss += (double)y[c] * y[c];
            float sc = 1.0f / sqrtf((float)(ss / gs) + m->eps);
            for (int c = 0; c < gs; c++) yn[c] = y[c] * sc * (ly->gnorm ? ly->gnorm[grp * gs + c] : 1.0f);
        }
        sb_v2_act_set(tb->ao, tb->yn, 1, q);
    }
    /* the next layer's ssm_in output starts as its bias (its readers, the conv and the scan, are done) */
    if (i + 1 < m->info.n_layer) sb_fill_bias_slice(s->zxd, M->layers[i + 1].in.bias, M->n_in);
    SB_STAGE(st, SB_ST_PREP);
    sb_linear_vec_part(k, &ly->out, tb->ao, s->h);
#pragma omp barrier
    SB_STAGE(st, SB_ST_OUT);
}

/* prefill's: h holds the position's residual */
static void head_vec(const sb_model *m, sb_m2_state *s, const sb_kernels *k, float *logits, double *st) {
#pragma omp single
    {
        rmsnorm_vec(s->h, m->out_norm, m->eps, m->info.d_model, s->un);
        memset(logits, 0, sizeof(float) * (size_t)m->info.vocab_size);
        sb_v2_act_set(s->ad, s->un, 1, s->quantise ? k->quantise : NULL);
    }
    SB_STAGE(st, SB_ST_NORM);
    sb_linear_vec(k, &m->head, s->ad, logits);
    SB_STAGE(st, SB_ST_HEAD);
}

static int decode_token(const sb_model *m, sb_m2_state *s, int32_t tok, float *logits, int mode) {
    const sb_kernels *k = sb_active_kernels();
    sb_ssd_head_fn ssd = sb_ssd_head_for(k);
    double *st = sb_decode_stages ? sb_decode_stages + (size_t)m->info.n_layer * SB_NSTAGE : NULL;
    if (grow_team(s, sb_n_threads())) return SB_ERR_NOMEM;
#pragma omp parallel if (sb_n_threads() > 1)
    {
        SB_STAGE(st, SB_NSTAGE); /* the clock starts once the team is up */
        if (mode) sb_fill_bias_slice(logits, NULL, m->info.vocab_size);
        sb_fill_bias_slice(s->zxd, m->m2->layers[0].in.bias, m->m2->n_in);
#pragma omp single
        sb_v2_row(&m->embd.w.cls[0], tok, s->h);
        SB_STAGE(st, SB_ST_EMBED);
        for (int i = 0; i < m->info.n_layer; i++) decode_layer(m, s, i, k, ssd);
        if (mode) {
            struct m2_team_buf *tb = &s->tb[sb_thread_id()];
            sb_v2_quantise_fn q = s->quantise ? k->quantise : NULL;
            sb_decode_norm_product(k, s->h, m->out_norm, m->eps, m->info.d_model, tb->un, tb->ad, q, &m->head, logits,
                                   st, SB_ST_HEAD);
        }
    }
    return SB_OK;
}

/* ---------------------------------------------------------------- prefill: T tokens at once */

/* the products read channel-major X in place (A->cm), an int8 model's quantised into XQ first (forward.c) */
static void acts_cm(sb_v2_act *A, const float *X, int ldx, int K, int T, float *XQ) {
    if (XQ) {
        int nch = (K + SB_V2_CHUNK - 1) / SB_V2_CHUNK;
#pragma omp for schedule(static)
        for (int ch = 0; ch < nch; ch++) sb_v2_cm_quantise(X, ldx, K, T, XQ, ldx, ch, ch + 1);
    }
#pragma omp single
    A->cm = XQ ? XQ : X, A->ldc = ldx;
}

static void prefill_layer(const sb_model *m, sb_m2_state *s, int i, int T, const sb_kernels *k, sb_ssd_head_fn ssd,
                          sb_ssd_chunk_fn ssd_chunk) {
    const sb_m2 *M = m->m2;
    const sb_m2_layer *ly = &M->layers[i];
    int d = M->d, di = M->di, N = M->N, K = M->K, p = M->p, cd = M->cd, g = M->g, gN = g * N, ldx = s->cap;
    int r = M->h / g;
#pragma omp single
    {
        for (int t = 0; t < T; t++) s->rs[t] = 0.0f;
        for (int c = 0; c < d; c++)
            for (int t = 0; t < T; t++) s->rs[t] += s->H[(size_t)c * ldx + t] * s->H[(size_t)c * ldx + t];
        for (int t = 0; t < T; t++) s->rs[t] = 1.0f / sqrtf(s->rs[t] / d + m->eps);
    }
#pragma omp for schedule(static)
    for (int c = 0; c < d; c++) {
        float w = ly->norm ? ly->norm[c] : 1.0f;
        for (int t = 0; t < T; t++) s->HN[(size_t)c * ldx + t] = s->H[(size_t)c * ldx + t] * s->rs[t] * w;
    }
#pragma omp for schedule(static)
    for (int c = 0; c < M->n_in; c++) {
        float b = ly->in.bias ? ly->in.bias[c] : 0.0f;
        for (int t = 0; t < ldx; t++) s->ZXD[(size_t)c * ldx + t] = b;
    }
    acts_cm(s->Ad, s->HN, ldx, d, T, s->XQ);
    sb_linear_mat(k, &ly->in, s->Ad, T, s->ZXD, ldx);
    float *cst = s->conv + (size_t)i * conv_len(M);
#pragma omp for schedule(static)
    for (int c = 0; c < cd; c++) { /* conv1d + SiLU over the chunk, the carried window first */
        const float *w = ly->conv_w + (size_t)c * K, *x = s->ZXD + (size_t)(di + c) * ldx;
        float *st = cst + c, *xc = s->XBC + (size_t)c * ldx; /* the window tap-major: tap j at st[j * cd] */
        for (int t = 0; t < T && t < K - 1; t++) { /* the first K-1 outputs reach into the carried window */
            float acc = ly->conv_b[c];
            for (int j = 0; j < K; j++) {
                int src = t - (K - 1) + j; /* < 0: from the carried window */
                acc += w[j] * (src >= 0 ? x[src] : st[(size_t)(K - 1 + src) * cd]);
            }
            xc[t] = acc;
        }
        for (int t = K - 1; t < T; t++) xc[t] = ly->conv_b[c];
        for (int j = 0; j < K; j++) /* the rest tap by tap: loops over t that vectorise */
            for (int t = K - 1; t < T; t++) xc[t] += w[j] * x[t - (K - 1) + j];
        k->silu(xc, T);
        for (int j = 0; j < K - 1; j++) {
            int src = T - (K - 1) + j;
            st[(size_t)j * cd] = src >= 0 ? x[src] : st[(size_t)(K - 1 + src) * cd];
        }
    }
#pragma omp for schedule(static) nowait
    for (int hh = 0; hh < M->h; hh++) {
        float *v = s->DT + (size_t)hh * ldx;
        memcpy(v, s->ZXD + (size_t)(di + cd + hh) * ldx, sizeof(float) * (size_t)T);
        delta(k, M, ly, hh, v, T);
    }
#pragma omp for schedule(static)
    for (int t = 0; t < T; t++) /* B, C token-major: a step reads one token's N of its group at once */
        for (int j = 0; j < gN; j++) {
            s->BT[(size_t)t * gN + j] = s->XBC[(size_t)(di + j) * ldx + t];
            s->CT[(size_t)t * gN + j] = s->XBC[(size_t)(di + gN + j) * ldx + t];
        }
    float *ssm = s->ssm + (size_t)i * di * N;
#pragma omp for schedule(static)
    for (int hh = 0; hh < M->h; hh++) {
        float dtx[64], yt[64]; /* p channels at a time, in pieces of 64 */
        int grp = hh / r;
        if (ssd_chunk) { /* the head over the whole chunk at once: Δx token-major, the decays, then D skip */
            float *dx = s->DTX + (size_t)hh * p * ldx, *dec = s->DEC + (size_t)hh * ldx;
            const float *dtr = s->DT + (size_t)hh * ldx;
            for (int t = 0; t < T; t++) dec[t] = expf(dtr[t] * ly->A[hh]);
            for (int c = 0; c < p; c++)
                for (int t = 0; t < T; t++) dx[(size_t)t * p + c] = dtr[t] * s->XBC[(size_t)(hh * p + c) * ldx + t];
            ssd_chunk(p, N, T, dec, dx, s->BT + (size_t)grp * N, s->CT + (size_t)grp * N, gN, ssm + (size_t)hh * p * N,
                      s->Y + (size_t)hh * p * ldx, ldx);
            for (int c = hh * p; c < (hh + 1) * p; c++)
                for (int t = 0; t < T; t++) s->Y[(size_t)c * ldx + t] += ly->D[hh] * s->XBC[(size_t)c * ldx + t];
        }
        for (int t = 0; t < T && !ssd_chunk; t++) {
            float dt = s->DT[(size_t)hh * ldx + t], decay = expf(dt * ly->A[hh]);
            for (int c0 = 0; c0 < p; c0 += 64) {
                int pc = p - c0 < 64 ? p - c0 : 64;
                for (int c = 0; c < pc; c++) dtx[c] = dt * s->XBC[(size_t)(hh * p + c0 + c) * ldx + t];
                ssd(pc, N, decay, dtx, s->BT + (size_t)t * gN + (size_t)grp * N, s->CT + (size_t)t * gN + (size_t)grp * N,
                    ssm + ((size_t)hh * p + c0) * N, yt);
                for (int c = 0; c < pc; c++) {
                    size_t o = (size_t)(hh * p + c0 + c) * ldx + t;
                    s->Y[o] = yt[c] + ly->D[hh] * s->XBC[o];
                }
            }
        }
        for (int c = hh * p; c < (hh + 1) * p; c++) k->mul_silu(s->Y + (size_t)c * ldx, s->ZXD + (size_t)c * ldx, T);
    }
    int gs = di / g;
#pragma omp for schedule(static)
    for (int grp = 0; grp < g; grp++) { /* the gated RMSNorm: per token, over the group's channels */
        float *rs = s->grs + (size_t)grp * ldx;
        for (int t = 0; t < T; t++) rs[t] = 0.0f;
        for (int c = grp * gs; c < (grp + 1) * gs; c++)
            for (int t = 0; t < T; t++) rs[t] += s->Y[(size_t)c * ldx + t] * s->Y[(size_t)c * ldx + t];
        for (int t = 0; t < T; t++) rs[t] = 1.0f / sqrtf(rs[t] / gs + m->eps);
        for (int c = grp * gs; c < (grp + 1) * gs; c++) {
            float w = ly->gnorm ? ly->gnorm[c] : 1.0f;
            for (int t = 0; t < T; t++) s->Y[(size_t)c * ldx + t] *= rs[t] * w;
        }
    }
    if (ly->out.bias) {
#pragma omp for schedule(static) nowait
        for (int c = 0; c < d; c++)
            for (int t = 0; t < T; t++) s->H[(size_t)c * ldx + t] += ly->out.bias[c];
    }
    acts_cm(s->Adi, s->Y, ldx, di, T, s->XQ);
    sb_linear_mat(k, &ly->out, s->Adi, T, s->H, ldx);
}

static void prefill_chunk(const sb_model *m, sb_m2_state *s, const int32_t *tok, int T, float *logits, int mode) {
    const sb_info *I = &m->info;
    const sb_kernels *k = sb_active_kernels();
    sb_ssd_head_fn ssd = sb_ssd_head_for(k);
    sb_ssd_chunk_fn ssd_chunk = sb_ssd_chunk_for(k, m->m2->p, m->m2->N);
    int d = I->d_model, ldx = s->cap;
#pragma omp parallel if (sb_n_threads() > 1)
    {
#pragma omp single
        for (int t = 0; t < T; t++) {
            sb_v2_row(&m->embd.w.cls[0], tok[t], s->h);
            for (int c = 0; c < d; c++) s->H[(size_t)c * ldx + t] = s->h[c];
        }
        for (int i = 0; i < I->n_layer; i++) prefill_layer(m, s, i, T, k, ssd, ssd_chunk);
        for (int t = mode == 2 ? 0 : T - 1; mode && t < T; t++) {
#pragma omp single
            for (int c = 0; c < d; c++) s->h[c] = s->H[(size_t)c * ldx + t];
            head_vec(m, s, k, logits + (mode == 2 ? (size_t)t * I->vocab_size : 0), NULL);
        }
#pragma omp single
        for (int c = 0; c < d; c++) s->h[c] = s->H[(size_t)c * ldx + T - 1];
    }
}

int sb_m2_forward(const sb_model *m, sb_m2_state *s, const int32_t *tokens, int32_t n, float *logits, int32_t mode,
                  char *err, size_t errlen) {
    const sb_info *I = &m->info;
    if (n == 1) {
        if (decode_token(m, s, tokens[0], logits, mode)) {
            snprintf(err, errlen, "out of memory allocating the threads' decode buffers");
            return SB_ERR_NOMEM;
        }
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
