/* Packed format v2 ("rows in lanes") of one matrix, and its decode GEMV / prefill GEMM kernels.
 *
 * The byte layout is docs/packed-format.md's "Matrix blob"; the inline functions below are its
 * formulas (sizes and offsets), shared by the loader's validation, the kernels and their test.
 * Every kernel computes, for the blocks [b0, b1) of one class,
 *     y[index[r]] += W_r . x        (index[r] < 0: a padding row, nothing is written)
 * one panel sum at a time, and has the scalar twin sb_v2_gemv_ref, which reads the layout the
 * plainest way and is the spec. No ISA flags here: the ISA files include this header. */
#ifndef SB_LINEAR_V2_H
#define SB_LINEAR_V2_H

#include <stddef.h>
#include <stdint.h>

#define SB_V2_MAGIC 0x32565053u /* "SPV2" little-endian */
#define SB_V2_VERSION 2
#define SB_V2_B 16     /* rows per block: one AVX-512 register, two AVX2, four NEON */
#define SB_V2_CHUNK 64 /* inputs per chunk: 16 groups of 4 */
#define SB_V2_ALIGN 64

enum { SB_V2_F32 = 0, SB_V2_F16 = 1, SB_V2_I8 = 2 };

/* 64-byte matrix header, then the class sections at the given offsets (0 = class absent) */
typedef struct {
    uint32_t magic, version, dtype, out, in, panel, block, reserved;
    uint64_t class_off[4];
} sb_v2_header;

/* 64-byte class header at the start of each class section; offsets relative to that start */
typedef struct {
    uint32_t n, rows, nblocks, reserved;
    uint64_t off_index, off_scale, off_stream, stream_bytes;
    uint64_t pad[2];
} sb_v2_class_header;

_Static_assert(sizeof(sb_v2_header) == 64, "matrix header is 64 bytes");
_Static_assert(sizeof(sb_v2_class_header) == 64, "class header is 64 bytes");

/* ---- sizes: the formulas of docs/packed-format.md ---- */

static inline size_t sb_v2_up(size_t v, size_t m) { return (v + m - 1) / m * m; }
static inline int sb_v2_esize(int dtype) { return dtype == SB_V2_F32 ? 4 : dtype == SB_V2_F16 ? 2 : 1; }
/* bytes of 2-bit code words of one block per chunk: one u32 per row (n = 1, 3), two (n = 2) */
static inline size_t sb_v2_code_bytes(int n) { return n == 0 ? 0 : n == 2 ? 2 * 4 * SB_V2_B : 4 * SB_V2_B; }
/* kept values per row in a chunk of G groups; int8 stores them in pairs, so rounds up to even */
static inline int sb_v2_slots(int n, int G, int dtype) {
    int s = G * (4 - n);
    return dtype == SB_V2_I8 ? (s + 1) & ~1 : s;
}
/* one chunk record of a block: codes then values, padded to 64 bytes */
static inline size_t sb_v2_record_bytes(int n, int dtype, int G) {
    return sb_v2_up(sb_v2_code_bytes(n) + (size_t)sb_v2_slots(n, G, dtype) * SB_V2_B * sb_v2_esize(dtype), SB_V2_ALIGN);
}
/* inputs of panel p (the last one may be short) */
static inline int sb_v2_panel_len(int K, int P, int p) { return K - p * P < P ? K - p * P : P; }
static inline int sb_v2_npanels(int K, int P) { return (K + P - 1) / P; }
/* bytes of one block's stream over panel p: full chunks, then a tail chunk of ceil(rest / 4) groups */
static inline size_t sb_v2_block_panel_bytes(int n, int dtype, int K, int P, int p) {
    int len = sb_v2_panel_len(K, P, p), full = len / SB_V2_CHUNK, rest = len % SB_V2_CHUNK;
    size_t s = (size_t)full * sb_v2_record_bytes(n, dtype, 16);
    if (rest) s += sb_v2_record_bytes(n, dtype, (rest + 3) / 4);
    return s;
}
static inline size_t sb_v2_stream_bytes(int n, int dtype, int K, int P, int nblocks) {
    size_t s = 0;
    for (int p = 0; p < sb_v2_npanels(K, P); p++) s += sb_v2_block_panel_bytes(n, dtype, K, P, p);
    return s * (size_t)nblocks;
}
/* where the stream starts in a class section: header, row index (int32), int8 scales (fp32) */
static inline size_t sb_v2_stream_off(int dtype, size_t nblocks) {
    return 64 + 64 * nblocks * (dtype == SB_V2_I8 ? 2 : 1);
}
static inline size_t sb_v2_class_bytes(int n, int dtype, int K, int P, int rows) {
    size_t nb = (size_t)(rows + SB_V2_B - 1) / SB_V2_B;
    return sb_v2_stream_off(dtype, nb) + sb_v2_stream_bytes(n, dtype, K, P, (int)nb);
}
/* the panel width the compiler chooses: one panel while x (fp32) stays well inside L1, else 1024 */
static inline int sb_v2_default_panel(int K) { return K <= 2048 ? (int)sb_v2_up((size_t)K, SB_V2_CHUNK) : 1024; }

