/* NEON kernels with fp16 arithmetic (ARMv8.2-A FEAT_FP16, "asimdhp"): only this file is compiled with
 * -march=armv8.2-a+fp16, and cpu/dispatch.c picks it at run time where the CPU reports HWCAP_ASIMDHP.
 *
 * What differs from kernels_neon.c is the decode (gemv) of f16 classes, dense and C_4^n: the input
 * vector is converted to fp16 once per call, scaled by a power of two so that max |x| lies in [1, 2)
 * (exact, and it keeps the products away from fp16's overflow and underflow), and the row is
 * multiplied and accumulated in fp16, 8 lanes per vfmaq_f16, with the fp16 partial sums flushed into
 * fp32 every FLUSH inputs so that fp16 rounding stays bounded (each fp16 lane sums a few products,
 * never a whole row). A C_4^n row places its kept values with the same nibble tables as the fp32
 * kernel, on 2-byte lanes: one code byte (two groups, 8 inputs) is one table lookup and one FMA.
 * A row whose fp16 sums overflow (or an input that is not finite) is redone by the fp32 kernel.
 * Everything else (f32 and int8 classes, prefill's gemm, scan, silu, ...) is sb_kernels_neon's. */
#include <arm_neon.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"

#define SB_INLINE inline __attribute__((always_inline))
#define FLUSH 64 /* inputs summed in fp16 before the partial sums move to fp32 */
#ifndef STACK_X
#define STACK_X 8192 /* inputs converted on the stack; longer vectors use the heap */
#endif

/* g_idx[nibble]: for each of the 4 input lanes of a group (2 bytes each), the bytes of the packed fp16
 * value it takes (lane l: bytes 2l, 2l+1), or 0x80 where the input was removed. The second group of a
 * code byte reads k values further on: the same table plus 2k (0x80 + 2k stays out of the 16-byte
 * table, so removed inputs still read 0). */
static _Alignas(8) uint8_t g_idx[16][8];
static int g_ready;

static void init_tables(void) {
    if (__atomic_load_n(&g_ready, __ATOMIC_ACQUIRE)) return;
    sb_nibble_index(&g_idx[0][0], 2);
    __atomic_store_n(&g_ready, 1, __ATOMIC_RELEASE);
}

/* acc32 += the fp16 partial sums, widened; the partial sums restart at 0 */
static SB_INLINE void flush(float32x4_t *acc32, float16x8_t *a) {
    *acc32 = vaddq_f32(*acc32, vcvt_f32_f16(vget_low_f16(*a)));
    *acc32 = vaddq_f32(*acc32, vcvt_high_f32_f16(*a));
    *a = vdupq_n_f16(0);
}

static float dense_row_h(const sb_class *c, int r, const float16_t *xh) {
    int len = c->len, j = 0;
    const float16_t *v = (const float16_t *)(const void *)c->values + (size_t)r * len;
    float16x8_t a0 = vdupq_n_f16(0), a1 = a0;
    float32x4_t acc = vdupq_n_f32(0.0f);
    while (j + 16 <= len) {
        int stop = j + FLUSH <= len ? j + FLUSH : len - 15;
        for (; j < stop; j += 16) {
            a0 = vfmaq_f16(a0, vld1q_f16(v + j), vld1q_f16(xh + j));
            a1 = vfmaq_f16(a1, vld1q_f16(v + j + 8), vld1q_f16(xh + j + 8));
        }
        flush(&acc, &a0);
        flush(&acc, &a1);
    }
    if (j < len) { /* fewer than 16 left: exactly the values there, zeros after (xh is zero past len) */
        uint16_t tmp[16] = {0};
        memcpy(tmp, v + j, (size_t)(len - j) * 2);
        a0 = vfmaq_f16(a0, vreinterpretq_f16_u16(vld1q_u16(tmp)), vld1q_f16(xh + j));
        a1 = vfmaq_f16(a1, vreinterpretq_f16_u16(vld1q_u16(tmp + 8)), vld1q_f16(xh + j + 8));
        flush(&acc, &a0);
        flush(&acc, &a1);
    }
    return vaddvq_f32(acc);
}

