/* NEON (ARMv8-A baseline) kernels of packed format v2: a 16-row block is four 4-lane
 * quarters. Per slot each lane picks its own input with one byte table lookup (tbl) on the group's
 * 4 inputs, the byte indices built from the lane's 2-bit code field; one multiply-accumulate.
 * f16 values widen with the baseline fcvtl. int8: the same integer numerics as every family (int16
 * activations per chunk, exact int32 sums, one fp32 scale per chunk): the lane's int16 input is
 * looked up into the high half of an int32 and shifted down, weights widen to int32.
 * (sdot / ARMv8.2 fp16 variants are left for later: they cannot be timed under qemu here.) */
#include <arm_neon.h>
#include <string.h>

#include "linear_v2.h"

#define INLINE static inline __attribute__((always_inline))

/* the 2-bit field at bit 0 of each lane (plus `add`, mod 4) -> tbl indices of that lane's 4-byte input */
INLINE uint8x16_t idx_f32(uint32x4_t c, int add) {
    uint32x4_t i = vandq_u32(vaddq_u32(c, vdupq_n_u32((uint32_t)add)), vdupq_n_u32(3));
    return vreinterpretq_u8_u32(vmlaq_n_u32(vdupq_n_u32(0x03020100u), i, 0x04040404u));
}
/* ... of the lane's int16 input, landing in the lane's high half (0xff bytes read as 0) */
INLINE uint8x16_t idx_i16(uint32x4_t c, int add) {
    uint32x4_t i = vandq_u32(vaddq_u32(c, vdupq_n_u32((uint32_t)add)), vdupq_n_u32(3));
    return vreinterpretq_u8_u32(vmlaq_n_u32(vdupq_n_u32(0x0100ffffu), i, 0x02020000u));
}

INLINE float32x4_t load_w(int dt, const uint8_t *v, int t, int q) {
    if (dt == SB_V2_F32) return vld1q_f32((const float *)(v + 64 * (size_t)t + 16 * q));
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)(v + 32 * (size_t)t + 8 * q))));
}

/* slot t of a chunk: its group, the code field it reads and the n = 1 rotation */
INLINE void slot_field(int n, int t, int *f, int *g, int *add) {
    if (n == 0) *f = 0, *g = t / 4, *add = t % 4; /* no code: the position is t mod 4 itself */
    else if (n == 1) *f = *g = t / 3, *add = t % 3 + 1;
    else *f = t, *g = n == 2 ? t / 2 : t, *add = 0;
}

INLINE void load_codes(int n, const uint8_t *rec, uint32x4_t c[2][4]) {
    for (int w = 0; w < 2; w++)
        for (int q = 0; q < 4; q++)
            c[w][q] = n && (n == 2 || w == 0) ? vld1q_u32((const uint32_t *)(rec + 64 * w + 16 * q)) : vdupq_n_u32(0);
}

INLINE uint32x4_t field(uint32x4_t c[2][4], int f, int q) {
    /* shift counts must be constants: the loops below unroll, and this switch folds */
    uint32x4_t w = c[f / 16][q];
    switch (f % 16) {
#define S(k) case k: return vshrq_n_u32(w, 2 * k);
    case 0: return w;
    S(1) S(2) S(3) S(4) S(5) S(6) S(7) S(8) S(9) S(10) S(11) S(12) S(13) S(14) S(15)
#undef S
    }
    return w;
}

INLINE void chunk_fp(int n, int dt, const uint8_t *rec, const float *x, int G, float32x4_t acc[4]) {
    const uint8_t *v = rec + sb_v2_code_bytes(n);
    uint32x4_t c[2][4];
    load_codes(n, rec, c);
#pragma GCC unroll 16
    for (int t = 0; t < G * (4 - n); t++) {
        int f, g, add;
        slot_field(n, t, &f, &g, &add);
        uint8x16_t xg = vreinterpretq_u8_f32(vld1q_f32(x + 4 * g));
        for (int q = 0; q < 4; q++) {
            float32x4_t xs = vreinterpretq_f32_u8(vqtbl1q_u8(xg, idx_f32(n ? field(c, f, q) : vdupq_n_u32(0), add)));
            acc[q] = vfmaq_f32(acc[q], load_w(dt, v, t, q), xs);
        }
    }
}

