/* AVX-512 (F/BW/VL, + FMA/F16C; VNNI when present) kernels of packed format v2 (flags on this file only).
 *
 * One zmm lane per row of a 16-row block; the block's stream is read front to back.
 * fp32 / f16: per group of 4 inputs x[4g..4g+3] is broadcast into the four 128-bit lanes once; per
 *   kept slot each lane picks its own input with one in-lane permute (vpermilps reads only the low
 *   2 bits of each dword, so the lane's code word is just shifted right by 2 per slot), the 16 rows'
 *   values of the slot are one load (f16: 32 bytes, widened), and one FMA accumulates.
 * int8: integer dot products on int16 activations (see sb_v2_act_set). A pair of slots is one
 *   vpdpwssd (vpmaddwd + vpaddd without VNNI): the 16 rows' (w_a, w_b) int8 pairs, widened to int16,
 *   times each lane's (x[pos_a], x[pos_b]), picked from the chunk's 64 int16 inputs by one
 *   two-register word permute (vpermt2w, 6-bit index per word). The per-word index is built from
 *   the code word with one variable word shift and one ternary-logic (mask | group offset).
 *   The int32 sums of a chunk (|sum| < 64 * 127 * 32767 < 2^31) are flushed to fp32 with the
 *   chunk's activation scale. */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "linear_v2.h"

#define INLINE static inline __attribute__((always_inline))

/* Decode prefetches every line of the stream pf bytes ahead (sb_v2_prefetch_bytes; pf = 0 touches the
 * line being read, which costs one load-port slot and nothing else): one prefetch per 64 bytes,
 * issued where the kernel reaches that line's values, so they spread over the loop. Into L2 (T1), not
 * L1: on Intel the same kernels stream 5-15% faster so (bench/README.md, "Kernels"), likely because an
 * L1 prefetch holds one of the few L1 fill buffers that the demand loads of x and the codes need. */
INLINE void pf_line(const uint8_t *p, size_t pf) { _mm_prefetch((const char *)p + pf, _MM_HINT_T1); }

/* ---- fp32 / f16 ---- */

INLINE __m512 load_w(int dt, const uint8_t *v, int t) {
    if (dt == SB_V2_F32) return _mm512_loadu_ps(v + 64 * (size_t)t);
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + 32 * (size_t)t)));
}

/* one chunk record of G groups: G = 16 (a full chunk, `full` set: the loops unroll completely) or a
 * tail's run-time G, where the accumulator of a slot is its place k in the group, so that acc[]
 * stays in registers with the group loop not unrolled */
INLINE void chunk_fp(int n, int dt, const uint8_t *rec, const float *x, int G, int full, __m512 acc[4], size_t pf) {
    const uint8_t *v = rec + sb_v2_code_bytes(n);
    const int sb = dt == SB_V2_F32 ? 64 : 32; /* bytes of one slot's 16 values */
    if (n == 0) {
#pragma GCC unroll 16
        for (int g = 0; g < G; g++)
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                int t = 4 * g + k;
                if (sb * t % 64 == 0) pf_line(v + sb * t, pf);
                acc[k] = _mm512_fmadd_ps(load_w(dt, v, t), _mm512_set1_ps(x[t]), acc[k]);
            }
        return;
    }
    pf_line(rec, pf);
    if (n == 2) pf_line(rec + 64, pf);
    __m512i c = _mm512_load_si512(rec);
#pragma GCC unroll 16
    for (int g = 0; g < G; g++) {
        __m512 xb = _mm512_broadcast_f32x4(_mm_loadu_ps(x + 4 * g));
        if (n == 2 && g == 8) c = _mm512_load_si512(rec + 64); /* slots 16..31 are in the second word */
#pragma GCC unroll 4
        for (int k = 0; k < 4 - n; k++) {
            int t = (4 - n) * g + k, ai = full ? t & 3 : k;
            /* n = 1 stores the removed position p: kept ones are p+1, p+2, p+3 (mod 4, which the
             * permute's 2-bit read does for free) */
            __m512i idx = n == 1 ? _mm512_add_epi32(c, _mm512_set1_epi32(k + 1)) : c;
            __m512 xs = _mm512_permutevar_ps(xb, idx);
            if (sb * t % 64 == 0) pf_line(v + sb * t, pf);
            acc[ai] = _mm512_fmadd_ps(load_w(dt, v, t), xs, acc[ai]);
            if (n != 1) c = _mm512_srli_epi32(c, 2);
        }
        if (n == 1) c = _mm512_srli_epi32(c, 2);
    }
}