/* position in its chunk (0..63) of kept slot t of a row, from that row's code words w[0..1] */
static inline int sb_v2_slot_pos(int n, const uint32_t *w, int t) {
    switch (n) {
    case 0: return t;
    case 1: { /* field g is the removed position; kept ones follow it in rotated order */
        int g = t / 3, k = t % 3;
        return 4 * g + (int)(((w[0] >> 2 * g) + 1 + k) & 3);
    }
    case 2: return 4 * (t / 2) + (int)(w[t / 16] >> 2 * (t % 16) & 3);
    default: return 4 * t + (int)(w[0] >> 2 * t & 3);
    }
}
/* element index of (slot t, row r) among a record's values: slot-major, int8 in row-interleaved pairs */
static inline size_t sb_v2_value_at(int dtype, int t, int r) {
    return dtype == SB_V2_I8 ? (size_t)32 * (t / 2) + 2 * r + (t & 1) : (size_t)SB_V2_B * t + r;
}

/* fp16 -> fp32 without a compiler half type (the scalar paths) */
static inline float sb_v2_h2f(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = h >> 10 & 0x1f, m = h & 0x3ff, u;
    if (e == 0 && m == 0) {
        u = s;
    } else if (e == 0) { /* subnormal: normalise */
        e = 127 - 15 + 1;
        while (!(m & 0x400)) m <<= 1, e--;
        u = s | e << 23 | (m & 0x3ff) << 13;
    } else if (e == 31) {
        u = s | 0x7f800000 | m << 13;
    } else {
        u = s | (e + 127 - 15) << 23 | m << 13;
    }
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}
/* stored value i of a record's values v, as fp32 (int8: q, before the row scale) */
static inline float sb_v2_value(int dtype, const uint8_t *v, size_t i) {
    if (dtype == SB_V2_F32) {
        float f;
        __builtin_memcpy(&f, v + 4 * i, 4);
        return f;
    }
    if (dtype == SB_V2_F16) return sb_v2_h2f((uint16_t)(v[2 * i] | v[2 * i + 1] << 8));
    return (float)(int8_t)v[i];
}

/* the SIMD families specialise their block loop per (dtype, n): BODY(n, dtype) sees constants */
#define SB_V2_SPECIALISE(c, BODY)                                                                    \
    switch ((c)->dtype * 4 + (c)->n) {                                                               \
    case 0: BODY(0, 0); break; case 1: BODY(1, 0); break; case 2: BODY(2, 0); break;                 \
    case 3: BODY(3, 0); break; case 4: BODY(0, 1); break; case 5: BODY(1, 1); break;                 \
    case 6: BODY(2, 1); break; case 7: BODY(3, 1); break; case 8: BODY(0, 2); break;                 \
    case 9: BODY(1, 2); break; case 10: BODY(2, 2); break; default: BODY(3, 2); break;               \
    }

