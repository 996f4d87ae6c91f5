/* AVX-512 (F/BW/VL, + FMA/F16C; VNNI when present) kernels of packed format v2 (flags on this file only).
 *
 * One zmm lane per row of a 16-row block; the block's stream is read front to back.
 * fp32 / f16: per group of 4 inputs x[4g..4g+3] is broadcast into the four 128-bit lanes once; per
 *   kept slot each lane picks its own input with one in-lane permute (vpermilps reads only the low
 *   2 bits of each dword, so the lane's code word is just shifted right by 2 per slot), the 16 rows'
 *   values of the slot are one load (f16: 32 bytes, widened), and one FMA accumulates.
 * int8: integer dot products on int16 activations (see sb_v2_act_set). A pair of slots is one
 *   vpdpwssd (vpmaddwd + vpaddd without VNNI): the 16 rows' (w_a, w_b) int8 pairs, widened to int16,
 *   times each lane's (x[pos_a], x[pos_b]) as one dword, picked by one vpermd from a 16-dword table
 *   of the chunk's inputs: the pair's two 2-bit position fields (n = 1: the two removed positions of
 *   a group pair, which fix its three pairs) sit side by side in the code word, so the lane's code
 *   shifted by 4 j is the index as it is (vpermd reads bits [3:0]). The tables, 8 / 16 / 24 zmm for
 *   n = 3 / 2 / 1, are vpermw's of the chunk's inputs by constant indices, built once per chunk for
 *   the blocks read side by side (once per panel where the panel is one chunk). Per pair: shift,
 *   vpermd, vpmovsxbw, vpdpwssd, half the uops of the index built per word for a vpermt2w that this
 *   replaced; on both models' in_proj / out_proj the sparse classes ran 1.08-1.28x as fast, most at
 *   93-98% of the read probe (was 62-89%; 1 thread, cold weights, AVX-512 VNNI Xeon at 2.1 GHz). The
 *   int32 sums of a chunk (|sum| < 64 * 127 * 32767 < 2^31) are flushed to fp32 with the chunk's
 *   activation scale. */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "linear_v2.h"

#define INLINE static inline __attribute__((always_inline))

/* Decode prefetches every line of the stream pf bytes ahead (sb_v2_prefetch_bytes; pf = 0 touches the
 * line being read, which costs one load-port slot and nothing else): one prefetch per 64 bytes,
 * issued where the kernel reaches that line's values, so they spread over the loop. Into L1 (T0): with
 * one block stream at a time, T1 (L2) was 5-15% faster; with 4 block streams side by side (run()) T0 is
 * 6-26% faster on the Intel Xeon here, f16 and int8 (bench/README.md, "Kernels"). */
INLINE void pf_line(const uint8_t *p, size_t pf) { _mm_prefetch((const char *)p + pf, _MM_HINT_T0); }

/* ---- fp32 / f16 ---- */

INLINE __m512 load_w(int dt, const uint8_t *v, int t) {
    if (dt == SB_V2_F32) return _mm512_loadu_ps(v + 64 * (size_t)t);
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + 32 * (size_t)t)));
}

/* one chunk record of G groups of each of S blocks (S a constant: 1, or the blocks read side by side,
 * see run()): G = 16 (a full chunk, `full` set: the loops unroll completely) or a tail's run-time G,
 * where the accumulator of a slot is its place k in the group, so that acc[] stays in registers with
 * the group loop not unrolled. The S blocks share x's broadcasts. */
INLINE void chunk_fp(int n, int dt, const uint8_t *const *rec, int S, const float *x, int G, int full, __m512 acc[][4],
                     size_t pf) {
    const int sb = dt == SB_V2_F32 ? 64 : 32; /* bytes of one slot's 16 values */
    const uint8_t *v[4];
    for (int s = 0; s < S; s++) v[s] = rec[s] + sb_v2_code_bytes(n);
    if (n == 0) {
#pragma GCC unroll 16
        for (int g = 0; g < G; g++)
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                int t = 4 * g + k;
                __m512 xt = _mm512_set1_ps(x[t]);
#pragma GCC unroll 4
                for (int s = 0; s < S; s++) {
                    if (sb * t % 64 == 0) pf_line(v[s] + sb * t, pf);
                    acc[s][k] = _mm512_fmadd_ps(load_w(dt, v[s], t), xt, acc[s][k]);
                }
            }
        return;
    }
    __m512i c[4];
