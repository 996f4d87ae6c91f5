#include "gguf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sparsamba.h"

typedef struct {
    const uint8_t *p, *end;
} cursor;

/* every read goes through need(): nothing is touched past the end of the mapping */
static int need(cursor *c, uint64_t n) { return (uint64_t)(c->end - c->p) >= n; }

static int rd_u32(cursor *c, uint32_t *v) {
    if (!need(c, 4)) return 0;
    memcpy(v, c->p, 4);
    c->p += 4;
    return 1;
}

static int rd_u64(cursor *c, uint64_t *v) {
    if (!need(c, 8)) return 0;
    memcpy(v, c->p, 8);
    c->p += 8;
    return 1;
}

static int rd_str(cursor *c, const char **s, uint64_t *len) {
    if (!rd_u64(c, len) || !need(c, *len)) return 0;
    *s = (const char *)c->p;
    c->p += *len;
    return 1;
}

static uint64_t scalar_size(uint32_t t) {
    switch (t) {
    case GV_U8: case GV_I8: case GV_BOOL: return 1;
    case GV_U16: case GV_I16: return 2;
    case GV_U32: case GV_I32: case GV_F32: return 4;
    case GV_U64: case GV_I64: case GV_F64: return 8;
    default: return 0;
    }
}

/* skip one value of type t; arrays nest (GGUF allows arrays of arrays) up to a small depth */
static int skip_value(cursor *c, uint32_t t, int depth) {
    uint64_t sz = scalar_size(t);
    if (sz) {
        if (!need(c, sz)) return 0;
        c->p += sz;
        return 1;
    }
    if (t == GV_STRING) {
        const char *s;
        uint64_t len;
        return rd_str(c, &s, &len);
    }
    if (t == GV_ARRAY && depth < 4) {
        uint32_t et;
        uint64_t n;
        if (!rd_u32(c, &et) || !rd_u64(c, &n)) return 0;
        uint64_t esz = scalar_size(et);
        if (esz) {
            if (n > (uint64_t)(c->end - c->p) / esz) return 0;
            c->p += n * esz;
            return 1;
        }
        if (et != GV_STRING && et != GV_ARRAY) return 0;
        /* each element takes at least 8 bytes: a count beyond that is a lie, stop early */
        if (n > (uint64_t)(c->end - c->p) / 8) return 0;
        for (uint64_t i = 0; i < n; i++)
            if (!skip_value(c, et, depth + 1)) return 0;
        return 1;
    }
    return 0;
}

size_t gg_type_size(uint32_t type) {
    switch (type) {
    case GG_F32: case GG_I32: return 4;
    case GG_F16: case GG_I16: return 2;
    case GG_I8: return 1;
    case GG_I64: case GG_F64: return 8;
    default: return 0;
    }
}

/* byte-wise order of two length-delimited names */
static int name_cmp(const char *a, uint64_t alen, const char *b, uint64_t blen) {
    int c = memcmp(a, b, alen < blen ? alen : blen);
    return c ? c : (alen > blen) - (alen < blen);
}

/* qsort has no context argument in C11, so the file being sorted is set here (per thread) just
 * before each sort */
static _Thread_local const gg_file *sort_f;

static int cmp_name(const void *x, const void *y) {
    const gg_tensor *a = &sort_f->tensors[*(const uint64_t *)x], *b = &sort_f->tensors[*(const uint64_t *)y];
    return name_cmp(a->name, a->name_len, b->name, b->name_len);
}

static int cmp_data(const void *x, const void *y) {
    const gg_tensor *a = &sort_f->tensors[*(const uint64_t *)x], *b = &sort_f->tensors[*(const uint64_t *)y];
    return (a->data > b->data) - (a->data < b->data);
}