INLINE void chunk_i8(int n, const uint8_t *rec, const int16_t *xq, int G, int32x4_t s[4]) {
    const uint8_t *v = rec + sb_v2_code_bytes(n);
    uint32x4_t c[2][4];
    load_codes(n, rec, c);
#pragma GCC unroll 16
    for (int t = 0; t < G * (4 - n); t++) {
        int f, g, add;
        slot_field(n, t, &f, &g, &add);
        uint8x16_t xg = vreinterpretq_u8_s16(vcombine_s16(vld1_s16(xq + 4 * g), vdup_n_s16(0)));
        for (int q = 0; q < 4; q++) {
            int32x4_t xs = vshrq_n_s32(vreinterpretq_s32_u8(vqtbl1q_u8(xg, idx_i16(n ? field(c, f, q) : vdupq_n_u32(0), add))), 16);
            /* the pair (t & ~1, t | 1) of rows 4q..4q+3 is 8 bytes a0 b0 a1 b1 ...: widen, then split */
            int32x4_t ab = vreinterpretq_s32_s16(vmovl_s8(vld1_s8((const int8_t *)(v + 32 * (t / 2) + 8 * q))));
            int32x4_t w = t & 1 ? vshrq_n_s32(ab, 16) : vshrq_n_s32(vshlq_n_s32(ab, 16), 16);
            s[q] = vmlaq_s32(s[q], w, xs);
        }
    }
}

/* out[16] = the 16 rows of one block over one panel (rec: the block's stream there) */
INLINE void block_panel(const sb_v2_class *c, const sb_v2_act *a, const uint8_t *rec, int b, int j0, int len, int n,
                        int dt, float *out) {
    int full = len / SB_V2_CHUNK, rest = len % SB_V2_CHUNK, Gt = (rest + 3) / 4;
    size_t rb = sb_v2_record_bytes(n, dt, 16);
    float32x4_t acc[4];
    for (int q = 0; q < 4; q++) acc[q] = vdupq_n_f32(0);
    for (int ch = 0; ch < full + (rest > 0); ch++, rec += rb) {
        int G = ch < full ? 16 : Gt, j = j0 + SB_V2_CHUNK * ch;
        if (dt == SB_V2_I8) {
            int32x4_t s[4];
            for (int q = 0; q < 4; q++) s[q] = vdupq_n_s32(0);
            if (G == 16) chunk_i8(n, rec, a->xq + j, 16, s);
            else chunk_i8(n, rec, a->xq + j, G, s);
            for (int q = 0; q < 4; q++) acc[q] = vfmaq_n_f32(acc[q], vcvtq_f32_s32(s[q]), a->xs[j / SB_V2_CHUNK]);
        } else if (G == 16) {
            chunk_fp(n, dt, rec, a->x + j, 16, acc);
        } else {
            chunk_fp(n, dt, rec, a->x + j, G, acc);
        }
    }
    for (int q = 0; q < 4; q++) {
        if (c->scale) acc[q] = vmulq_f32(acc[q], vld1q_f32(c->scale + SB_V2_B * b + 4 * q));
        vst1q_f32(out + 4 * q, acc[q]);
    }
}

INLINE void run(const sb_v2_class *c, const sb_v2_act *act, int T, float *Y, int ldy, int b0, int b1, int n, int dt) {
    const uint8_t *panel = c->stream;
    for (int p = 0; p < sb_v2_npanels(c->K, c->panel); p++) {
        int len = sb_v2_panel_len(c->K, c->panel, p), j0 = p * c->panel;
        size_t bpb = sb_v2_block_panel_bytes(n, dt, c->K, c->panel, p);
        for (int b = b0; b < b1; b++)
            for (int t = 0; t < T; t++) {
                float out[SB_V2_B];
                block_panel(c, &act[t], panel + (size_t)b * bpb, b, j0, len, n, dt, out);
                for (int r = 0; r < SB_V2_B; r++)
                    if (c->index[SB_V2_B * b + r] >= 0) Y[(size_t)c->index[SB_V2_B * b + r] * ldy + t] += out[r];
            }
        panel += bpb * (size_t)c->nblocks;
    }
}

#define BODY(N, DT) run(c, act, T, Y, ldy, b0, b1, N, DT)
void sb_v2_gemm_neon(const sb_v2_class *c, const sb_v2_act *act, int T, float *Y, int ldy, int b0, int b1) {
    if (act[0].cm) { /* prefill on channel-major activations: the reference's token loops, vectorised by the compiler */
        sb_v2_gemm_ref(c, act, T, Y, ldy, b0, b1);
        return;
    }
    SB_V2_SPECIALISE(c, BODY)
}

void sb_v2_gemv_neon(const sb_v2_class *c, const sb_v2_act *a, float *y, int b0, int b1) {
    sb_v2_gemm_neon(c, a, 1, y, 1, b0, b1);
}