#pragma GCC unroll 4
    for (int s = 0; s < S; s++) {
        pf_line(rec[s], pf);
        if (n == 2) pf_line(rec[s] + 64, pf);
        c[s] = _mm512_load_si512(rec[s]);
    }
#pragma GCC unroll 16
    for (int g = 0; g < G; g++) {
        __m512 xb = _mm512_broadcast_f32x4(_mm_loadu_ps(x + 4 * g)), xr[3];
        if (n == 1) { /* n = 1 stores the removed position p, and kept slot k reads x[p + k + 1] (mod 4, as
                       * the permute's 2-bit read does): xr[k] is x's group rotated by k + 1, so that the
                       * code word picks from it as it is. Three rotations a group for the S blocks where
                       * an add to the code was one per slot and block: n = 1 ran 1.00-1.05x as fast
                       * (AVX-512 Xeon, in one process, toggled per call; identical code 0.99-1.01x) */
            xr[0] = _mm512_permute_ps(xb, 0x39), xr[1] = _mm512_permute_ps(xb, 0x4E), xr[2] = _mm512_permute_ps(xb, 0x93);
        }
        if (n == 2 && g == 8) /* slots 16..31 are in the second word */
#pragma GCC unroll 4
            for (int s = 0; s < S; s++) c[s] = _mm512_load_si512(rec[s] + 64);
#pragma GCC unroll 4
        for (int k = 0; k < 4 - n; k++) {
            int t = (4 - n) * g + k, ai = full ? t & 3 : k;
#pragma GCC unroll 4
            for (int s = 0; s < S; s++) {
                __m512 xs = _mm512_permutevar_ps(n == 1 ? xr[k] : xb, c[s]);
                if (sb * t % 64 == 0) pf_line(v[s] + sb * t, pf);
                acc[s][ai] = _mm512_fmadd_ps(load_w(dt, v[s], t), xs, acc[s][ai]);
                if (n != 1) c[s] = _mm512_srli_epi32(c[s], 2);
            }
        }
        if (n == 1)
#pragma GCC unroll 4
            for (int s = 0; s < S; s++) c[s] = _mm512_srli_epi32(c[s], 2);
    }
}

/* ---- int8 ---- */

/* Per pair u of kept slots (2u, 2u+1) of a chunk, each lane's (x[pos_a], x[pos_b]) is entry
 * (c >> 4 j) & 15 of a 16-dword table T_u, where c is the lane's code word and j = u (n = 3: slots 2u,
 * 2u+1 are groups 2u, 2u+1 and their fields bits 4u..4u+3), u % 8 (n = 2: the pair is group u, its two
 * fields bits 4(u % 8).. of word u / 8), u / 3 (n = 1: groups 2m, 2m+1 hold pairs 3m..3m+2, and their
 * two removed positions, bits 4m..4m+3, fix all three). vpermd reads only bits [3:0] of each index, so
 * the per-pair cost is one shift (shared by three pairs for n = 1), one vpermd with T_u as its memory
 * operand, the weights' widening and the dot product. T_u[i], i = a | b << 2, holds int16 x[lo] low and
 * x[hi] high; lo and hi are each base + ((a or b) + rot) & 3, all inputs of a table in one half of the
 * chunk's 64, so a table is one vpermw of that half by a constant word index (TIX below). */
#define TE(bs, f, r, i) ((bs) + ((((f) ? (i) >> 2 : (i) & 3) + (r)) & 3))
#define TW(bl, fl, rl, bh, fh, rh, i) TE(bl, fl, rl, i), TE(bh, fh, rh, i)
#define TIX(bl, fl, rl, bh, fh, rh)                                                                              \
    {TW(bl, fl, rl, bh, fh, rh, 0),  TW(bl, fl, rl, bh, fh, rh, 1),  TW(bl, fl, rl, bh, fh, rh, 2),             \
     TW(bl, fl, rl, bh, fh, rh, 3),  TW(bl, fl, rl, bh, fh, rh, 4),  TW(bl, fl, rl, bh, fh, rh, 5),             \
     TW(bl, fl, rl, bh, fh, rh, 6),  TW(bl, fl, rl, bh, fh, rh, 7),  TW(bl, fl, rl, bh, fh, rh, 8),             \
     TW(bl, fl, rl, bh, fh, rh, 9),  TW(bl, fl, rl, bh, fh, rh, 10), TW(bl, fl, rl, bh, fh, rh, 11),            \
     TW(bl, fl, rl, bh, fh, rh, 12), TW(bl, fl, rl, bh, fh, rh, 13), TW(bl, fl, rl, bh, fh, rh, 14),            \
     TW(bl, fl, rl, bh, fh, rh, 15)}