int gg_parse(gg_file *f, const uint8_t *base, uint64_t size, char *err, size_t errlen) {
    memset(f, 0, sizeof *f);
    f->base = base;
    f->size = size;
    cursor c = {base, base + size};
    if (size < 24 || memcmp(base, "GGUF", 4) != 0) {
        snprintf(err, errlen, "not a GGUF file (wrong magic or shorter than a header)");
        return SB_ERR_FORMAT;
    }
    c.p += 4;
    rd_u32(&c, &f->version);
    if (f->version != 3) {
        snprintf(err, errlen, "GGUF version %u is not supported (this engine reads version 3)", f->version);
        return SB_ERR_FORMAT;
    }
    rd_u64(&c, &f->n_tensors);
    rd_u64(&c, &f->n_kv);
    /* a key-value pair takes at least 12 bytes and a tensor info at least 24: bound the counts by
     * the file size before allocating anything */
    if (f->n_kv > size / 12 || f->n_tensors > size / 24) {
        snprintf(err, errlen, "header counts (%llu keys, %llu tensors) do not fit in a %llu-byte file",
                 (unsigned long long)f->n_kv, (unsigned long long)f->n_tensors, (unsigned long long)size);
        return SB_ERR_FORMAT;
    }
    f->kv = calloc(f->n_kv ? f->n_kv : 1, sizeof *f->kv);
    f->tensors = calloc(f->n_tensors ? f->n_tensors : 1, sizeof *f->tensors);
    if (!f->kv || !f->tensors) {
        gg_free(f);
        snprintf(err, errlen, "out of memory reading the GGUF header");
        return SB_ERR_NOMEM;
    }
    f->alignment = 32; /* GGUF's default */
    for (uint64_t i = 0; i < f->n_kv; i++) {
        gg_kv *kv = &f->kv[i];
        if (!rd_str(&c, &kv->key, &kv->key_len) || !rd_u32(&c, &kv->type)) {
            snprintf(err, errlen, "truncated key-value pair %llu of %llu", (unsigned long long)i,
                     (unsigned long long)f->n_kv);
            gg_free(f);
            return SB_ERR_FORMAT;
        }
        kv->val = c.p;
        if (!skip_value(&c, kv->type, 0)) {
            snprintf(err, errlen, "key '%.*s': value of type %u is truncated or malformed",
                     (int)(kv->key_len > 200 ? 200 : kv->key_len), kv->key, kv->type);
            gg_free(f);
            return SB_ERR_FORMAT;
        }
    }
    const gg_kv *al = gg_find_kv(f, "general.alignment");
    if (al) {
        uint32_t a = 0;
        /* at least 8: the engine reads f32 / i32 / i64 tensors in place, and a smaller alignment
         * would make those reads misaligned (undefined behaviour in C) */
        if (al->type != GV_U32 || (memcpy(&a, al->val, 4), a < 8) || (a & (a - 1)) || a > 65536) {
            snprintf(err, errlen,
                     "general.alignment must be a u32 power of two from 8 to 65536 (got type %u, value %u); "
                     "recompile the model with sparsamba compile",
                     al->type, a);
            gg_free(f);
            return SB_ERR_FORMAT;
        }
        f->alignment = a;
    }
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        gg_tensor *t = &f->tensors[i];
        uint64_t off;
        if (!rd_str(&c, &t->name, &t->name_len) || !rd_u32(&c, &t->n_dims)) goto truncated;
        if (t->n_dims == 0 || t->n_dims > 4) {
            snprintf(err, errlen, "tensor '%.*s': %u dimensions (1 to 4 allowed)", (int)(t->name_len > 200 ? 200 : t->name_len),
                     t->name, t->n_dims);
            gg_free(f);
            return SB_ERR_FORMAT;
        }
        uint64_t count = 1;
        for (uint32_t d = 0; d < 4; d++) t->ne[d] = 1;
        for (uint32_t d = 0; d < t->n_dims; d++) {
            if (!rd_u64(&c, &t->ne[d])) goto truncated;
            /* overflow-safe product: no dimension or count beyond the file's size is possible */
            if (t->ne[d] == 0 || t->ne[d] > size || count > size / t->ne[d]) {
                snprintf(err, errlen, "tensor '%.*s': dimension %u = %llu is out of range",
                         (int)(t->name_len > 200 ? 200 : t->name_len), t->name, d, (unsigned long long)t->ne[d]);
                gg_free(f);
                return SB_ERR_FORMAT;
            }
            count *= t->ne[d];
        }
        if (!rd_u32(&c, &t->type) || !rd_u64(&c, &off)) goto truncated;
        size_t ts = gg_type_size(t->type);
        if (!ts) {
            snprintf(err, errlen, "tensor '%.*s': type %u is not one this engine reads (F32, F16, I8, I16, I32, I64, F64)",
                     (int)(t->name_len > 200 ? 200 : t->name_len), t->name, t->type);
            gg_free(f);
            return SB_ERR_FORMAT;
        }
        t->nbytes = count * ts; /* count <= size, ts <= 8: no overflow */
        t->data = (const uint8_t *)(uintptr_t)off; /* fixed up below, once the data start is known */
        continue;
    truncated:
        snprintf(err, errlen, "truncated tensor info %llu of %llu", (unsigned long long)i,
                 (unsigned long long)f->n_tensors);
        gg_free(f);
        return SB_ERR_FORMAT;
    }
    uint64_t pos = (uint64_t)(c.p - base);
    uint64_t data_start = (pos + f->alignment - 1) / f->alignment * f->alignment;
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        gg_tensor *t = &f->tensors[i];
        uint64_t off = (uint64_t)(uintptr_t)t->data;
        if (off % f->alignment || data_start > size || off > size - data_start ||
            t->nbytes > size - data_start - off) {
            snprintf(err, errlen, "tensor '%.*s': data at offset %llu (+%llu bytes) is %s the %llu-byte file",
                     (int)(t->name_len > 200 ? 200 : t->name_len), t->name, (unsigned long long)off,
                     (unsigned long long)t->nbytes, off % f->alignment ? "misaligned in" : "outside",
                     (unsigned long long)size);
            gg_free(f);
            return SB_ERR_FORMAT;
        }
        t->data = base + data_start + off;
    }
    /* Tensors may not share bytes: a small file whose thousands of tensors all point at one blob
     * would otherwise describe a model far larger than itself. Names must be distinct, and a
     * name-sorted index makes every lookup a binary search. */
    if (f->n_tensors) {
        f->by_name = malloc(f->n_tensors * sizeof *f->by_name);
        uint64_t *by_off = malloc(f->n_tensors * sizeof *by_off);
        if (!f->by_name || !by_off) {
            free(by_off);
            gg_free(f);
            snprintf(err, errlen, "out of memory");
            return SB_ERR_NOMEM;
        }
        for (uint64_t i = 0; i < f->n_tensors; i++) f->by_name[i] = by_off[i] = i;
        sort_f = f;
        qsort(f->by_name, f->n_tensors, sizeof *f->by_name, cmp_name);
        qsort(by_off, f->n_tensors, sizeof *by_off, cmp_data);
        for (uint64_t i = 1; i < f->n_tensors; i++) {
            const gg_tensor *a = &f->tensors[f->by_name[i - 1]], *b = &f->tensors[f->by_name[i]];
            const gg_tensor *p = &f->tensors[by_off[i - 1]], *q = &f->tensors[by_off[i]];
            const char *what = NULL;
            if (a->name_len == b->name_len && memcmp(a->name, b->name, a->name_len) == 0) {
                what = "appears twice";
                q = b;
            } else if (p->data + p->nbytes > q->data)
                what = "overlaps the data of another tensor";
            if (what) {
                snprintf(err, errlen, "tensor '%.*s' %s", (int)(q->name_len > 200 ? 200 : q->name_len), q->name, what);
                free(by_off);
                gg_free(f);
                return SB_ERR_FORMAT;
            }
        }
        free(by_off);
    }
    return SB_OK;
}

