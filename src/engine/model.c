/* Loading a packed GGUF: map it, parse it, and check every tensor the engine will touch (name,
 * type, shape, row indices, codes) so that the kernels can run without a single bounds check. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine.h"
#include "mamba2.h"

#define FORMAT_VERSION 2

typedef struct sb_loader {
    sb_model *m;
    char *err;
    size_t errlen;
    unsigned char *used; /* per GGUF tensor: consumed by the model (unknown leftovers are an error) */
} loader;

static int ferr(loader *L, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(L->err, L->errlen, fmt, ap);
    va_end(ap);
    return SB_ERR_FORMAT;
}

static const char *type_name(uint32_t t) {
    switch (t) {
    case GG_F32: return "F32";
    case GG_F16: return "F16";
    case GG_I8: return "I8";
    case GG_I16: return "I16";
    case GG_I32: return "I32";
    case GG_I64: return "I64";
    case GG_F64: return "F64";
    default: return "?";
    }
}

/* Find `name` and check its type and numpy-order shape (rows, cols) (cols = 0: a 1-D tensor). */
static const gg_tensor *get(loader *L, const char *name, uint32_t type, uint64_t rows, uint64_t cols, int *rc) {
    const gg_tensor *t = gg_find_tensor(&L->m->gf, name);
    if (!t) {
        *rc = ferr(L, "missing tensor '%s'", name);
        return NULL;
    }
    L->used[t - L->m->gf.tensors] = 1;
    if (t->type != type) {
        *rc = ferr(L, "tensor '%s' has type %s, expected %s", name, type_name(t->type), type_name(type));
        return NULL;
    }
    int want_dims = cols ? 2 : 1;
    uint64_t w0 = cols ? cols : rows, w1 = cols ? rows : 1;
    if ((int)t->n_dims != want_dims || t->ne[0] != w0 || t->ne[1] != w1) {
        char got[96] = "";
        size_t o = 0;
        for (uint32_t d = t->n_dims; d-- > 0;)
            o += (size_t)snprintf(got + o, sizeof got - o, "%s%llu", o ? ", " : "", (unsigned long long)t->ne[d]);
        if (cols)
            *rc = ferr(L, "tensor '%s' has shape (%s), expected (%llu, %llu)", name, got, (unsigned long long)rows,
                       (unsigned long long)cols);
        else
            *rc = ferr(L, "tensor '%s' has shape (%s), expected (%llu,)", name, got, (unsigned long long)rows);
        return NULL;
    }
    return t;
}

static const float *vec(loader *L, const char *name, uint64_t n, int *rc) {
    const gg_tensor *t = get(L, name, GG_F32, n, 0, rc);
    return t ? (const float *)t->data : NULL;
}

static const float *opt_vec(loader *L, const char *name, uint64_t n, int *rc) {
    return gg_find_tensor(&L->m->gf, name) ? vec(L, name, n, rc) : NULL;
}

/* A matrix `prefix`, shape (out, in): the blob `prefix.v2` (a 1-D I8 tensor), checked whole by sb_v2_check. */
static int load_linear(loader *L, const char *prefix, int out, int in, sb_linear *lin, int64_t *bytes) {
    sb_model *m = L->m;
    char name[256], msg[256];
    memset(lin, 0, sizeof *lin);
    lin->out = out;
    lin->in = in;
    snprintf(name, sizeof name, "%s.v2", prefix);
    const gg_tensor *t = gg_find_tensor(&m->gf, name);
    if (!t) return ferr(L, "missing tensor '%s' (the matrix blob of %s, shape (%d, %d))", name, prefix, out, in);
    L->used[t - m->gf.tensors] = 1;
    if (t->type != GG_I8 || t->n_dims != 1)
        return ferr(L, "tensor '%s' must be a 1-D I8 tensor (a matrix blob), not %u-D %s", name, t->n_dims, type_name(t->type));
    int dt = m->info.dtype == GG_F32 ? SB_V2_F32 : m->info.dtype == GG_F16 ? SB_V2_F16 : SB_V2_I8;
    if (sb_v2_check(t->data, (size_t)t->nbytes, out, in, dt, &lin->w, msg, sizeof msg))
        return ferr(L, "tensor '%s': %s", name, msg);
    lin->bytes = (size_t)t->nbytes;
    *bytes += (int64_t)t->nbytes;
    return SB_OK;
}