/* ---- int8 ---- */

/* per pair u of slots (2u, 2u+1) of a chunk: which half-word of codes holds its two fields (sel:
 * word * 2 + half), the word shifts bringing them to bit 0 of the low / high int16 of each lane, the
 * rotation for n = 1, and the group offsets 4g (bits 2..5 of the 6-bit vpermt2w index). A pure
 * function of (n, u): inside the unrolled pair loop every field is a constant. */
typedef struct {
    int32_t sel, shift, add, group;
} pair_op;

INLINE pair_op pair_of(int n, int u) {
    int sh[2], ad[2], gr[2], sel = 0;
    for (int h = 0; h < 2; h++) {
        int t = 2 * u + h, f, g, k = 0;
        if (n == 1) f = g = t / 3, k = t % 3;
        else f = t, g = n == 2 ? t / 2 : t;
        sel = (f / 16) * 2 + (f % 16) / 8; /* both fields of a pair lie in the same half-word */
        sh[h] = 2 * (f % 8), ad[h] = n == 1 ? k + 1 : 0, gr[h] = 4 * (g % 16);
    }
    return (pair_op){sel, sh[0] | sh[1] << 16, ad[0] | ad[1] << 16, gr[0] | gr[1] << 16};
}

/* acc += w.lo * x.lo + w.hi * x.hi per int32 lane. The VNNI instruction is written as inline asm so
 * that this file needs no -mavx512vnni (the compiler could then emit VNNI anywhere); it runs only
 * where the CPU reports VNNI. */
INLINE __m512i dot_pairs(__m512i acc, __m512i w, __m512i x, int vnni) {
    if (!vnni) return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
    return acc;
}

/* int32 sums of one chunk record (npairs pairs) against the chunk's int16 inputs xq[0..63] */
INLINE __m512i chunk_i8(int n, const uint8_t *rec, const int16_t *xq, int npairs, int vnni, size_t pf) {
    const uint8_t *v = rec + sb_v2_code_bytes(n);
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    if (n == 0) { /* fixed positions: the pair's inputs are one dword of xq */
        const int32_t *x32 = (const int32_t *)xq;
#pragma GCC unroll 8
        for (int u = 0; u + 4 <= npairs; u += 4) {
            pf_line(v + 32 * u, pf), pf_line(v + 32 * u + 64, pf);
            s0 = dot_pairs(s0, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(v + 32 * u))), _mm512_set1_epi32(x32[u]), vnni);
            s1 = dot_pairs(s1, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(v + 32 * u + 32))), _mm512_set1_epi32(x32[u + 1]), vnni);
            s2 = dot_pairs(s2, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(v + 32 * u + 64))), _mm512_set1_epi32(x32[u + 2]), vnni);
            s3 = dot_pairs(s3, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(v + 32 * u + 96))), _mm512_set1_epi32(x32[u + 3]), vnni);
        }
        for (int u = npairs & ~3; u < npairs; u++) {
            if (u % 2 == 0) pf_line(v + 32 * u, pf);
            s0 = dot_pairs(s0, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(v + 32 * u))), _mm512_set1_epi32(x32[u]), vnni);
        }
        return _mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_add_epi32(s2, s3));
    }
    pf_line(rec, pf);
    if (n == 2) pf_line(rec + 64, pf);
    __m512i xlo = _mm512_loadu_si512(xq), xhi = _mm512_loadu_si512(xq + 32);
    /* each code word's low and high 16 bits copied into both int16 halves of its lane, so that one
     * vpsrlvw brings a different field to bit 0 of each half */
    __m512i H[4], lo16 = _mm512_set1_epi32(0xffff), mask = _mm512_set1_epi32(0x00030003);
    for (int w = 0; w < (n == 2 ? 2 : 1); w++) {
        __m512i c = _mm512_load_si512(rec + 64 * w);
        H[2 * w] = _mm512_or_si512(_mm512_and_si512(c, lo16), _mm512_slli_epi32(c, 16));
        H[2 * w + 1] = _mm512_or_si512(_mm512_srli_epi32(c, 16), _mm512_andnot_si512(lo16, c));
    }