#define TIX1(m) TIX(8 * (m), 0, 1, 8 * (m), 0, 2), TIX(8 * (m), 0, 3, 8 * (m) + 4, 1, 1), TIX(8 * (m) + 4, 1, 2, 8 * (m) + 4, 1, 3)

/* word indices into one half (32 inputs) of the chunk: n = 3 tables u % 4, then n = 2 tables u % 8,
 * then n = 1 tables 3 (m % 4) + k (k = u % 3: pairs (k0, k1) of group 2m, (k2 of 2m, k0 of 2m + 1),
 * (k1, k2) of 2m + 1, a group's kept positions p+1, p+2, p+3 after its removed p) */
static _Alignas(64) const int16_t tix[24][32] = {
    TIX(0, 0, 0, 4, 1, 0),  TIX(8, 0, 0, 12, 1, 0),  TIX(16, 0, 0, 20, 1, 0),  TIX(24, 0, 0, 28, 1, 0),
    TIX(0, 0, 0, 0, 1, 0),  TIX(4, 0, 0, 4, 1, 0),   TIX(8, 0, 0, 8, 1, 0),    TIX(12, 0, 0, 12, 1, 0),
    TIX(16, 0, 0, 16, 1, 0), TIX(20, 0, 0, 20, 1, 0), TIX(24, 0, 0, 24, 1, 0), TIX(28, 0, 0, 28, 1, 0),
    TIX1(0),                TIX1(1),                 TIX1(2),                  TIX1(3)};

/* the tables T_0..T_{np-1} of one chunk's int16 inputs xq[0..63] (n = 1..3); built once per chunk and
 * read by every block whose chunk record pairs with these inputs (run() shares them across blocks) */
INLINE void tables_i8(int n, const int16_t *xq, int np, __m512i *tab) {
    __m512i xlo = _mm512_loadu_si512(xq), xhi = _mm512_loadu_si512(xq + 32);
#pragma GCC unroll 24
    for (int u = 0; u < np; u++) {
        int t = n == 3 ? u % 4 : n == 2 ? 4 + u % 8 : 12 + 3 * (u / 3 % 4) + u % 3;
        int hi = n == 3 ? u >= 4 : n == 2 ? u >= 8 : u >= 12;
        _mm512_store_si512(tab + u, _mm512_permutexvar_epi16(_mm512_load_si512(tix[t]), hi ? xhi : xlo));
    }
}

/* acc += w.lo * x.lo + w.hi * x.hi per int32 lane. The VNNI instruction is written as inline asm so
 * that this file needs no -mavx512vnni (the compiler could then emit VNNI anywhere); it runs only
 * where the CPU reports VNNI. */
INLINE __m512i dot_pairs(__m512i acc, __m512i w, __m512i x, int vnni) {
    if (!vnni) return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
    return acc;
}

/* int32 sums of one chunk record (npairs pairs) against the chunk's int16 inputs xq[0..63] (n = 0) or
 * its tables tab (n = 1..3, tables_i8) */