static int load_model(loader *L) {
    sb_model *m = L->m;
    gg_file *f = &m->gf;
    char *err = L->err;
    size_t el = L->errlen;
    int rc;
    const char *arch;
    uint64_t alen;
    if ((rc = gg_get_str(f, "general.architecture", &arch, &alen, err, el))) return rc;
    if (alen == 16 && memcmp(arch, "sparsamba.mamba2", 16) == 0) return sb_m2_load(L);
    if (alen != 15 || memcmp(arch, "sparsamba.mamba", 15) != 0)
        return ferr(L, "architecture '%.*s' is not a sparsamba packed model ('sparsamba.mamba'); compile one with "
                       "`sparsamba compile` (a plain 'mamba' GGUF is for llama.cpp)",
                    (int)(alen > 64 ? 64 : alen), arch);
    uint32_t ver, v[7];
    if ((rc = gg_get_u32(f, "sparsamba.format_version", &ver, err, el))) return rc;
    if (ver != FORMAT_VERSION)
        return ferr(L, "packed format version %u; this engine reads format version %d: recompile it with sparsamba "
                       "compile",
                    ver, FORMAT_VERSION);
    static const char *keys[7] = {"sparsamba.mamba.vocab_size",        "sparsamba.mamba.embedding_length",
                                  "sparsamba.mamba.block_count",       "sparsamba.mamba.ssm.inner_size",
                                  "sparsamba.mamba.ssm.state_size",    "sparsamba.mamba.ssm.time_step_rank",
                                  "sparsamba.mamba.ssm.conv_kernel"};
    static const uint32_t maxv[7] = {1u << 24, 1u << 16, 4096, 1u << 18, 1024, 1u << 16, 64};
    for (int i = 0; i < 7; i++) {
        if ((rc = gg_get_u32(f, keys[i], &v[i], err, el))) return rc;
        if (v[i] == 0 || v[i] > maxv[i]) return ferr(L, "key '%s' = %u is out of range (1 to %u)", keys[i], v[i], maxv[i]);
    }
    sb_info *I = &m->info;
    I->vocab_size = (int32_t)v[0], I->d_model = (int32_t)v[1], I->n_layer = (int32_t)v[2];
    I->d_inner = (int32_t)v[3], I->d_state = (int32_t)v[4], I->dt_rank = (int32_t)v[5], I->d_conv = (int32_t)v[6];
    I->format_version = (int32_t)ver;
    I->file_bytes = (int64_t)m->map_size;
    if ((rc = gg_get_f32(f, "sparsamba.mamba.attention.layer_norm_rms_epsilon", &m->eps, err, el))) return rc;
    if ((rc = gg_get_bool(f, "sparsamba.mamba.norm_folded", &I->norm_folded, err, el))) return rc;
    const char *ds;
    uint64_t dl;
    if ((rc = gg_get_str(f, "sparsamba.compile.dtype", &ds, &dl, err, el))) return rc;
    if (dl == 3 && !memcmp(ds, "f32", 3)) I->dtype = GG_F32;
    else if (dl == 3 && !memcmp(ds, "f16", 3)) I->dtype = GG_F16;
    else if (dl == 4 && !memcmp(ds, "int8", 4)) I->dtype = GG_I8;
    else return ferr(L, "sparsamba.compile.dtype '%.*s' is unknown (f32, f16, int8)", (int)(dl > 16 ? 16 : dl), ds);

    int V = I->vocab_size, d = I->d_model, di = I->d_inner, N = I->d_state, R = I->dt_rank, K = I->d_conv;
    int64_t bytes = 0;
    if ((rc = load_linear(L, "token_embd", V, d, &m->embd, &bytes))) return rc;
    /* the lookup reads row t of the one n = 0 class as token t's vector */
    const sb_v2_class *ec = &m->embd.w.cls[0];
    int order = m->embd.w.nclass == 1 && ec->n == 0 && ec->rows == V;
    for (int r = 0; order && r < V; r++) order = ec->index[r] == r;
    if (!order) return ferr(L, "tensor 'token_embd.v2' must be one n = 0 class of every row in token order");
    bytes = 0; /* decode reads one embedding row; the head is counted below */
    I->tied_head = gg_find_tensor(f, "output.v2") == NULL;
    if (I->tied_head) {
        m->head = m->embd;
        bytes += (int64_t)m->embd.bytes;
    } else if ((rc = load_linear(L, "output", V, d, &m->head, &bytes))) {
        return rc;
    }
    if (!(m->out_norm = vec(L, "output_norm.weight", (uint64_t)d, &rc))) return rc;
    m->layers = calloc((size_t)I->n_layer, sizeof *m->layers);
    if (!m->layers) {
        snprintf(err, el, "out of memory");
        return SB_ERR_NOMEM;
    }
    char name[128];
#define VEC(field, fmt, n)                                                                                         \
    do {                                                                                                           \
        snprintf(name, sizeof name, fmt, i);                                                                       \
        if (!(ly->field = vec(L, name, (uint64_t)(n), &rc))) return rc;                                           \
    } while (0)
    for (int i = 0; i < I->n_layer; i++) {
        sb_layer *ly = &m->layers[i];
        if (!I->norm_folded) VEC(norm, "blk.%d.attn_norm.weight", d);
        snprintf(name, sizeof name, "blk.%d.ssm_conv1d.weight", i);
        const gg_tensor *cw = get(L, name, GG_F32, (uint64_t)di, (uint64_t)K, &rc);
        if (!cw) return rc;
        ly->conv_w = (const float *)cw->data;
        VEC(conv_b, "blk.%d.ssm_conv1d.bias", di);
        snprintf(name, sizeof name, "blk.%d.ssm_a", i);
        const gg_tensor *at = get(L, name, GG_F32, (uint64_t)di, (uint64_t)N, &rc);
        if (!at) return rc;
        ly->A = (const float *)at->data;
        VEC(D, "blk.%d.ssm_d", di);
        VEC(dt_bias, "blk.%d.ssm_dt.bias", di);
        static const char *lin_names[4] = {"ssm_in", "ssm_x", "ssm_dt", "ssm_out"};
        sb_linear *lins[4] = {&ly->in, &ly->x, &ly->dt, &ly->out};
        const int outs[4] = {2 * di, R + 2 * N, di, d}, ins[4] = {d, di, R, di};
        for (int k = 0; k < 4; k++) {
            snprintf(name, sizeof name, "blk.%d.%s", i, lin_names[k]);
            if ((rc = load_linear(L, name, outs[k], ins[k], lins[k], &bytes))) return rc;
        }
        snprintf(name, sizeof name, "blk.%d.ssm_in.bias", i);
        ly->in.bias = opt_vec(L, name, (uint64_t)(2 * di), &rc);
        if (rc) return rc;
        snprintf(name, sizeof name, "blk.%d.ssm_out.bias", i);
        ly->out.bias = opt_vec(L, name, (uint64_t)d, &rc);
        if (rc) return rc;
        ly->dt.bias = ly->dt_bias;
    }
#undef VEC
    /* the conv weights tap-major: one token's conv then reads each tap as a run of channels, as it reads the
     * window (forward.c) */
    if (!(m->conv_wt = malloc(sizeof(float) * (size_t)I->n_layer * K * di))) {
        snprintf(err, el, "out of memory");
        return SB_ERR_NOMEM;
    }
    for (int i = 0; i < I->n_layer; i++) {
        m->layers[i].conv_wt = m->conv_wt + (size_t)i * K * di;
        sb_conv_tap_major(m->conv_wt + (size_t)i * K * di, m->layers[i].conv_w, di, K);
    }
    for (uint64_t t = 0; t < f->n_tensors; t++)
        if (!L->used[t])
            return ferr(L, "tensor '%.*s' is not part of a sparsamba.mamba model (misnamed?)",
                        (int)(f->tensors[t].name_len > 128 ? 128 : f->tensors[t].name_len), f->tensors[t].name);
    I->weight_bytes = bytes;
    return SB_OK;
}