/* one sparse row, k kept per group of 4: a code byte's 2k values (at most 12 bytes) are one load */
static SB_INLINE float sparse_row_h(const sb_class *c, int r, const float16_t *xh, int k) {
    int G = c->G, cb = c->cb;
    const uint8_t *v = c->values + (size_t)r * c->len * 2, *code = c->codes + (size_t)r * cb, *end = c->vend;
    const uint8x8_t off = vdup_n_u8((uint8_t)(2 * k));
    float16x8_t a0 = vdupq_n_f16(0), a1 = a0;
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int g2 = 0; g2 < cb;) {
        int stop = g2 + FLUSH / 8 < cb ? g2 + FLUSH / 8 : cb;
        for (; g2 < stop; g2++) {
            int two = 2 * g2 + 1 < G; /* a lone last group: its byte's high nibble is not a group */
            int cnt = two ? 2 * k : k;
            uint8x16_t t;
            if (__builtin_expect(v + 16 > end, 0)) { /* near the end of the values: only what is there */
                uint8_t tmp[16] = {0};
                memcpy(tmp, v, (size_t)cnt * 2);
                t = vld1q_u8(tmp);
            } else {
                t = vld1q_u8(v);
            }
            uint8x8_t lo = vld1_u8(g_idx[code[g2] & 15]);
            uint8x8_t hi = vadd_u8(vld1_u8(g_idx[two ? code[g2] >> 4 : 0]), off);
            float16x8_t w = vreinterpretq_f16_u8(vqtbl1q_u8(t, vcombine_u8(lo, hi)));
            if (g2 & 1) a1 = vfmaq_f16(a1, w, vld1q_f16(xh + 8 * g2));
            else a0 = vfmaq_f16(a0, w, vld1q_f16(xh + 8 * g2));
            v += (size_t)cnt * 2;
        }
        flush(&acc, &a0);
        flush(&acc, &a1);
    }
    return vaddvq_f32(acc);
}

static void gemv_neon_fp16(const sb_class *c, const float *x, float *y, int r0, int r1) {
    if (c->dtype != GG_F16 || r0 >= r1) {
        sb_kernels_neon.gemv(c, x, y, r0, r1);
        return;
    }
    init_tables();
    int k = c->codes ? 4 - c->n : 0;
    /* inputs read: dense rows up to len rounded to 16, sparse rows 8 per code byte (x is zero there) */
    int nx = k ? 8 * c->cb : (c->len + 15) / 16 * 16;
    float16_t stack[STACK_X], *xh = stack;
    if (nx > STACK_X && !(xh = malloc(sizeof(float16_t) * (size_t)nx))) {
        sb_kernels_neon.gemv(c, x, y, r0, r1);
        return;
    }
    float32x4_t m4 = vdupq_n_f32(0.0f);
    int i = 0;
    for (; i + 4 <= nx; i += 4) m4 = vmaxq_f32(m4, vabsq_f32(vld1q_f32(x + i)));
    float m = vmaxvq_f32(m4);
    for (; i < nx; i++) m = fmaxf(m, fabsf(x[i]));
    if (!isfinite(m)) { /* NaN or inf in x: fp16 adds nothing there, the fp32 kernel defines the result */
        if (xh != stack) free(xh);
        sb_kernels_neon.gemv(c, x, y, r0, r1);
        return;
    }
    int e = 0;
    frexpf(m, &e); /* m = f 2^e, f in [0.5, 1): x 2^(1-e) has max |x| in [1, 2) */
    e = e < -100 ? -100 : e;
    float s = ldexpf(1.0f, 1 - e), inv = ldexpf(1.0f, e - 1);
    for (i = 0; i < nx; i += 8) {
        float32x4_t lo = vmulq_n_f32(vld1q_f32(x + i), s), hi = vmulq_n_f32(vld1q_f32(x + i + 4), s);
        vst1q_f16(xh + i, vcombine_f16(vcvt_f16_f32(lo), vcvt_f16_f32(hi)));
    }
    for (int r = r0; r < r1; r++) {
        float acc;
        switch (k) {
        case 1: acc = sparse_row_h(c, r, xh, 1); break;
        case 2: acc = sparse_row_h(c, r, xh, 2); break;
        case 3: acc = sparse_row_h(c, r, xh, 3); break;
        default: acc = dense_row_h(c, r, xh); break;
        }
        if (__builtin_expect(!isfinite(acc), 0)) { /* an fp16 sum overflowed: this row in fp32 */
            sb_kernels_neon.gemv(c, x, y, r, r + 1);
            continue;
        }
        y[c->idx ? c->idx[r] : r] += (c->scale ? acc * c->scale[r] : acc) * inv;
    }
    if (xh != stack) free(xh);
}

/* the rest is the fp32 NEON family's (a table of constants cannot name its entries, hence the calls) */
static void gemm_fp16(const sb_class *c, const float *X, int ldx, int T, float *Y, int ldy, int r0, int r1,
                      void *scratch) {
    sb_kernels_neon.gemm(c, X, ldx, T, Y, ldy, r0, r1, scratch);
}
static void scan_step_fp16(int N, const float *A, float dt, float dtx, const float *B, const float *C, float *s,
                           float *yc) {
    sb_kernels_neon.scan_step(N, A, dt, dtx, B, C, s, yc);
}
static void silu_fp16(float *x, int n) { sb_kernels_neon.silu(x, n); }
static void softplus_fp16(float *x, int n) { sb_kernels_neon.softplus(x, n); }
static void mul_silu_fp16(float *y, const float *z, int n) { sb_kernels_neon.mul_silu(y, z, n); }
static float read_sum_fp16(const float *x, size_t n) { return sb_kernels_neon.read_sum(x, n); }

const sb_kernels sb_kernels_neon_fp16 = {"neon-fp16", gemv_neon_fp16, gemm_fp16,     scan_step_fp16,
                                         silu_fp16,   softplus_fp16,  mul_silu_fp16, read_sum_fp16};