INLINE __m512i chunk_i8(int n, const uint8_t *rec, const int16_t *xq, const __m512i *tab, int npairs, int vnni,
                        size_t pf) {
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
    __m512i c0 = _mm512_load_si512(rec), c1 = n == 2 ? _mm512_load_si512(rec + 64) : c0;
#pragma GCC unroll 32 /* n = 2 has 32 pairs: every field below a constant */
    for (int u = 0; u < npairs; u++) {
        int j = n == 3 ? u : n == 2 ? u % 8 : u / 3;
        __m512i c = n == 2 && u >= 8 ? c1 : c0;
        __m512i idx = j ? _mm512_srli_epi32(c, 4 * j) : c;
        __m512i xp = _mm512_permutexvar_epi32(idx, _mm512_load_si512(tab + u));
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

/* tab1: the tables of a panel that is one chunk, built once by run() for all its blocks, else NULL */
INLINE __m512 block_panel(const sb_v2_act *a, const uint8_t *rec, int j0, int len, int n, int dt, int vnni, size_t pf,
                          const __m512i *tab1) {
    int full = len / SB_V2_CHUNK, rest = len % SB_V2_CHUNK, Gt = (rest + 3) / 4, ch0 = j0 / SB_V2_CHUNK;
    size_t rb = sb_v2_record_bytes(n, dt, 16);
    if (dt == SB_V2_I8) {
        _Alignas(64) __m512i tab[24];
        __m512 acc = _mm512_setzero_ps();
        for (int ch = 0; ch <= full; ch++, rec += rb) {
            if (ch == full && !rest) break;
            const int16_t *xq = a->xq + SB_V2_CHUNK * (ch0 + ch);
            __m512i s;
            if (ch < full) {
                if (n && !tab1) tables_i8(n, xq, 8 * (4 - n), tab);
                s = chunk_i8(n, rec, xq, tab1 ? tab1 : tab, 8 * (4 - n), vnni, pf);
            } else {
                int np = (Gt * (4 - n) + 1) / 2;
                if (n && !tab1) tables_i8(n, xq, np, tab);
                s = chunk_i8(n, rec, xq, tab1 ? tab1 : tab, np, vnni, pf);
            }
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(a->xs[ch0 + ch]), acc);
        }
        return acc;
    }
    __m512 ac[1][4] = {{_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()}};
    const float *x = a->x + j0;
    for (int ch = 0; ch < full; ch++, rec += rb, x += SB_V2_CHUNK) chunk_fp(n, dt, &rec, 1, x, 16, 1, ac, pf);
    if (rest) chunk_fp(n, dt, &rec, 1, x, Gt, 0, ac, pf);
    return _mm512_add_ps(_mm512_add_ps(ac[0][0], ac[0][1]), _mm512_add_ps(ac[0][2], ac[0][3]));
}

/* S blocks' streams over one panel side by side, rec0[s] the start of block s's: one chunk record of
 * each in turn (the tail chunk too); the panel sums into out[s] */
INLINE void blocks_panel(const sb_v2_act *a, const uint8_t *const *rec0, int S, int j0, int len, int n, int dt,
                         int vnni, size_t pf, const __m512i *tab1, __m512 *out) {
    int full = len / SB_V2_CHUNK, rest = len % SB_V2_CHUNK, Gt = (rest + 3) / 4, ch0 = j0 / SB_V2_CHUNK;
    size_t rb = sb_v2_record_bytes(n, dt, 16);
    const uint8_t *rec[4];
    for (int s = 0; s < S; s++) rec[s] = rec0[s];
    if (dt == SB_V2_I8) {
        _Alignas(64) __m512i tab[24];
        __m512 acc[4];
        for (int s = 0; s < S; s++) acc[s] = _mm512_setzero_ps();
        for (int ch = 0; ch <= full; ch++) {
            if (ch == full && !rest) break;
            int np = ch < full ? 8 * (4 - n) : (Gt * (4 - n) + 1) / 2;
            const int16_t *xq = a->xq + SB_V2_CHUNK * (ch0 + ch);
            __m512 xs = _mm512_set1_ps(a->xs[ch0 + ch]);
            if (n && !tab1) { /* one set of tables for the S blocks */
                if (ch < full) tables_i8(n, xq, 8 * (4 - n), tab);
                else tables_i8(n, xq, np, tab);
            }
            const __m512i *t = tab1 ? tab1 : tab;
            for (int s = 0; s < S; s++) {
                __m512i v = ch < full ? chunk_i8(n, rec[s], xq, t, 8 * (4 - n), vnni, pf) : chunk_i8(n, rec[s], xq, t, np, vnni, pf);
                acc[s] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), xs, acc[s]);
                rec[s] += rb;
            }
        }
        for (int s = 0; s < S; s++) out[s] = acc[s];
        return;
    }
    __m512 ac[4][4];
    for (int s = 0; s < S; s++)
        for (int k = 0; k < 4; k++) ac[s][k] = _mm512_setzero_ps();
    const float *x = a->x + j0;
    for (int ch = 0; ch < full; ch++, x += SB_V2_CHUNK) {
        chunk_fp(n, dt, rec, S, x, 16, 1, ac, pf);
        for (int s = 0; s < S; s++) rec[s] += rb;
    }
    if (rest) chunk_fp(n, dt, rec, S, x, Gt, 0, ac, pf);
    for (int s = 0; s < S; s++)
        out[s] = _mm512_add_ps(_mm512_add_ps(ac[s][0], ac[s][1]), _mm512_add_ps(ac[s][2], ac[s][3]));
}