/* the checked accessors above, for another architecture's loader (mamba2.h) */
sb_model *sb_loader_model(sb_loader *L) { return L->m; }
int sb_load_err(sb_loader *L, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(L->err, L->errlen, fmt, ap);
    va_end(ap);
    return SB_ERR_FORMAT;
}
const gg_tensor *sb_load_tensor(sb_loader *L, const char *name, uint32_t type, uint64_t rows, uint64_t cols, int *rc) {
    return get(L, name, type, rows, cols, rc);
}
const float *sb_load_vec(sb_loader *L, const char *name, uint64_t n, int *rc) { return vec(L, name, n, rc); }
int sb_load_linear(sb_loader *L, const char *prefix, int out, int in, sb_linear *lin, int64_t *bytes) {
    return load_linear(L, prefix, out, in, lin, bytes);
}
int sb_load_no_leftovers(sb_loader *L, const char *arch) {
    const gg_file *f = &L->m->gf;
    for (uint64_t t = 0; t < f->n_tensors; t++)
        if (!L->used[t])
            return ferr(L, "tensor '%.*s' is not part of a %s model (misnamed?)",
                        (int)(f->tensors[t].name_len > 128 ? 128 : f->tensors[t].name_len), f->tensors[t].name, arch);
    return SB_OK;
}

