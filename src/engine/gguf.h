/* A GGUF v3 reader over a read-only mapping: every length, count, offset and size is checked
 * against the file before it is used, so a truncated or hostile file gives an error, never an
 * out-of-bounds read. Only what the engine needs is kept: scalar keys and tensor descriptions. */
#ifndef SB_GGUF_H
#define SB_GGUF_H

#include <stddef.h>
#include <stdint.h>

enum { GG_F32 = 0, GG_F16 = 1, GG_I8 = 24, GG_I16 = 25, GG_I32 = 26, GG_I64 = 27, GG_F64 = 28 };

enum {
    GV_U8 = 0, GV_I8, GV_U16, GV_I16, GV_U32, GV_I32, GV_F32, GV_BOOL, GV_STRING, GV_ARRAY, GV_U64,
    GV_I64, GV_F64
};

typedef struct {
    const char *key; /* not NUL-terminated */
    uint64_t key_len;
    uint32_t type;
    const uint8_t *val; /* points at the value in the mapping (for a string: its u64 length) */
} gg_kv;

typedef struct {
    const char *name;
    uint64_t name_len;
    uint32_t n_dims;
    uint64_t ne[4]; /* ggml order: ne[0] is the contiguous dimension */
    uint32_t type;
    uint64_t nbytes;
    const uint8_t *data;
} gg_tensor;

typedef struct {
    const uint8_t *base;
    uint64_t size;
    uint32_t version, alignment;
    uint64_t n_kv, n_tensors;
    gg_kv *kv;
    gg_tensor *tensors;
    uint64_t *by_name; /* tensor indices sorted by name, for gg_find_tensor's binary search */
} gg_file;

/* Parse the mapping [base, base+size). Returns 0, or SB_ERR_* with a message in err. */
int gg_parse(gg_file *f, const uint8_t *base, uint64_t size, char *err, size_t errlen);
void gg_free(gg_file *f);

const gg_kv *gg_find_kv(const gg_file *f, const char *key);
const gg_tensor *gg_find_tensor(const gg_file *f, const char *name);
/* Scalar getters: 0 on success, SB_ERR_FORMAT (with message) when missing or of a wrong type. */
int gg_get_u32(const gg_file *f, const char *key, uint32_t *out, char *err, size_t errlen);
int gg_get_f32(const gg_file *f, const char *key, float *out, char *err, size_t errlen);
int gg_get_bool(const gg_file *f, const char *key, int *out, char *err, size_t errlen);
/* A string value: pointer into the mapping and its length. */
int gg_get_str(const gg_file *f, const char *key, const char **s, uint64_t *len, char *err, size_t errlen);
size_t gg_type_size(uint32_t type); /* 0 for types the engine does not read */

#endif