/* ---- run-time views ---- */

typedef struct {
    int n, dtype, rows, K, panel, nblocks;
    const int32_t *index; /* (nblocks*16,) output row, -1 for padding */
    const float *scale;   /* (nblocks*16,) int8 row scales, else NULL */
    const uint8_t *stream;
} sb_v2_class;

/* One matrix: its classes (n ascending; at most 4) */
typedef struct {
    int out, in, dtype, nclass;
    sb_v2_class cls[4];
} sb_v2_matrix;

/* The activations one call reads, prepared once per x and shared by every class and thread:
 * x zero-padded to whole chunks; for int8 matrices x quantised per chunk to int16, q = round(x / s),
 * s = max|x over the chunk| / 32767, and, for the AVX2 kernels only, per group the dword tables built
 * from q (the kernel family's quantiser says which: sb_kernels.quantise).
 * Memory comes from the caller (sb_v2_act_bytes / sb_v2_act_bind): prefill binds one per token. */
typedef struct {
    int K, nchunk;
    float *x;     /* (nchunk*64,) */
    int16_t *xq;  /* (nchunk*64,) */
    float *xs;    /* (nchunk,) */
    uint32_t *xt; /* (nchunk*16, 2, 4): per group q[4g+i] in the low / the high half of a dword */
    /* Prefill, in act[0] of a gemm only (NULL otherwise, as sb_v2_act_bind leaves it): the T tokens'
     * activations channel-major, cm[j * ldc + t] for j < K, t < T; for an int8 matrix quantised as the
     * per-token fields would be, each value q * s (sb_v2_cm_quantise). When set, the gemm kernels read
     * this alone (tokens in SIMD lanes) and the per-token fields of act[] need not be prepared. */
    const float *cm;
    int ldc;
} sb_v2_act;

size_t sb_v2_act_bytes(int K);              /* a multiple of 64 */
void sb_v2_act_bind(sb_v2_act *a, void *mem, int K); /* mem 64-byte aligned, sb_v2_act_bytes(K) */
/* n activation buffers of width K (one per token of a prefill chunk), their memory owned by the first;
 * NULL when out of memory. sb_v2_acts_free(NULL) is a no-op. */
sb_v2_act *sb_v2_acts_new(int K, int n);
void sb_v2_acts_free(sb_v2_act *a);
/* a->x quantised into xq and xs (and, by the versions that build them, xt): one per kernel family */
typedef void (*sb_v2_quantise_fn)(sb_v2_act *a);
/* x[j * stride] for j < K (stride 1: a vector; ldx: a column of channel-major activations), then
 * quantise(a) where not NULL (int8 matrices: the family's quantiser) */
void sb_v2_act_set(sb_v2_act *a, const float *x, int stride, sb_v2_quantise_fn quantise);
/* Channel-major activations quantised as sb_v2_act_set quantises each token (per chunk of 64 inputs:
 * s = max|x| / 32767, q = round(x / s)) and written back as q * s: Q[j * ldq + t] for the chunks
 * [ch0, ch1) of K inputs and t < T. The same bits on every CPU (an AVX2 version where it has one). */
void sb_v2_cm_quantise(const float *X, int ldx, int K, int T, float *Q, int ldq, int ch0, int ch1);
/* a->x quantised into xq, xs and xt: the scalar definition; the AVX2 version gives the same bits
 * (vcvtps2dq rounds to nearest even, as lrintf does); the AVX-512 one the same xq and xs and no xt,
 * which only the AVX2 kernels read (building it cost a third of a quantisation) */
void sb_v2_quantise_ref(sb_v2_act *a);
#if defined(__x86_64__) || defined(_M_X64)
void sb_v2_quantise_avx2(sb_v2_act *a);
void sb_v2_quantise_avx512(sb_v2_act *a);
void sb_v2_cm_quantise_avx2(const float *X, int ldx, int K, int T, float *Q, int ldq, int ch0, int ch1);
#endif
void sb_v2_cm_quantise_ref(const float *X, int ldx, int K, int T, float *Q, int ldq, int ch0, int ch1);

