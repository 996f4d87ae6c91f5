/* The forward pass: the state, decode (one token, vectors) and prefill (a chunk of tokens at once, with
 * channel-major activations X[channel * ldx + t] so that every matrix is a sparse x dense GEMM and
 * every per-channel op — conv, scan, gate — walks contiguous memory). The fusions of the design are
 * loops here: RMSNorm's weight is folded into in_proj by the compiler and its scale applied while
 * normalising; conv1d + SiLU, dt_proj + softplus, scan + D skip + SiLU(z) gate each run as one pass;
 * out_proj accumulates straight into the residual stream.
 *
 * Every matrix product reads activations prepared once per product (sb_v2_act_set: zero-padded to
 * whole chunks, and for int8 quantised per chunk), shared by every class and thread. Threads: one
 * parallel region per token (decode) or per prefill chunk; the whole team calls every step. Prefill runs
 * its serial steps in `omp single`, its per-channel loops in `omp for`, the products split by threads.c;
 * decode waits only where a step reads what other threads wrote (decode_layer). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "mamba2.h"

#define PREFILL_CHUNK 256 /* longer prompts run in chunks: bounded scratch, state carried */

static int pad16(int n) { return (n + 15) / 16 * 16 + 16; }

typedef struct {
    float *un;                /* (d) the normed residual */
    sb_v2_act *ad, *ar, *ao;  /* activations of in_proj / the head (d), dt_proj (R), out_proj (di) */
} sb_team_buf;

struct sb_state {
    const sb_model *m;
    int quantise;      /* int8 matrices: products quantise their activations per chunk */
    float *conv, *ssm; /* (L, K-1, di): the windows tap-major; (L, di, N) */
    float *h, *un, *xz, *xc, *xdbl, *dt, *y; /* decode scratch */
    sb_v2_act *ad, *adi, *ar;                /* decode activations of width d, di, R */
    /* prefill scratch for up to cap columns */
    int cap;
    float *H, *HN, *XZ, *XC, *XDBL, *DT, *Y, *BT, *CT, *rs;
    float *XQ;                /* int8: a product's input quantised, channel-major (max(d, di), cap) */
    sb_v2_act *Ad, *Adi, *Ar; /* one each: the products read the channel-major activations (act[0].cm) */
    sb_m2_state *m2;          /* a Mamba-2 model's state (forward_mamba2.c); the fields above stay NULL */
    /* decode: each thread's own copies of what every thread reads whole, so that it prepares them itself
     * instead of waiting for one thread to (grown to the team on each forward) */
    int nteam;
    sb_team_buf *tb;
    unsigned char *dt_in_order; /* per layer: dt_proj one class whose row r is channel r, every row kept */
};

/* ---------------------------------------------------------------- state */

static void free_prefill(sb_state *s) {
    float **bufs[] = {&s->H, &s->HN, &s->XZ, &s->XC, &s->XDBL, &s->DT, &s->Y, &s->BT, &s->CT, &s->rs, &s->XQ};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) {
        free(*bufs[i]);
        *bufs[i] = NULL;
    }
    sb_v2_act **acts[] = {&s->Ad, &s->Adi, &s->Ar};
    for (size_t i = 0; i < 3; i++) {
        sb_v2_acts_free(*acts[i]);
        *acts[i] = NULL;
    }
    s->cap = 0;
}

void sb_state_free(sb_state *s) {
    if (!s) return;
    sb_m2_state_free(s->m2);
    free_prefill(s);
    float *bufs[] = {s->conv, s->ssm, s->h, s->un, s->xz, s->xc, s->xdbl, s->dt, s->y};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) free(bufs[i]);
    sb_v2_acts_free(s->ad), sb_v2_acts_free(s->adi), sb_v2_acts_free(s->ar);
    for (int t = 0; t < s->nteam; t++) {
        free(s->tb[t].un);
        sb_v2_acts_free(s->tb[t].ad), sb_v2_acts_free(s->tb[t].ar), sb_v2_acts_free(s->tb[t].ao);
    }
    free(s->tb), free(s->dt_in_order);
    free(s);
}

