/* Loading a `sparsamba.mamba2` packed GGUF (docs/packed-format.md, "Mamba-2"): the keys, then every
 * tensor the forward touches checked (type, shape, the matrix blobs whole) through model.c's
 * accessors, before any compute. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mamba2.h"

#define FORMAT_VERSION 2
#define K2 "sparsamba.mamba2."

/* a gg_get_* failure, its message through the loader */
static int kv_err(sb_loader *L, int rc, const char *msg) {
    sb_load_err(L, "%s", msg);
    return rc;
}

int sb_m2_load(sb_loader *L) {
    sb_model *m = sb_loader_model(L);
    gg_file *f = &m->gf;
    char msg[256];
    int rc;
    uint32_t ver, v[8];
    if ((rc = gg_get_u32(f, "sparsamba.format_version", &ver, msg, sizeof msg))) return kv_err(L, rc, msg);
    if (ver != FORMAT_VERSION)
        return sb_load_err(L, "packed format version %u; this engine reads format version %d: recompile it with "
                              "sparsamba compile",
                           ver, FORMAT_VERSION);
    static const char *keys[8] = {K2 "vocab_size",       K2 "embedding_length", K2 "block_count",
                                  K2 "ssm.inner_size",   K2 "ssm.state_size",   K2 "ssm.conv_kernel",
                                  K2 "ssm.head_count",   K2 "ssm.group_count"};
    static const uint32_t maxv[8] = {1u << 24, 1u << 16, 4096, 1u << 18, 1024, 64, 1u << 16, 1u << 16};
    for (int i = 0; i < 8; i++) {
        if ((rc = gg_get_u32(f, keys[i], &v[i], msg, sizeof msg))) return kv_err(L, rc, msg);
        if (v[i] == 0 || v[i] > maxv[i]) return sb_load_err(L, "key '%s' = %u is out of range (1 to %u)", keys[i], v[i], maxv[i]);
    }
    int V = (int)v[0], d = (int)v[1], nl = (int)v[2], di = (int)v[3], N = (int)v[4], K = (int)v[5], h = (int)v[6],
        g = (int)v[7];
    if (di % h) return sb_load_err(L, "key '" K2 "ssm.head_count' = %d does not divide ssm.inner_size %d", h, di);
    if (h % g) return sb_load_err(L, "key '" K2 "ssm.group_count' = %d does not divide ssm.head_count %d", g, h);
    float dt_min, dt_max;
    if ((rc = gg_get_f32(f, K2 "attention.layer_norm_rms_epsilon", &m->eps, msg, sizeof msg))) return kv_err(L, rc, msg);
    if (!(m->eps >= 0.0f) || !isfinite(m->eps))
        return sb_load_err(L, "key '" K2 "attention.layer_norm_rms_epsilon' = %g must be finite and >= 0", m->eps);
    if ((rc = gg_get_f32(f, K2 "ssm.dt_min", &dt_min, msg, sizeof msg))) return kv_err(L, rc, msg);
    if ((rc = gg_get_f32(f, K2 "ssm.dt_max", &dt_max, msg, sizeof msg))) return kv_err(L, rc, msg);
    if (!(dt_min >= 0.0f) || !isfinite(dt_min) || !(dt_max >= dt_min))
        return sb_load_err(L, "keys '" K2 "ssm.dt_min' / 'ssm.dt_max' = %g / %g: need 0 <= dt_min <= dt_max, dt_min finite",
                           dt_min, dt_max);
    sb_info *I = &m->info;
    if ((rc = gg_get_bool(f, K2 "norm_folded", &I->norm_folded, msg, sizeof msg))) return kv_err(L, rc, msg);
    const char *ds;
    uint64_t dl;
    if ((rc = gg_get_str(f, "sparsamba.compile.dtype", &ds, &dl, msg, sizeof msg))) return kv_err(L, rc, msg);
    if (dl == 3 && !memcmp(ds, "f32", 3)) I->dtype = GG_F32;
    else if (dl == 3 && !memcmp(ds, "f16", 3)) I->dtype = GG_F16;
    else if (dl == 4 && !memcmp(ds, "int8", 4)) I->dtype = GG_I8;
    else return sb_load_err(L, "sparsamba.compile.dtype '%.*s' is unknown (f32, f16, int8)", (int)(dl > 16 ? 16 : dl), ds);
    I->vocab_size = V, I->d_model = d, I->n_layer = nl, I->d_inner = di, I->d_state = N, I->dt_rank = 0;
    I->d_conv = K;
    I->format_version = (int32_t)ver;
    I->file_bytes = (int64_t)m->map_size;

    sb_m2 *M = calloc(1, sizeof *M);
    if (!M) return sb_load_err(L, "out of memory");
    m->m2 = M;
    M->d = d, M->di = di, M->N = N, M->K = K, M->h = h, M->p = di / h, M->g = g;
    M->cd = di + 2 * g * N, M->n_in = di + M->cd + h;
    M->dt_min = dt_min, M->dt_max = dt_max;
    if (!(M->layers = calloc((size_t)nl, sizeof *M->layers))) return sb_load_err(L, "out of memory");

    int64_t bytes = 0;
    if ((rc = sb_load_linear(L, "token_embd", V, d, &m->embd, &bytes))) return rc;
    const sb_v2_class *ec = &m->embd.w.cls[0];
    int order = m->embd.w.nclass == 1 && ec->n == 0 && ec->rows == V;
    for (int r = 0; order && r < V; r++) order = ec->index[r] == r;
    if (!order) return sb_load_err(L, "tensor 'token_embd.v2' must be one n = 0 class of every row in token order");
    bytes = 0; /* decode reads one embedding row; the head is counted below */
    I->tied_head = gg_find_tensor(f, "output.v2") == NULL;
    if (I->tied_head) {
        m->head = m->embd;
        bytes += (int64_t)m->embd.bytes;
    } else if ((rc = sb_load_linear(L, "output", V, d, &m->head, &bytes))) {
        return rc;
    }
    if (!(m->out_norm = sb_load_vec(L, "output_norm.weight", (uint64_t)d, &rc))) return rc;
    char name[128];
#define VEC(field, fmt, n)                                                                                         \
    do {                                                                                                           \
        snprintf(name, sizeof name, fmt, i);                                                                       \
        if (!(ly->field = sb_load_vec(L, name, (uint64_t)(n), &rc))) return rc;                                   \
    } while (0)
    for (int i = 0; i < nl; i++) {
        sb_m2_layer *ly = &M->layers[i];
        if (!I->norm_folded) {
            VEC(norm, "blk.%d.attn_norm.weight", d);
            VEC(gnorm, "blk.%d.ssm_norm.weight", di);
        }
        snprintf(name, sizeof name, "blk.%d.ssm_conv1d.weight", i);
        const gg_tensor *cw = sb_load_tensor(L, name, GG_F32, (uint64_t)M->cd, (uint64_t)K, &rc);
        if (!cw) return rc;
        ly->conv_w = (const float *)cw->data;
        VEC(conv_b, "blk.%d.ssm_conv1d.bias", M->cd);
        VEC(dt_bias, "blk.%d.ssm_dt.bias", h);
        VEC(A, "blk.%d.ssm_a", h);
        VEC(D, "blk.%d.ssm_d", h);
        snprintf(name, sizeof name, "blk.%d.ssm_in", i);
        if ((rc = sb_load_linear(L, name, M->n_in, d, &ly->in, &bytes))) return rc;
        snprintf(name, sizeof name, "blk.%d.ssm_out", i);
        if ((rc = sb_load_linear(L, name, d, di, &ly->out, &bytes))) return rc;
        /* the biases are optional, but then both or none, and in every block as in block 0 */
        int has_bias = gg_find_tensor(f, "blk.0.ssm_in.bias") != NULL;
        if (has_bias) {
            VEC(in.bias, "blk.%d.ssm_in.bias", M->n_in);
            VEC(out.bias, "blk.%d.ssm_out.bias", d);
        }
    }
#undef VEC
    if (!(M->conv_wt = malloc(sizeof(float) * (size_t)nl * K * M->cd))) return sb_load_err(L, "out of memory");
    for (int i = 0; i < nl; i++) {
        M->layers[i].conv_wt = M->conv_wt + (size_t)i * K * M->cd;
        sb_conv_tap_major(M->conv_wt + (size_t)i * K * M->cd, M->layers[i].conv_w, M->cd, K);
    }
    if ((rc = sb_load_no_leftovers(L, "sparsamba.mamba2"))) return rc;
    I->weight_bytes = bytes;
    return SB_OK;
}

int32_t sb_model_arch(const sb_model *m, int32_t *n_head, int32_t *n_group) {
    if (n_head) *n_head = m->m2 ? m->m2->h : 0;
    if (n_group) *n_group = m->m2 ? m->m2->g : 0;
    return m->m2 ? 2 : 1;
}

void sb_m2_free(sb_m2 *M) {
    if (!M) return;
    free(M->layers);
    free(M->conv_wt);
    free(M);
}