/* Check a whole blob against the matrix it must be, (out, in) in dtype, before any kernel reads it:
 * header, every class's counts, offsets and sizes, row indices (in range, distinct across classes,
 * -1 exactly on the padding rows), 2-bit codes (n = 2: two distinct ascending positions per group;
 * zero past a chunk's slots and on padding rows), finite scales. 0, or -1 with a message in err. */
int sb_v2_check(const void *blob, size_t size, int out, int in, int dtype, sb_v2_matrix *m, char *err, size_t errlen);

/* gemv: y[index[r]] += W_r . x for the rows of blocks [b0, b1) of class c.
 * gemm: the same for T tokens, act[t] prepared per token or act[0].cm set; Y channel-major, Y[o * ldy + t].
 * On act[0].cm every family computes, per row and chunk, the sum over its kept weights w (int8: q times
 * the row scale) of w * x in fp32, then adds it to Y (sb_v2_gemm_ref is the definition). */
typedef void (*sb_v2_gemv_fn)(const sb_v2_class *c, const sb_v2_act *a, float *y, int b0, int b1);
typedef void (*sb_v2_gemm_fn)(const sb_v2_class *c, const sb_v2_act *act, int T, float *Y, int ldy, int b0, int b1);

void sb_v2_gemv_ref(const sb_v2_class *c, const sb_v2_act *a, float *y, int b0, int b1);
void sb_v2_gemm_ref(const sb_v2_class *c, const sb_v2_act *act, int T, float *Y, int ldy, int b0, int b1);
#if defined(__x86_64__) || defined(_M_X64)
void sb_v2_gemv_avx2(const sb_v2_class *c, const sb_v2_act *a, float *y, int b0, int b1);
void sb_v2_gemm_avx2(const sb_v2_class *c, const sb_v2_act *act, int T, float *Y, int ldy, int b0, int b1);
void sb_v2_gemv_avx512(const sb_v2_class *c, const sb_v2_act *a, float *y, int b0, int b1);
void sb_v2_gemm_avx512(const sb_v2_class *c, const sb_v2_act *act, int T, float *Y, int ldy, int b0, int b1);
/* whether the AVX-512 family uses VNNI (vpdpwssd) for int8: the CPU has it and SPARSAMBA_NO_VNNI
 * is not 1 (so that tests run the vpmaddwd path on a VNNI CPU too); read once */
int sb_v2_avx512_vnni(void);
#endif
#if defined(__aarch64__)
void sb_v2_gemv_neon(const sb_v2_class *c, const sb_v2_act *a, float *y, int b0, int b1);
void sb_v2_gemm_neon(const sb_v2_class *c, const sb_v2_act *act, int T, float *Y, int ldy, int b0, int b1);
#endif

/* How far ahead (bytes of a class's stream) the decode kernels prefetch; 0: no prefetch (they touch the
 * line being read). Read once: SPARSAMBA_PREFETCH=BYTES if set, else 4096 on Intel CPUs, where it
 * took the f16 kernels from ~65% to ~100% of a plain read, and 0 elsewhere (on an AMD Zen 4, 1 KiB
 * ahead was 10-20% slower). A multiple of 64, at most 1 MiB. */
size_t sb_v2_prefetch_bytes(void);

/* start of block b's stream over panel p */
static inline const uint8_t *sb_v2_block_stream(const sb_v2_class *c, int p, int b) {
    size_t off = 0;
    for (int q = 0; q < p; q++) off += sb_v2_block_panel_bytes(c->n, c->dtype, c->K, c->panel, q);
    off *= (size_t)c->nblocks;
    return c->stream + off + (size_t)b * sb_v2_block_panel_bytes(c->n, c->dtype, c->K, c->panel, p);
}

/* row r of a dense (n = 0) class as fp32 (the embedding lookup reads the head's blob) */
void sb_v2_row(const sb_v2_class *c, int r, float *out);

#endif