void sb_state_reset(sb_state *s) {
    if (s->m2) {
        sb_m2_state_reset(s->m2);
        return;
    }
    const sb_info *I = &s->m->info;
    memset(s->conv, 0, sizeof(float) * (size_t)I->n_layer * I->d_inner * (I->d_conv - 1 ? I->d_conv - 1 : 1));
    memset(s->ssm, 0, sizeof(float) * (size_t)I->n_layer * I->d_inner * I->d_state);
}

/* whether dt_proj is one class whose row r writes channel r, for every channel (a dense layer) */
static int rows_in_order(const sb_linear *lin) {
    if (lin->w.nclass != 1 || lin->w.cls[0].rows != lin->out) return 0;
    for (int r = 0; r < lin->out; r++)
        if (lin->w.cls[0].index[r] != r) return 0;
    return 1;
}

/* each thread's decode buffers (sb_team_buf) for a team of nt */
static int grow_team(sb_state *s, int nt) {
    if (nt <= s->nteam) return SB_OK;
    const sb_info *I = &s->m->info;
    sb_team_buf *tb = realloc(s->tb, sizeof *tb * (size_t)nt);
    if (!tb) return SB_ERR_NOMEM;
    s->tb = tb;
    for (; s->nteam < nt; s->nteam++) {
        sb_team_buf *b = &tb[s->nteam];
        b->un = aligned_alloc(64, sizeof(float) * (size_t)pad16(I->d_model)); /* a multiple of 64 bytes */
        b->ad = sb_v2_acts_new(I->d_model, 1), b->ar = sb_v2_acts_new(I->dt_rank, 1);
        b->ao = sb_v2_acts_new(I->d_inner, 1);
        if (!b->un || !b->ad || !b->ar || !b->ao) {
            free(b->un), sb_v2_acts_free(b->ad), sb_v2_acts_free(b->ar), sb_v2_acts_free(b->ao);
            return SB_ERR_NOMEM;
        }
    }
    return SB_OK;
}