int sb_model_load(const char *path, sb_model **out, char *err, size_t errlen) {
    char msg[512] = "";
    *out = NULL;
    /* O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever; the
     * fstat below then refuses anything that is not a regular file */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, errlen, "%s: cannot open (%s)", path, strerror(errno));
        return SB_ERR_IO;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        snprintf(err, errlen, "%s: not a regular file", path);
        return SB_ERR_IO;
    }
    if (st.st_size < 24) {
        close(fd);
        snprintf(err, errlen, "%s: not a GGUF file (%lld bytes, shorter than a header)", path, (long long)st.st_size);
        return SB_ERR_FORMAT;
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        int e = errno;
        if (e == ENOMEM)
            snprintf(err, errlen, "%s: cannot map the %lld-byte model (%s): it does not fit in this process's memory",
                     path, (long long)st.st_size, strerror(e));
        else
            snprintf(err, errlen, "%s: cannot map (%s)", path, strerror(e));
        return e == ENOMEM ? SB_ERR_NOMEM : SB_ERR_IO;
    }
    sb_model *m = calloc(1, sizeof *m);
    if (!m) {
        munmap(map, (size_t)st.st_size);
        snprintf(err, errlen, "%s: out of memory", path);
        return SB_ERR_NOMEM;
    }
    m->map = map;
    m->map_size = (size_t)st.st_size;
    int rc = gg_parse(&m->gf, map, (uint64_t)st.st_size, msg, sizeof msg);
    if (rc == SB_OK) {
        loader L = {m, msg, sizeof msg, calloc(m->gf.n_tensors ? m->gf.n_tensors : 1, 1)};
        if (!L.used) {
            snprintf(msg, sizeof msg, "out of memory");
            rc = SB_ERR_NOMEM;
        } else {
            rc = load_model(&L);
        }
        free(L.used);
    }
    if (rc != SB_OK) {
        snprintf(err, errlen, "%s: %s", path, msg);
        sb_model_free(m);
        return rc;
    }
    *out = m;
    return SB_OK;
}

void sb_model_free(sb_model *m) {
    if (!m) return;
    gg_free(&m->gf);
    free(m->layers);
    free(m->conv_wt);
    sb_m2_free(m->m2);
    if (m->map) munmap(m->map, m->map_size);
    free(m);
}

void sb_model_info(const sb_model *m, sb_info *out) { *out = m->info; }