#pragma GCC unroll 24
    for (int u = 0; u < npairs; u++) {
        pair_op op = pair_of(n, u);
        __m512i s = _mm512_srlv_epi16(H[op.sel], _mm512_set1_epi32(op.shift));
        if (n == 1) s = _mm512_add_epi16(s, _mm512_set1_epi32(op.add));
        __m512i idx = _mm512_ternarylogic_epi32(s, mask, _mm512_set1_epi32(op.group), 0xea); /* (s & mask) | group */
        __m512i xp = _mm512_permutex2var_epi16(xlo, idx, xhi);
        if (u % 2 == 0) pf_line(v + 32 * u, pf);
        __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(v + 32 * u)));
        switch (u & 3) { /* four independent sums: vpdpwssd's latency is not the limit */
        case 0: s0 = dot_pairs(s0, w, xp, vnni); break;
        case 1: s1 = dot_pairs(s1, w, xp, vnni); break;
        case 2: s2 = dot_pairs(s2, w, xp, vnni); break;
        default: s3 = dot_pairs(s3, w, xp, vnni); break;
        }
    }
    return _mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_add_epi32(s2, s3));
}

/* ---- one class ---- */

INLINE __m512 block_panel(const sb_v2_act *a, const uint8_t *rec, int j0, int len, int n, int dt, int vnni, size_t pf) {
    int full = len / SB_V2_CHUNK, rest = len % SB_V2_CHUNK, Gt = (rest + 3) / 4, ch0 = j0 / SB_V2_CHUNK;
    size_t rb = sb_v2_record_bytes(n, dt, 16);
    if (dt == SB_V2_I8) {
        __m512 acc = _mm512_setzero_ps();
        for (int ch = 0; ch < full; ch++, rec += rb) {
            __m512i s = chunk_i8(n, rec, a->xq + SB_V2_CHUNK * (ch0 + ch), 8 * (4 - n), vnni, pf);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(a->xs[ch0 + ch]), acc);
        }
        if (rest) {
            __m512i s = chunk_i8(n, rec, a->xq + SB_V2_CHUNK * (ch0 + full), (Gt * (4 - n) + 1) / 2, vnni, pf);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(a->xs[ch0 + full]), acc);
        }
        return acc;
    }
    __m512 ac[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const float *x = a->x + j0;
    for (int ch = 0; ch < full; ch++, rec += rb, x += SB_V2_CHUNK) chunk_fp(n, dt, rec, x, 16, 1, ac, pf);
    if (rest) chunk_fp(n, dt, rec, x, Gt, 0, ac, pf);
    return _mm512_add_ps(_mm512_add_ps(ac[0], ac[1]), _mm512_add_ps(ac[2], ac[3]));
}

/* Prefill, fp32 / f16: the block's 16 rows against TB = 4 tokens at once. Each slot's values are
 * loaded and widened once and its code shifted once for the 4 tokens; only the broadcast, the
 * permute and the FMA are per token (the per-token GEMV pass did everything 4 times). */
#define TB 4
INLINE void chunk_fp_tok(int n, int dt, const uint8_t *rec, const float *const x[TB], int G, __m512 acc[TB]) {
    const uint8_t *v = rec + sb_v2_code_bytes(n);
    if (n == 0) {
#pragma GCC unroll 16
        for (int t = 0; t < 4 * G; t++) {
            __m512 w = load_w(dt, v, t);
            for (int i = 0; i < TB; i++) acc[i] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[i][t]), acc[i]);
        }
        return;
    }
    __m512i c = _mm512_load_si512(rec);
#pragma GCC unroll 16
    for (int g = 0; g < G; g++) {
        __m512 xb[TB];
        for (int i = 0; i < TB; i++) xb[i] = _mm512_broadcast_f32x4(_mm_loadu_ps(x[i] + 4 * g));
        if (n == 2 && g == 8) c = _mm512_load_si512(rec + 64);
#pragma GCC unroll 4
        for (int k = 0; k < 4 - n; k++) {
            int t = (4 - n) * g + k;
            __m512i idx = n == 1 ? _mm512_add_epi32(c, _mm512_set1_epi32(k + 1)) : c;
            __m512 w = load_w(dt, v, t);
            for (int i = 0; i < TB; i++) acc[i] = _mm512_fmadd_ps(w, _mm512_permutevar_ps(xb[i], idx), acc[i]);
            if (n != 1) c = _mm512_srli_epi32(c, 2);
        }
        if (n == 1) c = _mm512_srli_epi32(c, 2);
    }
}