/* ---- prefill: tokens in lanes, on channel-major activations (act[0].cm) ----
 * Each chunk record of a block is decoded once into (input row offset, fp32 weight) per row and kept
 * slot (int8: q times the row scale), then every row runs over the tokens: per kept weight one
 * broadcast and, per 16 tokens, one load of x's row and one FMA, so a class costs in proportion to
 * its kept weights (the rows-in-lanes pass paid a permute per token and slot). */
#define TV_MAX 8 /* token vectors per pass: 128 tokens, 8 independent FMA chains */

INLINE void decode_chunk(int n, int dt, const uint8_t *rec, int G, int j0, int K, int ldc, __m512 sc, int32_t *off, float *w) {
    const uint8_t *v = rec + sb_v2_code_bytes(n);
    __m512i c0 = n ? _mm512_load_si512(rec) : _mm512_setzero_si512();
    __m512i c1 = n == 2 ? _mm512_load_si512(rec + 64) : c0, three = _mm512_set1_epi32(3);
    __m512i kmax = _mm512_set1_epi32(K - 1), vldc = _mm512_set1_epi32(ldc);
    int S = G * (4 - n);
    for (int t = 0; t < S; t++) {
        int g = n == 0 ? t / 4 : n == 1 ? t / 3 : n == 2 ? t / 2 : t;
        __m512i pos;
        if (n == 0) pos = _mm512_set1_epi32(t & 3);
        else if (n == 1) /* the removed position, then the kept ones in rotated order */
            pos = _mm512_add_epi32(_mm512_srl_epi32(c0, _mm_cvtsi32_si128(2 * g)), _mm512_set1_epi32(t % 3 + 1));
        else if (n == 2) pos = _mm512_srl_epi32(t < 16 ? c0 : c1, _mm_cvtsi32_si128(2 * (t % 16)));
        else pos = _mm512_srl_epi32(c0, _mm_cvtsi32_si128(2 * t));
        __m512i j = _mm512_add_epi32(_mm512_and_si512(pos, three), _mm512_set1_epi32(j0 + 4 * g));
        j = _mm512_min_epi32(j, kmax); /* an input past K has a zero weight: read a real row instead */
        _mm512_store_si512(off + SB_V2_B * t, _mm512_mullo_epi32(j, vldc));
        __m512 wv;
        if (dt == SB_V2_F32) wv = _mm512_loadu_ps(v + 64 * (size_t)t);
        else if (dt == SB_V2_F16) wv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + 32 * (size_t)t)));
        else { /* row-interleaved pairs: slot 2u in the low int16 of the row's dword, 2u + 1 in the high */
            __m512i q = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(v + 32 * (size_t)(t / 2))));
            q = t & 1 ? _mm512_srai_epi32(q, 16) : _mm512_srai_epi32(_mm512_slli_epi32(q, 16), 16);
            wv = _mm512_mul_ps(_mm512_cvtepi32_ps(q), sc);
        }
        _mm512_store_ps(w + SB_V2_B * t, wv);
    }
}

/* y[0..16 TV) += sum over the S kept weights of one row of w * x[off]; the last vector masked */
INLINE void row_tok(const int32_t *off, const float *w, int S, const float *X, float *y, int TV, __mmask16 last) {
    __m512 a[TV_MAX];
    for (int v = 0; v < TV; v++) a[v] = _mm512_setzero_ps();
    for (int s = 0; s < S; s++) {
        __m512 wb = _mm512_set1_ps(w[SB_V2_B * s]);
        const float *xp = X + off[SB_V2_B * s];
        for (int v = 0; v < TV; v++)
            a[v] = _mm512_fmadd_ps(wb, v == TV - 1 ? _mm512_maskz_loadu_ps(last, xp + 16 * v) : _mm512_loadu_ps(xp + 16 * v), a[v]);
    }
    for (int v = 0; v < TV - 1; v++) _mm512_storeu_ps(y + 16 * v, _mm512_add_ps(_mm512_loadu_ps(y + 16 * v), a[v]));
    float *yl = y + 16 * (TV - 1);
    _mm512_mask_storeu_ps(yl, last, _mm512_add_ps(_mm512_maskz_loadu_ps(last, yl), a[TV - 1]));
}

