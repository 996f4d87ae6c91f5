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

#define FORMAT_VERSION 1

typedef struct {
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

static int check_scales(loader *L, const char *name, const float *s, int n) {
    for (int i = 0; i < n; i++)
        if (!isfinite(s[i])) return ferr(L, "tensor '%s': scale %d is not finite", name, i);
    return SB_OK;
}

static int64_t bytes_of(loader *L, const char *name) {
    const gg_tensor *t = gg_find_tensor(&L->m->gf, name);
    return t ? (int64_t)t->nbytes : 0;
}

/* A prunable (or dense) matrix `prefix`, shape (out, in): either prefix.weight or its classes. */
static int load_linear(loader *L, const char *prefix, int out, int in, sb_linear *lin, int64_t *bytes) {
    sb_model *m = L->m;
    int dt = m->info.dtype, rc = SB_OK;
    char name[256];
    memset(lin, 0, sizeof *lin);
    lin->out = out;
    lin->in = in;
    int G = (in + 3) / 4, cb = (G + 1) / 2;
    snprintf(name, sizeof name, "%s.weight", prefix);
    if (gg_find_tensor(&m->gf, name)) {
        const gg_tensor *w = get(L, name, (uint32_t)dt, (uint64_t)out, (uint64_t)in, &rc);
        if (!w) return rc;
        *bytes += (int64_t)w->nbytes;
        sb_class *c = &lin->cls[lin->nclass++];
        *c = (sb_class){0, out, in, G, cb, dt, w->data, w->data + w->nbytes, NULL, NULL, NULL};
        if (dt == GG_I8) {
            snprintf(name, sizeof name, "%s.scale", prefix);
            if (!(c->scale = vec(L, name, (uint64_t)out, &rc))) return rc;
            if ((rc = check_scales(L, name, c->scale, out))) return rc;
            *bytes += bytes_of(L, name);
        }
        for (int n = 0; n < 4; n++) {
            snprintf(name, sizeof name, "%s.c%d.values", prefix, n);
            if (gg_find_tensor(&m->gf, name))
                return ferr(L, "layer '%s' has both a dense .weight and packed classes", prefix);
        }
        return SB_OK;
    }
    unsigned char *seen = calloc((size_t)out, 1);
    if (!seen) {
        snprintf(L->err, L->errlen, "out of memory checking '%s'", prefix);
        return SB_ERR_NOMEM;
    }
    for (int n = 0; n < 4 && rc == SB_OK; n++) {
        snprintf(name, sizeof name, "%s.c%d.values", prefix, n);
        const gg_tensor *vt = gg_find_tensor(&m->gf, name);
        if (!vt) continue;
        /* rows come from the values' leading dimension; every companion must agree */
        uint64_t rows = vt->n_dims == 2 ? vt->ne[1] : 0;
        int len = G * (4 - n);
        if (rows == 0 || rows > (uint64_t)out) {
            rc = ferr(L, "tensor '%s' must be 2-D with 1 to %d rows", name, out);
            break;
        }
        if (!(vt = get(L, name, (uint32_t)dt, rows, (uint64_t)len, &rc))) break;
        sb_class *c = &lin->cls[lin->nclass++];
        *c = (sb_class){n, (int)rows, len, G, cb, dt, vt->data, vt->data + vt->nbytes, NULL, NULL, NULL};
        *bytes += (int64_t)vt->nbytes;
        snprintf(name, sizeof name, "%s.c%d.rows", prefix, n);
        const gg_tensor *it = get(L, name, GG_I32, rows, 0, &rc);
        if (!it) break;
        c->idx = (const int32_t *)it->data;
        *bytes += (int64_t)it->nbytes;
        for (uint64_t r = 0; r < rows; r++) {
            int32_t o = c->idx[r];
            if (o < 0 || o >= out || seen[o]) {
                rc = ferr(L, "tensor '%s': row %llu writes output %d, which is %s", name, (unsigned long long)r, o,
                          (o < 0 || o >= out) ? "out of range" : "already written by another row");
                break;
            }
            seen[o] = 1;
        }
        if (rc) break;
        if (n > 0) {
            snprintf(name, sizeof name, "%s.c%d.codes", prefix, n);
            const gg_tensor *ct = get(L, name, GG_I8, rows, (uint64_t)cb, &rc);
            if (!ct) break;
            c->codes = ct->data;
            *bytes += (int64_t)ct->nbytes;
            /* the kernels read exactly 4-n values per group: a wrong bit count would walk off
             * the row, so every nibble is checked here, once */
            for (uint64_t r = 0; r < rows && !rc; r++) {
                const uint8_t *code = c->codes + r * (uint64_t)cb;
                for (int g = 0; g < G; g++) {
                    int mask = (code[g >> 1] >> ((g & 1) * 4)) & 15;
                    if (__builtin_popcount((unsigned)mask) != 4 - n) {
                        rc = ferr(L, "tensor '%s': row %llu group %d keeps %d weights, class c%d keeps %d", name,
                                  (unsigned long long)r, g, __builtin_popcount((unsigned)mask), n, 4 - n);
                        break;
                    }
                }
                if (!rc && (G & 1) && (code[cb - 1] >> 4))
                    rc = ferr(L, "tensor '%s': row %llu has bits in the unused last nibble", name, (unsigned long long)r);
            }
            if (rc) break;
        }
        if (dt == GG_I8) {
            snprintf(name, sizeof name, "%s.c%d.scale", prefix, n);
            if (!(c->scale = vec(L, name, rows, &rc))) break;
            if ((rc = check_scales(L, name, c->scale, (int)rows))) break;
            *bytes += bytes_of(L, name);
        }
    }
    free(seen);
    if (rc == SB_OK && lin->nclass == 0) rc = ferr(L, "missing tensor '%s.weight' (or its packed classes '%s.cN.*')", prefix, prefix);
    return rc;
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
    if (alen != 15 || memcmp(arch, "sparsamba.mamba", 15) != 0)
        return ferr(L, "architecture '%.*s' is not a sparsamba packed model ('sparsamba.mamba'); compile one with "
                       "`sparsamba compile` (a plain 'mamba' GGUF is for llama.cpp)",
                    (int)(alen > 64 ? 64 : alen), arch);
    uint32_t ver, v[7];
    if ((rc = gg_get_u32(f, "sparsamba.format_version", &ver, err, el))) return rc;
    if (ver != FORMAT_VERSION)
        return ferr(L, "packed format version %u is not supported (this engine reads version %d); recompile the model "
                       "with this sparsamba",
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
    if (m->embd.nclass != 1 || m->embd.cls[0].codes)
        return ferr(L, "token_embd must be a dense .weight");
    bytes = 0; /* decode reads one embedding row; the head is counted below */
    I->tied_head = gg_find_tensor(f, "output.weight") == NULL;
    if (I->tied_head) {
        m->head = m->embd;
        bytes += (int64_t)m->embd.cls[0].rows * m->embd.cls[0].len * (int64_t)gg_type_size((uint32_t)I->dtype);
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
    for (uint64_t t = 0; t < f->n_tensors; t++)
        if (!L->used[t])
            return ferr(L, "tensor '%.*s' is not part of a sparsamba.mamba model (misnamed?)",
                        (int)(f->tensors[t].name_len > 128 ? 128 : f->tensors[t].name_len), f->tensors[t].name);
    I->weight_bytes = bytes;
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
    if (m->map) munmap(m->map, m->map_size);
    free(m);
}

void sb_model_info(const sb_model *m, sb_info *out) { *out = m->info; }