void gg_free(gg_file *f) {
    free(f->kv);
    free(f->tensors);
    free(f->by_name);
    f->kv = NULL;
    f->tensors = NULL;
    f->by_name = NULL;
}

static int name_eq(const char *s, uint64_t len, const char *z) {
    size_t zl = strlen(z);
    return len == zl && memcmp(s, z, zl) == 0;
}

const gg_kv *gg_find_kv(const gg_file *f, const char *key) {
    for (uint64_t i = 0; i < f->n_kv; i++)
        if (name_eq(f->kv[i].key, f->kv[i].key_len, key)) return &f->kv[i];
    return NULL;
}

const gg_tensor *gg_find_tensor(const gg_file *f, const char *name) {
    size_t zl = strlen(name);
    uint64_t lo = 0, hi = f->n_tensors;
    while (lo < hi) { /* binary search of the name-sorted index */
        uint64_t mid = lo + (hi - lo) / 2;
        const gg_tensor *t = &f->tensors[f->by_name[mid]];
        int c = name_cmp(t->name, t->name_len, name, zl);
        if (c == 0) return t;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

static const gg_kv *need_kv(const gg_file *f, const char *key, char *err, size_t errlen) {
    const gg_kv *kv = gg_find_kv(f, key);
    if (!kv) snprintf(err, errlen, "missing key '%s'", key);
    return kv;
}

int gg_get_u32(const gg_file *f, const char *key, uint32_t *out, char *err, size_t errlen) {
    const gg_kv *kv = need_kv(f, key, err, errlen);
    if (!kv) return SB_ERR_FORMAT;
    uint64_t u = 0;
    int64_t s = 0;
    switch (kv->type) { /* any integer type, as long as the value fits */
    case GV_U8: u = kv->val[0]; break;
    case GV_U16: { uint16_t v; memcpy(&v, kv->val, 2); u = v; } break;
    case GV_U32: { uint32_t v; memcpy(&v, kv->val, 4); u = v; } break;
    case GV_U64: memcpy(&u, kv->val, 8); break;
    case GV_I8: s = (int8_t)kv->val[0]; goto sgn;
    case GV_I16: { int16_t v; memcpy(&v, kv->val, 2); s = v; } goto sgn;
    case GV_I32: { int32_t v; memcpy(&v, kv->val, 4); s = v; } goto sgn;
    case GV_I64: memcpy(&s, kv->val, 8); goto sgn;
    default:
        snprintf(err, errlen, "key '%s' has type %u, expected an integer", key, kv->type);
        return SB_ERR_FORMAT;
    }
    goto check;
sgn:
    if (s < 0) {
        snprintf(err, errlen, "key '%s' is negative (%lld)", key, (long long)s);
        return SB_ERR_FORMAT;
    }
    u = (uint64_t)s;
check:
    if (u > 0x7fffffffULL) {
        snprintf(err, errlen, "key '%s' = %llu is out of range", key, (unsigned long long)u);
        return SB_ERR_FORMAT;
    }
    *out = (uint32_t)u;
    return SB_OK;
}

int gg_get_f32(const gg_file *f, const char *key, float *out, char *err, size_t errlen) {
    const gg_kv *kv = need_kv(f, key, err, errlen);
    if (!kv) return SB_ERR_FORMAT;
    if (kv->type == GV_F32) {
        memcpy(out, kv->val, 4);
    } else if (kv->type == GV_F64) {
        double d;
        memcpy(&d, kv->val, 8);
        *out = (float)d;
    } else {
        snprintf(err, errlen, "key '%s' has type %u, expected a float", key, kv->type);
        return SB_ERR_FORMAT;
    }
    return SB_OK;
}

int gg_get_bool(const gg_file *f, const char *key, int *out, char *err, size_t errlen) {
    const gg_kv *kv = need_kv(f, key, err, errlen);
    if (!kv) return SB_ERR_FORMAT;
    if (kv->type != GV_BOOL) {
        snprintf(err, errlen, "key '%s' has type %u, expected a bool", key, kv->type);
        return SB_ERR_FORMAT;
    }
    *out = kv->val[0] != 0;
    return SB_OK;
}

int gg_get_str(const gg_file *f, const char *key, const char **s, uint64_t *len, char *err, size_t errlen) {
    const gg_kv *kv = need_kv(f, key, err, errlen);
    if (!kv) return SB_ERR_FORMAT;
    if (kv->type != GV_STRING) {
        snprintf(err, errlen, "key '%s' has type %u, expected a string", key, kv->type);
        return SB_ERR_FORMAT;
    }
    memcpy(len, kv->val, 8); /* bounds were checked when the value was skipped */
    *s = (const char *)kv->val + 8;
    return SB_OK;
}