int sb_state_new(const sb_model *m, sb_state **out, char *err, size_t errlen) {
    const sb_info *I = &m->info;
    int d = I->d_model, di = I->d_inner, N = I->d_state, R = I->dt_rank, K = I->d_conv;
    sb_state *s = calloc(1, sizeof *s);
    *out = NULL;
    if (!s) goto oom;
    s->m = m;
    if (m->m2) {
        int rc = sb_m2_state_new(m, &s->m2, err, errlen);
        if (rc) free(s);
        else *out = s;
        return rc;
    }
    s->quantise = I->dtype == GG_I8;
    s->conv = calloc((size_t)I->n_layer * di * (K > 1 ? K - 1 : 1), sizeof(float));
    s->ssm = calloc((size_t)I->n_layer * di * N, sizeof(float));
    s->h = calloc((size_t)pad16(d), sizeof(float));
    s->un = calloc((size_t)pad16(d), sizeof(float));
    s->xz = calloc((size_t)pad16(2 * di), sizeof(float));
    s->xc = calloc((size_t)pad16(di), sizeof(float));
    s->xdbl = calloc((size_t)pad16(R + 2 * N), sizeof(float));
    s->dt = calloc((size_t)pad16(di), sizeof(float));
    s->y = calloc((size_t)pad16(di), sizeof(float));
    s->ad = sb_v2_acts_new(d, 1), s->adi = sb_v2_acts_new(di, 1), s->ar = sb_v2_acts_new(R, 1);
    s->dt_in_order = malloc((size_t)I->n_layer);
    for (int i = 0; s->dt_in_order && i < I->n_layer; i++) s->dt_in_order[i] = (unsigned char)rows_in_order(&m->layers[i].dt);
    if (!s->conv || !s->ssm || !s->h || !s->un || !s->xz || !s->xc || !s->xdbl || !s->dt || !s->y || !s->ad ||
        !s->adi || !s->ar || !s->dt_in_order)
        goto oom;
    *out = s;
    return SB_OK;
oom:
    sb_state_free(s);
    snprintf(err, errlen, "out of memory allocating the state (d_inner %d, d_state %d, %d layers)", di, N,
             I->n_layer);
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

static int grow_prefill(sb_state *s, int T) {
    if (T <= s->cap) return SB_OK;
    free_prefill(s);
    const sb_info *I = &s->m->info;
    int d = I->d_model, di = I->d_inner, N = I->d_state, R = I->dt_rank;
    /* rows a multiple of 8 floats apart, but not of 64: a power-of-two stride would put every
     * channel row of a GEMM slab in the same few L1 sets */
    size_t ldx = (size_t)(T + 15) / 16 * 16; /* every channel row 64-byte aligned: the products load whole lines */
    if (ldx % 64 == 0) ldx += 16;
    /* calloc: padding rows must read as zeros, and padding columns must hold numbers */
    s->H = zalloc((size_t)pad16(d) * ldx);
    s->HN = zalloc((size_t)pad16(d) * ldx);
    s->XZ = zalloc((size_t)pad16(2 * di) * ldx);
    s->XC = zalloc((size_t)pad16(di) * ldx);
    s->XDBL = zalloc((size_t)pad16(R + 2 * N) * ldx);
    s->DT = zalloc((size_t)pad16(di) * ldx);
    s->Y = zalloc((size_t)pad16(di) * ldx);
    s->BT = zalloc(ldx * (size_t)N);
    s->CT = zalloc(ldx * (size_t)N);
    s->rs = zalloc(ldx);
    s->XQ = s->quantise ? zalloc((size_t)pad16(d > di ? d : di) * ldx) : NULL;
    s->Ad = sb_v2_acts_new(d, 1), s->Adi = sb_v2_acts_new(di, 1), s->Ar = sb_v2_acts_new(R, 1);
    if (!s->H || !s->HN || !s->XZ || !s->XC || !s->XDBL || !s->DT || !s->Y || !s->BT || !s->CT || !s->rs ||
        (s->quantise && !s->XQ) || !s->Ad || !s->Adi || !s->Ar) {
        free_prefill(s);
        return SB_ERR_NOMEM;
    }
    s->cap = (int)ldx;
    return SB_OK;
}

/* ---------------------------------------------------------------- decode: one token */

/* the stage clock of sb_profile_decode (engine.h: SB_STAGE) */
double *sb_decode_stages;

static void rmsnorm_vec(const float *h, const float *w, float eps, int d, float *out) {
    double ss = 0.0;
    for (int j = 0; j < d; j++) ss += (double)h[j] * h[j];
    float r = 1.0f / sqrtf((float)(ss / d) + eps);
    for (int j = 0; j < d; j++) out[j] = h[j] * r * (w ? w[j] : 1.0f);
}

/* the chunks [ch0, ch1) of activations a set from x (x[j] for j in those chunks), quantised as sb_v2_act_set
 * quantises them: each chunk's scale is its own, so threads may prepare disjoint chunks of one a */
static void act_chunks(sb_v2_act *a, const float *x, sb_v2_quantise_fn q, int ch0, int ch1) {
    int j0 = ch0 * SB_V2_CHUNK, j1 = ch1 * SB_V2_CHUNK < a->K ? ch1 * SB_V2_CHUNK : a->K;
    if (j1 <= j0) return;
    sb_v2_act v = {.K = j1 - j0, .nchunk = ch1 - ch0, .x = a->x + j0, .xq = a->xq + j0, .xs = a->xs + ch0,
                   .xt = a->xt + (size_t)2 * j0};
    sb_v2_act_set(&v, x + j0, 1, q); /* past K the chunk's padding stays zero (sb_v2_act_bind) */
}

void sb_conv_tap_major(float *wt, const float *w, int cd, int K) {
    for (int c = 0; c < cd; c++)
        for (int j = 0; j < K; j++) wt[(size_t)j * cd + c] = w[(size_t)c * K + j];
}

void sb_conv_decode(const float *wt, const float *b, float *win, int di, int K, const float *x, float *xc, int c0,
                    int c1) {
    const float *wx = wt + (size_t)(K - 1) * di;
    for (int c = c0; c < c1; c++) xc[c] = b[c] + wx[c] * x[c];
    for (int j = 0; j < K - 1; j++) {
        const float *w = wt + (size_t)j * di, *wj = win + (size_t)j * di;
        for (int c = c0; c < c1; c++) xc[c] += w[c] * wj[c];
    }
    for (int j = 0; j + 1 < K - 1; j++) memcpy(win + (size_t)j * di + c0, win + (size_t)(j + 1) * di + c0, sizeof(float) * (size_t)(c1 - c0));
    if (K > 1) memcpy(win + (size_t)(K - 2) * di + c0, x + c0, sizeof(float) * (size_t)(c1 - c0));
}

/* softplus, the scan step + D skip and the SiLU(z) gate of the channels [c0, c1), Δ in s->dt */
static void scan_range(const sb_kernels *k, const sb_layer *ly, sb_state *s, int N, const float *B, const float *C,
                       float *ssm, int c0, int c1) {
    int di = s->m->info.d_inner;
    k->softplus(s->dt + c0, c1 - c0);
    k->scan_decode(N, ly->A, ly->D, s->dt, s->xc, B, C, ssm, s->y, c0, c1);
    k->mul_silu(s->y + c0, s->xz + di + c0, c1 - c0); /* the SiLU(z) gate */
}

/* Every thread of the team runs this; s->h holds the residual stream. It waits only where a step reads
 * what other threads wrote: after in_proj (the conv reads whole channels of xz), after the conv (x_proj
 * reads all of xc), after x_proj (Δr, B and C), after dt_proj when its rows are not the channels in
 * order (a pruned dt_proj: the scan runs in channel order), after the scan (out_proj reads all of y)
 * and after out_proj (the next norm reads all of h): five or six waits where there were nine. What
 * every thread needs whole and is cheap (the norm, the activations of in_proj, dt_proj and out_proj)
 * each thread prepares itself; the bias fills and zeroing of a product's output run one stage early,
 * in slices, ordered by a wait that is there anyway. */
static void decode_layer(const sb_model *m, sb_state *s, int i, const sb_kernels *k) {
    const sb_info *I = &m->info;
    double *st = sb_decode_stages ? sb_decode_stages + (size_t)i * SB_NSTAGE : NULL;
    const sb_layer *ly = &m->layers[i];
    sb_team_buf *tb = &s->tb[sb_thread_id()];
    int d = I->d_model, di = I->d_inner, N = I->d_state, R = I->dt_rank, K = I->d_conv;
    sb_v2_quantise_fn q = s->quantise ? k->quantise : NULL;
    /* xz holds in_proj's bias (the previous layer's out_proj stage, or the embedding's) */
    sb_decode_norm_product(k, s->h, ly->norm, m->eps, d, tb->un, tb->ad, q, &ly->in, s->xz, st, SB_ST_IN);
    float *cst = s->conv + (size_t)i * di * (K > 1 ? K - 1 : 1);
    int nch = (di + SB_V2_CHUNK - 1) / SB_V2_CHUNK;
#pragma omp for schedule(static)
    for (int ch = 0; ch < nch; ch++) { /* conv1d + SiLU (window shifted in place), x_proj's activations */
        int c0 = ch * SB_V2_CHUNK, c1 = c0 + SB_V2_CHUNK < di ? c0 + SB_V2_CHUNK : di;
        sb_conv_decode(ly->conv_wt, ly->conv_b, cst, di, K, s->xz, s->xc, c0, c1);
        k->silu(s->xc + c0, c1 - c0);
        act_chunks(s->adi, s->xc, q, ch, ch + 1);
    }
    SB_STAGE(st, SB_ST_CONV);
    sb_linear_vec_part(k, &ly->x, s->adi, s->xdbl); /* xdbl zeroed a stage early */
#pragma omp barrier
    SB_STAGE(st, SB_ST_X);
    sb_v2_act_set(tb->ar, s->xdbl, 1, q); /* Δr: the first R outputs of ssm_x */
    SB_STAGE(st, SB_ST_PREP);
    const float *B = s->xdbl + R, *C = s->xdbl + R + N;
    float *ssm = s->ssm + (size_t)i * di * N;
    if (s->dt_in_order[i]) { /* dt_proj's rows are the channels in order: each thread scans its rows' channels */
        int b0[4], b1[4];
        sb_vec_share(&ly->dt, b0, b1);
        if (b0[0] < b1[0]) k->gemv(&ly->dt.w.cls[0], tb->ar, s->dt, b0[0], b1[0]);
        SB_STAGE(st, SB_ST_DT);
        /* from a multiple of 16 to one or to di: the SIMD ops' scalar tails fall on the same channels
         * whatever the team */
        int c0 = b0[0] * SB_V2_B, c1 = b1[0] * SB_V2_B < di ? b1[0] * SB_V2_B : di;
        if (c0 < c1) scan_range(k, ly, s, N, B, C, ssm, c0, c1);
    } else { /* rows of several classes, or removed: the scan in channel order, after a wait (in class order,
              * with gaps, it took 1.7x as long: the 370M shape at 50%, 1 thread) */
        sb_linear_vec_part(k, &ly->dt, tb->ar, s->dt);
#pragma omp barrier
        SB_STAGE(st, SB_ST_DT);
#pragma omp for schedule(static) nowait
        for (int c0 = 0; c0 < di; c0 += 64) scan_range(k, ly, s, N, B, C, ssm, c0, c0 + 64 < di ? c0 + 64 : di);
    }
    if (ly->out.bias) { /* h is read by nothing between this layer's norm and its out_proj */
        int lo, hi;
        sb_thread_slice(d, &lo, &hi);
        for (int j = lo; j < hi; j++) s->h[j] += ly->out.bias[j];
    }
#pragma omp barrier
    SB_STAGE(st, SB_ST_SCAN);
    sb_v2_act_set(tb->ao, s->y, 1, q);
    /* the next layer's in_proj output starts as its bias, x_proj's as zero (their readers are done) */
    if (i + 1 < I->n_layer) {
        sb_fill_bias_slice(s->xz, m->layers[i + 1].in.bias, 2 * di);
        sb_fill_bias_slice(s->dt, m->layers[i + 1].dt_bias, di);
    }
    sb_fill_bias_slice(s->xdbl, NULL, R + 2 * N);
    SB_STAGE(st, SB_ST_PREP);
    sb_linear_vec_part(k, &ly->out, tb->ao, s->h); /* out_proj accumulates into the residual */
#pragma omp barrier
    SB_STAGE(st, SB_ST_OUT);
}

/* every thread of the team runs this too (prefill: h holds the position's residual) */
static void head_vec(const sb_model *m, sb_state *s, const sb_kernels *k, float *logits, double *st) {
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

void sb_decode_norm_product(const sb_kernels *k, const float *h, const float *norm, float eps, int d, float *un,
                            sb_v2_act *ad, sb_v2_quantise_fn quantise, const sb_linear *lin, float *y, double *st,
                            int stage) {
    rmsnorm_vec(h, norm, eps, d, un);
    sb_v2_act_set(ad, un, 1, quantise);
    SB_STAGE(st, SB_ST_NORM);
    sb_linear_vec_part(k, lin, ad, y);
#pragma omp barrier
    SB_STAGE(st, stage);
}

static int decode_token(const sb_model *m, sb_state *s, int32_t tok, float *logits, int mode) {
    const sb_kernels *k = sb_active_kernels();
    const sb_info *I = &m->info;
    double *st = sb_decode_stages ? sb_decode_stages + (size_t)I->n_layer * SB_NSTAGE : NULL;
    if (grow_team(s, sb_n_threads())) return SB_ERR_NOMEM;
#pragma omp parallel if (sb_n_threads() > 1)
    {
        SB_STAGE(st, SB_NSTAGE); /* the clock starts once the team is up */
        if (mode) sb_fill_bias_slice(logits, NULL, I->vocab_size);
        sb_fill_bias_slice(s->xz, m->layers[0].in.bias, 2 * I->d_inner);
        sb_fill_bias_slice(s->dt, m->layers[0].dt_bias, I->d_inner);
        sb_fill_bias_slice(s->xdbl, NULL, I->dt_rank + 2 * I->d_state);
#pragma omp single
        sb_v2_row(&m->embd.w.cls[0], tok, s->h);
        SB_STAGE(st, SB_ST_EMBED);
        for (int i = 0; i < I->n_layer; i++) decode_layer(m, s, i, k);
        if (mode) {
            sb_team_buf *tb = &s->tb[sb_thread_id()];
            sb_v2_quantise_fn q = s->quantise ? k->quantise : NULL;
            sb_decode_norm_product(k, s->h, m->out_norm, m->eps, I->d_model, tb->un, tb->ad, q, &m->head, logits, st,
                                   SB_ST_HEAD);
        }
    }
    return SB_OK;
}

/* ---------------------------------------------------------------- prefill: T tokens at once */

/* The products of a chunk read channel-major X (rows [0, K), T columns) in place (A->cm); an int8 model's
 * quantised first into XQ, chunks of 64 rows over the threads. Ends in a barrier. */
static void acts_cm(sb_v2_act *A, const float *X, int ldx, int K, int T, float *XQ) {
    if (XQ) {
        int nch = (K + SB_V2_CHUNK - 1) / SB_V2_CHUNK;
#pragma omp for schedule(static)
        for (int ch = 0; ch < nch; ch++) sb_v2_cm_quantise(X, ldx, K, T, XQ, ldx, ch, ch + 1);
    }
#pragma omp single
    A->cm = XQ ? XQ : X, A->ldc = ldx;
}

/* every thread of the team runs this */
static void prefill_layer(const sb_model *m, sb_state *s, int i, int T, const sb_kernels *k) {
    const sb_info *I = &m->info;
    const sb_layer *ly = &m->layers[i];
    int d = I->d_model, di = I->d_inner, N = I->d_state, R = I->dt_rank, K = I->d_conv, ldx = s->cap;
#pragma omp single
    { /* RMSNorm: the per-token scale */
        for (int t = 0; t < T; t++) s->rs[t] = 0.0f;
        for (int c = 0; c < d; c++)
            for (int t = 0; t < T; t++) s->rs[t] += s->H[(size_t)c * ldx + t] * s->H[(size_t)c * ldx + t];
        for (int t = 0; t < T; t++) s->rs[t] = 1.0f / sqrtf(s->rs[t] / d + m->eps);
    }
#pragma omp for schedule(static)
    for (int c = 0; c < d; c++) { /* channel rows scaled (the weight only when not folded) */
        float w = ly->norm ? ly->norm[c] : 1.0f;
        for (int t = 0; t < T; t++) s->HN[(size_t)c * ldx + t] = s->H[(size_t)c * ldx + t] * s->rs[t] * w;
    }
#pragma omp for schedule(static)
    for (int c = 0; c < 2 * di; c++) {
        float b = ly->in.bias ? ly->in.bias[c] : 0.0f;
        for (int t = 0; t < ldx; t++) s->XZ[(size_t)c * ldx + t] = b;
    }
    acts_cm(s->Ad, s->HN, ldx, d, T, s->XQ);
    sb_linear_mat(k, &ly->in, s->Ad, T, s->XZ, ldx);
    float *cst = s->conv + (size_t)i * di * (K > 1 ? K - 1 : 1);
#pragma omp for schedule(static)
    for (int c = 0; c < di; c++) { /* conv1d + SiLU over the chunk, carried window first */
        const float *w = ly->conv_w + (size_t)c * K, *x = s->XZ + (size_t)c * ldx;
        float *st = cst + c, *xc = s->XC + (size_t)c * ldx; /* the window tap-major: tap j at st[j * di] */
        for (int t = 0; t < T && t < K - 1; t++) { /* the first K-1 outputs reach into the carried window */
            float acc = ly->conv_b[c];
            for (int j = 0; j < K; j++) {
                int src = t - (K - 1) + j; /* < 0: from the carried window */
                acc += w[j] * (src >= 0 ? x[src] : st[(size_t)(K - 1 + src) * di]);
            }
            xc[t] = acc;
        }
        for (int t = K - 1; t < T; t++) xc[t] = ly->conv_b[c];
        for (int j = 0; j < K; j++) /* the rest tap by tap: loops over t that vectorise */
            for (int t = K - 1; t < T; t++) xc[t] += w[j] * x[t - (K - 1) + j];
        k->silu(xc, T);
        for (int j = 0; j < K - 1; j++) { /* the new window: the last K-1 inputs */
            int src = T - (K - 1) + j;
            st[(size_t)j * di] = src >= 0 ? x[src] : st[(size_t)(K - 1 + src) * di]; /* T < K - 1: an old input */
        }
    }
#pragma omp single nowait
    memset(s->XDBL, 0, sizeof(float) * (size_t)(R + 2 * N) * ldx);
    acts_cm(s->Adi, s->XC, ldx, di, T, s->XQ); /* ends in a barrier: XDBL is zero after it */
    sb_linear_mat(k, &ly->x, s->Adi, T, s->XDBL, ldx);
#pragma omp for schedule(static) nowait
    for (int c = 0; c < di; c++)
        for (int t = 0; t < ldx; t++) s->DT[(size_t)c * ldx + t] = ly->dt_bias[c];
    acts_cm(s->Ar, s->XDBL, ldx, R, T, s->XQ); /* Δr: rows [0, R) of XDBL */
    sb_linear_mat(k, &ly->dt, s->Ar, T, s->DT, ldx);
#pragma omp for schedule(static)
    for (int t = 0; t < T; t++) /* B, C token-major: the scan reads all N of one token at once */
        for (int n = 0; n < N; n++) {
            s->BT[(size_t)t * N + n] = s->XDBL[(size_t)(R + n) * ldx + t];
            s->CT[(size_t)t * N + n] = s->XDBL[(size_t)(R + N + n) * ldx + t];
        }
    float *ssm = s->ssm + (size_t)i * di * N;
#pragma omp for schedule(static)
    for (int c0 = 0; c0 < di; c0 += 16) { /* softplus, the scan + D skip (16 channels at once), the SiLU(z) gate */
        int c1 = c0 + 16 < di ? c0 + 16 : di;
        for (int c = c0; c < c1; c++) k->softplus(s->DT + (size_t)c * ldx, T);
        if (k->scan_chunk) k->scan_chunk(N, T, ly->A, ly->D, s->DT, s->XC, ldx, s->BT, s->CT, ssm, s->Y, c0, c1);
        else
            for (int c = c0; c < c1; c++)
                for (int t = 0; t < T; t++) {
                    float dt = s->DT[(size_t)c * ldx + t], xc = s->XC[(size_t)c * ldx + t], yc;
                    k->scan_step(N, ly->A + (size_t)c * N, dt, dt * xc, s->BT + (size_t)t * N, s->CT + (size_t)t * N,
                                 ssm + (size_t)c * N, &yc);
                    s->Y[(size_t)c * ldx + t] = yc + ly->D[c] * xc;
                }
        for (int c = c0; c < c1; c++) k->mul_silu(s->Y + (size_t)c * ldx, s->XZ + (size_t)(di + c) * ldx, T);
    }
    if (ly->out.bias) {
#pragma omp for schedule(static) nowait
        for (int c = 0; c < d; c++)
            for (int t = 0; t < T; t++) s->H[(size_t)c * ldx + t] += ly->out.bias[c];
    }
    acts_cm(s->Adi, s->Y, ldx, di, T, s->XQ);
    sb_linear_mat(k, &ly->out, s->Adi, T, s->H, ldx);
}

static void prefill_chunk(const sb_model *m, sb_state *s, const int32_t *tok, int T, float *logits, int mode) {
    const sb_info *I = &m->info;
    const sb_kernels *k = sb_active_kernels();
    int d = I->d_model, ldx = s->cap;
#pragma omp parallel if (sb_n_threads() > 1)
    {
#pragma omp single
        for (int t = 0; t < T; t++) { /* the embedding rows, into channel-major H */
            sb_v2_row(&m->embd.w.cls[0], tok[t], s->h);
            for (int c = 0; c < d; c++) s->H[(size_t)c * ldx + t] = s->h[c];
        }
        for (int i = 0; i < I->n_layer; i++) prefill_layer(m, s, i, T, k);
        /* logits only where asked: the last position, or (tests, scoring) every position */
        for (int t = mode == 2 ? 0 : T - 1; mode && t < T; t++) {
#pragma omp single
            for (int c = 0; c < d; c++) s->h[c] = s->H[(size_t)c * ldx + t];
            head_vec(m, s, k, logits + (mode == 2 ? (size_t)t * I->vocab_size : 0), NULL);
        }
#pragma omp single
        for (int c = 0; c < d; c++) s->h[c] = s->H[(size_t)c * ldx + T - 1];
    }
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
    if (s->m2) return sb_m2_forward(m, s->m2, tokens, n, logits, mode, err, errlen);
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