INLINE void block_panel_tok(const sb_v2_act *a, const uint8_t *rec, int j0, int len, int n, int dt, __m512 out[TB]) {
    int full = len / SB_V2_CHUNK, rest = len % SB_V2_CHUNK;
    size_t rb = sb_v2_record_bytes(n, dt, 16);
    const float *x[TB];
    for (int i = 0; i < TB; i++) x[i] = a[i].x + j0, out[i] = _mm512_setzero_ps();
    for (int ch = 0; ch < full; ch++, rec += rb) {
        chunk_fp_tok(n, dt, rec, x, 16, out);
        for (int i = 0; i < TB; i++) x[i] += SB_V2_CHUNK;
    }
    if (rest) chunk_fp_tok(n, dt, rec, x, (rest + 3) / 4, out);
}

/* Prefill, int8: the same for 4 tokens; the word indices and the widened weights of a pair are made
 * once, the permute of each token's inputs and the dot product are per token. Int32 sums per token
 * and chunk, flushed with that token's chunk scale. */
INLINE void chunk_i8_tok(int n, const uint8_t *rec, const sb_v2_act *a, int ch, int npairs, int vnni, __m512 out[TB]) {
    const uint8_t *v = rec + sb_v2_code_bytes(n);
    __m512i s[TB];
    for (int i = 0; i < TB; i++) s[i] = _mm512_setzero_si512();
    if (n == 0) {
        const int32_t *x32[TB];
        for (int i = 0; i < TB; i++) x32[i] = (const int32_t *)(a[i].xq + SB_V2_CHUNK * ch);
#pragma GCC unroll 8
        for (int u = 0; u < npairs; u++) {
            __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(v + 32 * u)));
            for (int i = 0; i < TB; i++) s[i] = dot_pairs(s[i], w, _mm512_set1_epi32(x32[i][u]), vnni);
        }
    } else {
        __m512i xlo[TB], xhi[TB];
        for (int i = 0; i < TB; i++) {
            xlo[i] = _mm512_loadu_si512(a[i].xq + SB_V2_CHUNK * ch);
            xhi[i] = _mm512_loadu_si512(a[i].xq + SB_V2_CHUNK * ch + 32);
        }
        __m512i H[4], lo16 = _mm512_set1_epi32(0xffff), mask = _mm512_set1_epi32(0x00030003);
        for (int w = 0; w < (n == 2 ? 2 : 1); w++) {
            __m512i c = _mm512_load_si512(rec + 64 * w);
            H[2 * w] = _mm512_or_si512(_mm512_and_si512(c, lo16), _mm512_slli_epi32(c, 16));
            H[2 * w + 1] = _mm512_or_si512(_mm512_srli_epi32(c, 16), _mm512_andnot_si512(lo16, c));
        }
#pragma GCC unroll 24
        for (int u = 0; u < npairs; u++) {
            pair_op op = pair_of(n, u);
            __m512i sh = _mm512_srlv_epi16(H[op.sel], _mm512_set1_epi32(op.shift));
            if (n == 1) sh = _mm512_add_epi16(sh, _mm512_set1_epi32(op.add));
            __m512i idx = _mm512_ternarylogic_epi32(sh, mask, _mm512_set1_epi32(op.group), 0xea);
            __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(v + 32 * u)));
            for (int i = 0; i < TB; i++) s[i] = dot_pairs(s[i], w, _mm512_permutex2var_epi16(xlo[i], idx, xhi[i]), vnni);
        }
    }
    for (int i = 0; i < TB; i++) out[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i]), _mm512_set1_ps(a[i].xs[ch]), out[i]);
}

INLINE void block_panel_i8_tok(const sb_v2_act *a, const uint8_t *rec, int j0, int len, int n, int vnni, __m512 out[TB]) {
    int full = len / SB_V2_CHUNK, rest = len % SB_V2_CHUNK, ch0 = j0 / SB_V2_CHUNK;
    size_t rb = sb_v2_record_bytes(n, SB_V2_I8, 16);
    for (int i = 0; i < TB; i++) out[i] = _mm512_setzero_ps();
    for (int ch = 0; ch < full; ch++, rec += rb) chunk_i8_tok(n, rec, a, ch0 + ch, 8 * (4 - n), vnni, out);
    if (rest) chunk_i8_tok(n, rec, a, ch0 + full, (((rest + 3) / 4) * (4 - n) + 1) / 2, vnni, out);
}