/* the block's rows over one decoded chunk, tokens [t0, t0 + nt), nt <= 16 TV_MAX */
static void rows_tok(const sb_v2_class *c, int b, const int32_t *off, const float *w, int S, const float *X, float *Y, int ldy, int nt) {
    int TV = (nt + 15) / 16;
    __mmask16 last = (__mmask16)(nt % 16 ? (1u << nt % 16) - 1 : 0xffff);
    const int32_t *idx = c->index + SB_V2_B * b;
    for (int r = 0; r < SB_V2_B; r++) {
        if (idx[r] < 0) continue;
        float *y = Y + (size_t)idx[r] * ldy;
        switch (TV) { /* a constant count of accumulators per case */
        case 1: row_tok(off + r, w + r, S, X, y, 1, last); break;
        case 2: row_tok(off + r, w + r, S, X, y, 2, last); break;
        case 3: row_tok(off + r, w + r, S, X, y, 3, last); break;
        case 4: row_tok(off + r, w + r, S, X, y, 4, last); break;
        case 5: row_tok(off + r, w + r, S, X, y, 5, last); break;
        case 6: row_tok(off + r, w + r, S, X, y, 6, last); break;
        case 7: row_tok(off + r, w + r, S, X, y, 7, last); break;
        default: row_tok(off + r, w + r, S, X, y, 8, last); break;
        }
    }
}

INLINE void run_cm(const sb_v2_class *c, const sb_v2_act *a0, int T, float *Y, int ldy, int b0, int b1, int n, int dt) {
    _Alignas(64) int32_t off[SB_V2_CHUNK * SB_V2_B];
    _Alignas(64) float w[SB_V2_CHUNK * SB_V2_B];
    const uint8_t *panel = c->stream;
    for (int p = 0; p < sb_v2_npanels(c->K, c->panel); p++) {
        int len = sb_v2_panel_len(c->K, c->panel, p), j0 = p * c->panel;
        size_t bpb = sb_v2_block_panel_bytes(n, dt, c->K, c->panel, p);
        for (int b = b0; b < b1; b++) {
            const uint8_t *rec = panel + (size_t)b * bpb;
            __m512 sc = c->scale ? _mm512_loadu_ps(c->scale + SB_V2_B * b) : _mm512_set1_ps(1.0f);
            for (int jc = 0; jc < len; jc += SB_V2_CHUNK) {
                int G = len - jc >= SB_V2_CHUNK ? 16 : (len - jc + 3) / 4;
                if (G == 16) decode_chunk(n, dt, rec, 16, j0 + jc, c->K, a0->ldc, sc, off, w);
                else decode_chunk(n, dt, rec, G, j0 + jc, c->K, a0->ldc, sc, off, w);
                for (int t0 = 0; t0 < T; t0 += 16 * TV_MAX) {
                    int nt = T - t0 < 16 * TV_MAX ? T - t0 : 16 * TV_MAX;
                    rows_tok(c, b, off, w, G * (4 - n), a0->cm + t0, Y + t0, ldy, nt);
                }
                rec += sb_v2_record_bytes(n, dt, G);
            }
        }
        panel += bpb * (size_t)c->nblocks;
    }
}

INLINE void scatter(const sb_v2_class *c, int b, __m512 acc, float *y, size_t ldy) {
    float out[SB_V2_B];
    if (c->scale) acc = _mm512_mul_ps(acc, _mm512_loadu_ps(c->scale + SB_V2_B * b));
    const int32_t *idx = c->index + SB_V2_B * b;
    /* rows idx[0]..idx[0]+15 (a class of one n over whole blocks, as a uniform recipe packs every row):
     * one vector add; dt_proj's blocks of one chunk spent as long here as in the product (int8 1.1-1.3x) */
    __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    if (ldy == 1 && idx[0] >= 0 &&
        _mm512_cmpeq_epi32_mask(_mm512_loadu_si512(idx), _mm512_add_epi32(_mm512_set1_epi32(idx[0]), iota)) == 0xffff) {
        _mm512_storeu_ps(y + idx[0], _mm512_add_ps(_mm512_loadu_ps(y + idx[0]), acc));
        return;
    }
    _mm512_storeu_ps(out, acc);
    for (int r = 0; r < SB_V2_B; r++)
        if (idx[r] >= 0) y[(size_t)idx[r] * ldy] += out[r];
}

#ifndef STREAMS
#define STREAMS 4
#endif

