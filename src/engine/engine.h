/* Internal structures of the engine: the model as views into the mapped file, and the kernel
 * table that the scalar reference and each SIMD family fill in. */
#ifndef SB_ENGINE_H
#define SB_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "gguf.h"
#include "sparsamba.h"

/* One class of a linear layer: rows that all remove n weights of every group of 4 (n = 0 with no
 * codes is also how a dense matrix is described). Values are views into the mapping. */
typedef struct {
    int n;                /* weights removed per group of 4; 0 = dense row */
    int rows;             /* rows in this class */
    int len;              /* values per row: G*(4-n) packed, `in` for a dense `.weight` */
    int G, cb;            /* groups per row and code bytes per row */
    int dtype;            /* GG_F32 / GG_F16 / GG_I8 */
    const uint8_t *values;
    const uint8_t *vend;  /* one past the values: SIMD loads near it take the careful path */
    const uint8_t *codes; /* rows x cb 4-bit masks; NULL when n == 0 */
    const int32_t *idx;   /* output index of each row; NULL = row r writes output r */
    const float *scale;   /* per-row scales for int8, else NULL */
} sb_class;

typedef struct {
    int out, in;
    int nclass;
    sb_class cls[4];
    const float *bias;    /* (out,) or NULL */
} sb_linear;

typedef struct {
    const float *norm;    /* attn_norm (d,), NULL when folded into in_proj */
    sb_linear in, x, dt, out;
    const float *conv_w, *conv_b, *A, *D, *dt_bias;
} sb_layer;

struct sb_model {
    void *map;
    size_t map_size;
    gg_file gf;
    sb_info info;
    float eps;
    sb_linear embd;       /* (V, d) as one dense class: the embedding, and the head when tied */
    sb_linear head;       /* the LM head (a copy of embd's description when tied) */
    const float *out_norm;
    sb_layer *layers;
};

/* Kernels. Inputs x are fp32 and zero past `in` up to a multiple of 16 plus 16.
 * gemv: y[idx[r]] += row_r . x for rows [r0, r1) of one class.
 * gemm: channel-major activations, X[col * ldx + t], Y[out * ldy + t] += row_r . X[:, t] for
 *       t < T; scratch holds at least 8 * (4 * G + 16) floats + ints (see SB_GEMM_SCRATCH). */
typedef struct {
    const char *name;
    void (*gemv)(const sb_class *c, const float *x, float *y, int r0, int r1);
    void (*gemm)(const sb_class *c, const float *X, int ldx, int T, float *Y, int ldy, int r0, int r1,
                 void *scratch);
    void (*scan_step)(int N, const float *A, float dt, float dtx, const float *B, const float *C,
                      float *s, float *yc); /* s = exp(dt*A)*s + dtx*B ; *yc = s . C */
    void (*silu)(float *x, int n);                   /* x = x * sigmoid(x), in place */
    void (*softplus)(float *x, int n);               /* x = log(1 + e^x) (x above 20 stays x) */
    void (*mul_silu)(float *y, const float *z, int n); /* y = y * silu(z): the gate */
    float (*read_sum)(const float *x, size_t n);     /* sum of n (a multiple of 64) floats: the bandwidth probe */
} sb_kernels;

#define SB_GEMM_ROWS 8 /* rows decoded at once by gemm */
#define SB_GEMM_SCRATCH(G) ((size_t)SB_GEMM_ROWS * (4 * (size_t)(G) + 16) * 8)

extern const sb_kernels sb_kernels_ref;
#if defined(__x86_64__) || defined(_M_X64)
extern const sb_kernels sb_kernels_avx2;
#endif
#if defined(__aarch64__)
extern const sb_kernels sb_kernels_neon;
extern const sb_kernels sb_kernels_neon_fp16; /* ARMv8.2-A fp16 gemv for f16 classes, the rest neon's */
#endif
/* the family in effect (cpu/dispatch.c): the best this CPU has, unless sb_set_isa forced one */
const sb_kernels *sb_active_kernels(void);
/* tokens, count and logits mode checked as every forward does (the messages users see) */
int sb_check_forward(const sb_model *m, const int32_t *tokens, int32_t n, const float *logits, int32_t mode, char *err,
                     size_t errlen);
/* threads.c: the thread count of the next parallel region, and the products split over it by blocks of rows.
 * sb_linear_vec: y[out] += W x over every class of lin (decode, and the profiler's timings).
 * sb_linear_mat: Y[out * ldx + t] += W X[:, t] for t < T, channel-major (prefill); scr holds
 * sb_n_threads() slices of scr_size bytes, one gemm scratch per thread. */
int sb_n_threads(void);
void sb_linear_vec(const sb_kernels *k, const sb_linear *lin, const float *x, float *y);
void sb_linear_mat(const sb_kernels *k, const sb_linear *lin, const float *X, int ldx, int T, float *Y, void *scr,
                   size_t scr_size);
/* bytes the profiler spreads its weights over, so that they come from memory: max(64 MiB, 2 x LLC) */
size_t sb_profile_working_set(void);

/* fp16 -> fp32 for the scalar paths (portable, no compiler half type needed) */
static inline float sb_h2f(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, u;
    if (e == 0) {
        if (m == 0) {
            u = s;
        } else { /* subnormal: normalise */
            e = 127 - 15 + 1;
            while (!(m & 0x400)) {
                m <<= 1;
                e--;
            }
            u = s | (e << 23) | ((m & 0x3ff) << 13);
        }
    } else if (e == 31) {
        u = s | 0x7f800000 | (m << 13);
    } else {
        u = s | ((e + 127 - 15) << 23) | (m << 13);
    }
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}

/* The byte-shuffle index the NEON families expand a 4-bit code with: idx[nibble][width*j + q] is byte q
 * of the packed value input j of a group takes (kept values in order, `width` bytes each), or 0x80 (a
 * table lookup reads 0) where input j was removed. idx holds 16 x 4*width bytes. */
static inline void sb_nibble_index(uint8_t *idx, int width) {
    for (int b = 0; b < 16; b++) {
        int lane = 0;
        for (int j = 0; j < 4; j++) {
            for (int q = 0; q < width; q++)
                idx[b * 4 * width + width * j + q] = b >> j & 1 ? (uint8_t)(width * lane + q) : 0x80;
            lane += b >> j & 1;
        }
    }
}

/* value j of row r of a class, as fp32 (before the int8 row scale) */
static inline float sb_value(const sb_class *c, int r, int j) {
    size_t k = (size_t)r * c->len + j;
    if (c->dtype == GG_F32) {
        float v;
        __builtin_memcpy(&v, c->values + 4 * k, 4);
        return v;
    }
    if (c->dtype == GG_F16) {
        uint16_t h;
        __builtin_memcpy(&h, c->values + 2 * k, 2);
        return sb_h2f(h);
    }
    return (float)(int8_t)c->values[k];
}

#endif