INLINE void scatter(const sb_v2_class *c, int b, __m512 acc, float *y, size_t ldy) {
    float out[SB_V2_B];
    if (c->scale) acc = _mm512_mul_ps(acc, _mm512_loadu_ps(c->scale + SB_V2_B * b));
    _mm512_storeu_ps(out, acc);
    const int32_t *idx = c->index + SB_V2_B * b;
    for (int r = 0; r < SB_V2_B; r++)
        if (idx[r] >= 0) y[(size_t)idx[r] * ldy] += out[r];
}

/* panels outer (x of a panel stays in L1), blocks inner; prefill runs every token over a block's
 * panel stream while it is in cache (its weights come from memory once per T tokens: no prefetch) */
INLINE void run(const sb_v2_class *c, const sb_v2_act *act, int T, float *Y, int ldy, int b0, int b1, int n, int dt,
                int vnni) {
    const uint8_t *panel = c->stream;
    size_t pf = T == 1 ? sb_v2_prefetch_bytes() : 0;
    for (int p = 0; p < sb_v2_npanels(c->K, c->panel); p++) {
        int len = sb_v2_panel_len(c->K, c->panel, p), j0 = p * c->panel;
        size_t bpb = sb_v2_block_panel_bytes(n, dt, c->K, c->panel, p);
        for (int b = b0; b < b1; b++) {
            int t = 0;
            for (; t + TB <= T; t += TB) {
                __m512 r[TB];
                if (dt == SB_V2_I8) block_panel_i8_tok(&act[t], panel + (size_t)b * bpb, j0, len, n, vnni, r);
                else block_panel_tok(&act[t], panel + (size_t)b * bpb, j0, len, n, dt, r);
                for (int i = 0; i < TB; i++) scatter(c, b, r[i], Y + t + i, (size_t)ldy);
            }
            for (; t < T; t++) scatter(c, b, block_panel(&act[t], panel + (size_t)b * bpb, j0, len, n, dt, vnni, pf), Y + t, (size_t)ldy);
        }
        panel += bpb * (size_t)c->nblocks;
    }
}

/* one specialised body per (n, dtype): the inner loops see constants */
#define BODY(N, DT, V) run(c, act, T, Y, ldy, b0, b1, N, DT, V)

#define BODY1(N, DT) BODY(N, DT, 1)
#define BODY0(N, DT) BODY(N, DT, 0)
static void gemm_vnni(const sb_v2_class *c, const sb_v2_act *act, int T, float *Y, int ldy, int b0, int b1) {
    SB_V2_SPECIALISE(c, BODY1)
}
static void gemm_plain(const sb_v2_class *c, const sb_v2_act *act, int T, float *Y, int ldy, int b0, int b1) {
    SB_V2_SPECIALISE(c, BODY0)
}

static int g_ready, g_vnni;

static void init(void) {
    if (__atomic_load_n(&g_ready, __ATOMIC_ACQUIRE)) return; /* idempotent: racing threads write the same */
    const char *off = getenv("SPARSAMBA_NO_VNNI");
    g_vnni = __builtin_cpu_supports("avx512vnni") && !(off && *off == '1');
    __atomic_store_n(&g_ready, 1, __ATOMIC_RELEASE);
}

int sb_v2_avx512_vnni(void) {
    init();
    return g_vnni;
}

void sb_v2_gemm_avx512(const sb_v2_class *c, const sb_v2_act *act, int T, float *Y, int ldy, int b0, int b1) {
    init();
    if (c->dtype == SB_V2_I8 && g_vnni) gemm_vnni(c, act, T, Y, ldy, b0, b1);
    else gemm_plain(c, act, T, Y, ldy, b0, b1);
}

void sb_v2_gemv_avx512(const sb_v2_class *c, const sb_v2_act *a, float *y, int b0, int b1) {
    sb_v2_gemm_avx512(c, a, 1, y, 1, b0, b1);
}