/* panels outer (x of a panel stays in L1), blocks inner; without act[0].cm (decode, tests) each token is
 * a GEMV pass over a block's panel stream while it is in cache (weights from memory once: no prefetch) */
INLINE void run(const sb_v2_class *c, const sb_v2_act *act, int T, float *Y, int ldy, int b0, int b1, int n, int dt,
                int vnni) {
    if (act[0].cm) {
        run_cm(c, &act[0], T, Y, ldy, b0, b1, n, dt);
        return;
    }
    const uint8_t *panel = c->stream;
    size_t pf = T == 1 ? sb_v2_prefetch_bytes() : 0;
    for (int p = 0; p < sb_v2_npanels(c->K, c->panel); p++) {
        int len = sb_v2_panel_len(c->K, c->panel, p), j0 = p * c->panel, b = b0;
        size_t bpb = sb_v2_block_panel_bytes(n, dt, c->K, c->panel, p);
        /* a panel of one chunk (dt_proj's K = 48 / 64, a last panel's tail): its int8 tables once for all
         * blocks, not once per block */
        _Alignas(64) __m512i tab1[24];
        const __m512i *t1 = NULL;
        if (dt == SB_V2_I8 && n && T == 1 && len <= SB_V2_CHUNK) {
            tables_i8(n, act[0].xq + j0, ((len + 3) / 4 * (4 - n) + 1) / 2, tab1);
            t1 = tab1;
        }
        if (T == 1 && b1 - b0 >= STREAMS && (dt != SB_V2_I8 || bpb >= 1024)) {
            /* decode: the blocks as STREAMS contiguous runs read side by side (several sequential streams
             * read memory faster than one: bench/README.md, the read probe), then the leftover blocks. Not
             * int8 blocks of under 1 KiB a panel (dt_proj's K = 48 / 64): one chunk of a few hundred bytes
             * each, they ran 0.7-0.8x as fast so (AVX-512, n = 3) */
            int q = (b1 - b0) / STREAMS;
            for (int i = 0; i < q; i++) {
                const uint8_t *rec[STREAMS];
                __m512 out[STREAMS];
                for (int s = 0; s < STREAMS; s++) rec[s] = panel + (size_t)(b0 + s * q + i) * bpb;
                blocks_panel(&act[0], rec, STREAMS, j0, len, n, dt, vnni, pf, t1, out);
                for (int s = 0; s < STREAMS; s++) scatter(c, b0 + s * q + i, out[s], Y, (size_t)ldy);
            }
            b = b0 + STREAMS * q;
        }
        for (; b < b1; b++)
            for (int t = 0; t < T; t++)
                scatter(c, b, block_panel(&act[t], panel + (size_t)b * bpb, j0, len, n, dt, vnni, pf, t1), Y + t,
                        (size_t)ldy);
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

/* sb_v2_quantise_ref's xq and xs with 16 lanes: the same max, scale (a scalar division, as there),
 * rounding (vcvtps2dq: nearest even, as lrintf) and clamp, so the same bits; no xt (these kernels read
 * the int16 inputs through their own tables). A chunk is four vectors; with xt (the AVX2 version) a
 * 2048-wide quantisation took 1.2 us, without it 0.86 us in AVX2 (hot, this Xeon). */
void sb_v2_quantise_avx512(sb_v2_act *a) {
    const __m512i lim = _mm512_set1_epi32(32767), nlim = _mm512_set1_epi32(-32767);
    for (int c = 0; c < a->nchunk; c++) {
        const float *xc = a->x + SB_V2_CHUNK * c;
        __m512 v[4];
        for (int i = 0; i < 4; i++) v[i] = _mm512_loadu_ps(xc + 16 * i);
        __m512 m = _mm512_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])),
                                 _mm512_max_ps(_mm512_abs_ps(v[2]), _mm512_abs_ps(v[3])));
        float mx = _mm512_reduce_max_ps(m), s = mx > 0.0f ? mx / 32767.0f : 1.0f, inv = 1.0f / s;
        a->xs[c] = s;
        __m512 vinv = _mm512_set1_ps(inv);
        int16_t *xq = a->xq + SB_V2_CHUNK * c;
        for (int i = 0; i < 4; i++) {
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], vinv));
            q = _mm512_min_epi32(_mm512_max_epi32(q, nlim), lim);
            _mm256_storeu_si256((__m256i *)(xq + 16 * i), _mm512_cvtepi32_epi16(q));
        }
    }
}
