/* AVX2 + FMA + F16C kernels of packed format v2 (this file only is built with those flags): a 16-row
 * block is two ymm halves (rows 0..7, 8..15) that share every broadcast of x and every table load.
 * fp32 / f16: as in linear_v2_avx512.c: per group x[4g..4g+3] broadcast to both 128-bit lanes, per slot
 *   one vpermilps (each lane picks its input by the low 2 bits of its shifted code word), one load
 *   of 8 rows' values, one FMA per half.
 * int8: int16 activations and vpmaddwd on pairs of slots. AVX2 has no word permute across 16
 *   entries, so each lane's (x[pos_a], x[pos_b]) dword is the OR of two vpermilps picks: one from
 *   the group's table with q in the low int16 of each dword, one from the table with q in the high
 *   int16 (sb_v2_act.xt). Sums are int32 per chunk, flushed to fp32 with the chunk's scale. */
#include <immintrin.h>
#include <string.h>

#include "linear_v2.h"

#define INLINE static inline __attribute__((always_inline))
#ifndef STREAMS
#define STREAMS 4 /* block streams a decode product reads side by side */
#endif
#define STREAMS_MAX 4

/* decode prefetches each line of the stream pf bytes ahead into L1, as linear_v2_avx512.c does (with 4 block
 * streams side by side 8-17% faster than into L2 here) */
INLINE void pf_line(const uint8_t *p, size_t pf) { _mm_prefetch((const char *)p + pf, _MM_HINT_T0); }

static inline __m256 permute(__m256 t, __m256i idx) { return _mm256_permutevar_ps(t, idx); }

INLINE __m256 load_w(int dt, const uint8_t *v, int t, int half) {
    if (dt == SB_V2_F32) return _mm256_loadu_ps((const float *)(v + 64 * (size_t)t + 32 * half));
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + 32 * (size_t)t + 16 * half)));
}

/* G = 16 (a full chunk, `full` set: the loops unroll) or a tail's run-time G, where a slot's accumulator
 * pair follows its place k in the group, so that acc[] stays in registers */
INLINE void chunk_fp(int n, int dt, const uint8_t *rec, const float *x, int G, int full, __m256 acc[4], size_t pf) {
    const uint8_t *v = rec + sb_v2_code_bytes(n);
    const int sb = dt == SB_V2_F32 ? 64 : 32; /* bytes of one slot's 16 values */
    if (n == 0) {
#pragma GCC unroll 8
        for (int g = 0; g < G; g++)
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                int t = 4 * g + k, ai = 2 * (k & 1);
                if (sb * t % 64 == 0) pf_line(v + sb * t, pf);
                __m256 xs = _mm256_broadcast_ss(x + t);
                acc[ai] = _mm256_fmadd_ps(load_w(dt, v, t, 0), xs, acc[ai]);
                acc[ai + 1] = _mm256_fmadd_ps(load_w(dt, v, t, 1), xs, acc[ai + 1]);
            }
        return;
    }
    pf_line(rec, pf);
    if (n == 2) pf_line(rec + 64, pf);
    __m256i c0 = _mm256_load_si256((const __m256i *)rec), c1 = _mm256_load_si256((const __m256i *)(rec + 32));
#pragma GCC unroll 16
    for (int g = 0; g < G; g++) {
        __m256 xb = _mm256_broadcast_ps((const __m128 *)(x + 4 * g));
        if (n == 2 && g == 8) { /* slots 16..31 are in the second code word */
            c0 = _mm256_load_si256((const __m256i *)(rec + 64));
            c1 = _mm256_load_si256((const __m256i *)(rec + 96));
        }
#pragma GCC unroll 4
        for (int k = 0; k < 4 - n; k++) {
            int t = (4 - n) * g + k, ai = 2 * ((full ? t : k) & 1);
            __m256i i0 = c0, i1 = c1;
            if (n == 1) { /* kept = removed + 1 + k (mod 4: the permute reads 2 bits) */
                i0 = _mm256_add_epi32(c0, _mm256_set1_epi32(k + 1));
                i1 = _mm256_add_epi32(c1, _mm256_set1_epi32(k + 1));
            }
            if (sb * t % 64 == 0) pf_line(v + sb * t, pf);
            acc[ai] = _mm256_fmadd_ps(load_w(dt, v, t, 0), permute(xb, i0), acc[ai]);
            acc[ai + 1] = _mm256_fmadd_ps(load_w(dt, v, t, 1), permute(xb, i1), acc[ai + 1]);
            if (n != 1) c0 = _mm256_srli_epi32(c0, 2), c1 = _mm256_srli_epi32(c1, 2);
        }
        if (n == 1) c0 = _mm256_srli_epi32(c0, 2), c1 = _mm256_srli_epi32(c1, 2);
    }
}

/* code field, group and n = 1 rotation of slot t of a chunk */
INLINE void slot_field(int n, int t, int *f, int *g, int *add) {
    if (n == 1) *f = *g = t / 3, *add = t % 3 + 1;
    else *f = t, *g = n == 2 ? t / 2 : t, *add = 0;
}

INLINE __m256i pick(__m256i code, int f, int add, __m256 table) {
    __m256i i = _mm256_srli_epi32(code, 2 * (f % 16));
    if (add) i = _mm256_add_epi32(i, _mm256_set1_epi32(add));
    return _mm256_castps_si256(permute(table, i));
}

/* int32 sums (two halves) of one chunk record of npairs pairs */
INLINE void chunk_i8(int n, const uint8_t *rec, const int16_t *xq, const uint32_t *xt, int npairs, __m256i s[2], size_t pf) {
    const uint8_t *v = rec + sb_v2_code_bytes(n);
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, b0 = a0, b1 = a0;
    if (n == 0) {
        const int32_t *x32 = (const int32_t *)xq;
#pragma GCC unroll 8
        for (int u = 0; u < npairs; u++) {
            if (u % 2 == 0) pf_line(v + 32 * u, pf);
            __m256i xd = _mm256_set1_epi32(x32[u]);
            __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(v + 32 * u)));
            __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(v + 32 * u + 16)));
            if (u & 1) b0 = _mm256_add_epi32(b0, _mm256_madd_epi16(w0, xd)), b1 = _mm256_add_epi32(b1, _mm256_madd_epi16(w1, xd));
            else a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(w0, xd)), a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(w1, xd));
        }
    } else {
        __m256i c[2][2]; /* [word][half] */
        pf_line(rec, pf);
        if (n == 2) pf_line(rec + 64, pf);
        for (int w = 0; w < (n == 2 ? 2 : 1); w++) {
            c[w][0] = _mm256_load_si256((const __m256i *)(rec + 64 * w));
            c[w][1] = _mm256_load_si256((const __m256i *)(rec + 64 * w + 32));
        }
#pragma GCC unroll 24
        for (int u = 0; u < npairs; u++) {
            int fa, ga, da, fb, gb, db;
            slot_field(n, 2 * u, &fa, &ga, &da);
            slot_field(n, 2 * u + 1, &fb, &gb, &db);
            __m256 tl = _mm256_castsi256_ps(_mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)(xt + 8 * ga))));
            __m256 th = _mm256_castsi256_ps(_mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)(xt + 8 * gb + 4))));
            __m256i x0 = _mm256_or_si256(pick(c[fa / 16][0], fa, da, tl), pick(c[fb / 16][0], fb, db, th));
            __m256i x1 = _mm256_or_si256(pick(c[fa / 16][1], fa, da, tl), pick(c[fb / 16][1], fb, db, th));
            if (u % 2 == 0) pf_line(v + 32 * u, pf);
            __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(v + 32 * u)));
            __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(v + 32 * u + 16)));
            if (u & 1) b0 = _mm256_add_epi32(b0, _mm256_madd_epi16(w0, x0)), b1 = _mm256_add_epi32(b1, _mm256_madd_epi16(w1, x1));
            else a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(w0, x0)), a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(w1, x1));
        }
    }
    s[0] = _mm256_add_epi32(a0, b0), s[1] = _mm256_add_epi32(a1, b1);
}

/* the 16 rows of each of S blocks over one panel (rec0[s]: block s's stream there), as two halves; the
 * S streams side by side, one chunk record of each in turn (S > 1: decode, see run()) */
INLINE void blocks_panel(const sb_v2_act *a, const uint8_t *const *rec0, int S, int j0, int len, int n, int dt,
                         __m256 *lo, __m256 *hi, size_t pf) {
    int full = len / SB_V2_CHUNK, rest = len % SB_V2_CHUNK, Gt = (rest + 3) / 4, ch0 = j0 / SB_V2_CHUNK;
    size_t rb = sb_v2_record_bytes(n, dt, 16);
    const uint8_t *rec[STREAMS_MAX];
    for (int s = 0; s < S; s++) rec[s] = rec0[s];
    if (dt == SB_V2_I8) {
        __m256 l[STREAMS_MAX], h[STREAMS_MAX];
        for (int s = 0; s < S; s++) l[s] = h[s] = _mm256_setzero_ps();
        for (int ch = 0; ch < full + (rest > 0); ch++) {
            int j = SB_V2_CHUNK * (ch0 + ch);
            __m256 sc = _mm256_set1_ps(a->xs[ch0 + ch]);
            for (int s = 0; s < S; s++) {
                __m256i v[2];
                if (ch < full) chunk_i8(n, rec[s], a->xq + j, a->xt + 2 * j, 8 * (4 - n), v, pf);
                else chunk_i8(n, rec[s], a->xq + j, a->xt + 2 * j, (Gt * (4 - n) + 1) / 2, v, pf);
                l[s] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v[0]), sc, l[s]);
                h[s] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v[1]), sc, h[s]);
                rec[s] += rb;
            }
        }
        for (int s = 0; s < S; s++) lo[s] = l[s], hi[s] = h[s];
        return;
    }
    __m256 ac[STREAMS_MAX][4];
    for (int s = 0; s < S; s++)
        for (int k = 0; k < 4; k++) ac[s][k] = _mm256_setzero_ps();
    const float *x = a->x + j0;
    for (int ch = 0; ch < full; ch++, x += SB_V2_CHUNK)
        for (int s = 0; s < S; s++) chunk_fp(n, dt, rec[s], x, 16, 1, ac[s], pf), rec[s] += rb;
    for (int s = 0; s < S; s++) {
        if (rest) chunk_fp(n, dt, rec[s], x, Gt, 0, ac[s], pf);
        lo[s] = _mm256_add_ps(ac[s][0], ac[s][2]), hi[s] = _mm256_add_ps(ac[s][1], ac[s][3]);
    }
}

/* y[index[r] * ldy] += the block's 16 sums (int8: times the row scales) */
INLINE void scatter(const sb_v2_class *c, int b, __m256 lo, __m256 hi, float *y, size_t ldy) {
    float out[SB_V2_B];
    if (c->scale) {
        lo = _mm256_mul_ps(lo, _mm256_loadu_ps(c->scale + SB_V2_B * b));
        hi = _mm256_mul_ps(hi, _mm256_loadu_ps(c->scale + SB_V2_B * b + 8));
    }
    _mm256_storeu_ps(out, lo), _mm256_storeu_ps(out + 8, hi);
    const int32_t *idx = c->index + SB_V2_B * b;
    for (int r = 0; r < SB_V2_B; r++)
        if (idx[r] >= 0) y[(size_t)idx[r] * ldy] += out[r];
}

/* ---- prefill: tokens in lanes, on channel-major activations (act[0].cm) ----
 * As linear_v2_avx512.c: each chunk record of a block decoded once into (input row offset, fp32 weight)
 * per row and kept slot, then per row and kept weight one broadcast and, per 8 tokens, one FMA with x's
 * row read from memory: the cost follows the kept weights. */
#define TV_MAX 8 /* token vectors per pass: 64 tokens, 8 independent FMA chains */

INLINE void decode_chunk(int n, int dt, const uint8_t *rec, int G, int j0, int K, int ldc, const float *scale, int32_t *off, float *w) {
    const uint8_t *v = rec + sb_v2_code_bytes(n);
    __m256i three = _mm256_set1_epi32(3), kmax = _mm256_set1_epi32(K - 1), vldc = _mm256_set1_epi32(ldc);
    int S = G * (4 - n);
    for (int h = 0; h < 2; h++) { /* rows 0..7, then 8..15 */
        __m256i c0 = n ? _mm256_load_si256((const __m256i *)(rec + 32 * h)) : _mm256_setzero_si256();
        __m256i c1 = n == 2 ? _mm256_load_si256((const __m256i *)(rec + 64 + 32 * h)) : c0;
        __m256 sc = scale ? _mm256_loadu_ps(scale + 8 * h) : _mm256_set1_ps(1.0f);
        for (int t = 0; t < S; t++) {
            int g = n == 0 ? t / 4 : n == 1 ? t / 3 : n == 2 ? t / 2 : t;
            __m256i pos;
            if (n == 0) pos = _mm256_set1_epi32(t & 3);
            else if (n == 1) pos = _mm256_add_epi32(_mm256_srl_epi32(c0, _mm_cvtsi32_si128(2 * g)), _mm256_set1_epi32(t % 3 + 1));
            else if (n == 2) pos = _mm256_srl_epi32(t < 16 ? c0 : c1, _mm_cvtsi32_si128(2 * (t % 16)));
            else pos = _mm256_srl_epi32(c0, _mm_cvtsi32_si128(2 * t));
            __m256i j = _mm256_add_epi32(_mm256_and_si256(pos, three), _mm256_set1_epi32(j0 + 4 * g));
            j = _mm256_min_epi32(j, kmax); /* an input past K has a zero weight: read a real row instead */
            _mm256_store_si256((__m256i *)(off + SB_V2_B * t + 8 * h), _mm256_mullo_epi32(j, vldc));
            __m256 wv;
            if (dt == SB_V2_F32) wv = _mm256_loadu_ps((const float *)(v + 64 * (size_t)t + 32 * h));
            else if (dt == SB_V2_F16) wv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + 32 * (size_t)t + 16 * h)));
            else {
                __m256i q = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(v + 32 * (size_t)(t / 2) + 16 * h)));
                q = t & 1 ? _mm256_srai_epi32(q, 16) : _mm256_srai_epi32(_mm256_slli_epi32(q, 16), 16);
                wv = _mm256_mul_ps(_mm256_cvtepi32_ps(q), sc);
            }
            _mm256_store_ps(w + SB_V2_B * t + 8 * h, wv);
        }
    }
}

/* y[0..8 TV) += sum over the S kept weights of one row of w * x[off]; the last vector masked */
INLINE void row_tok(const int32_t *off, const float *w, int S, const float *X, float *y, int TV, __m256i last) {
    __m256 a[TV_MAX];
    for (int v = 0; v < TV; v++) a[v] = _mm256_setzero_ps();
    for (int s = 0; s < S; s++) {
        __m256 wb = _mm256_broadcast_ss(w + SB_V2_B * s);
        const float *xp = X + off[SB_V2_B * s];
        for (int v = 0; v < TV; v++)
            a[v] = _mm256_fmadd_ps(wb, v == TV - 1 ? _mm256_maskload_ps(xp + 8 * v, last) : _mm256_loadu_ps(xp + 8 * v), a[v]);
    }
    for (int v = 0; v < TV - 1; v++) _mm256_storeu_ps(y + 8 * v, _mm256_add_ps(_mm256_loadu_ps(y + 8 * v), a[v]));
    float *yl = y + 8 * (TV - 1);
    _mm256_maskstore_ps(yl, last, _mm256_add_ps(_mm256_maskload_ps(yl, last), a[TV - 1]));
}

static void rows_tok(const sb_v2_class *c, int b, const int32_t *off, const float *w, int S, const float *X, float *Y, int ldy, int nt) {
    int TV = (nt + 7) / 8, rem = nt % 8 ? nt % 8 : 8;
    __m256i last = _mm256_cmpgt_epi32(_mm256_set1_epi32(rem), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
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
            const float *scale = c->scale ? c->scale + SB_V2_B * b : NULL;
            for (int jc = 0; jc < len; jc += SB_V2_CHUNK) {
                int G = len - jc >= SB_V2_CHUNK ? 16 : (len - jc + 3) / 4;
                if (G == 16) decode_chunk(n, dt, rec, 16, j0 + jc, c->K, a0->ldc, scale, off, w);
                else decode_chunk(n, dt, rec, G, j0 + jc, c->K, a0->ldc, scale, off, w);
                for (int t0 = 0; t0 < T; t0 += 8 * TV_MAX) {
                    int nt = T - t0 < 8 * TV_MAX ? T - t0 : 8 * TV_MAX;
                    rows_tok(c, b, off, w, G * (4 - n), a0->cm + t0, Y + t0, ldy, nt);
                }
                rec += sb_v2_record_bytes(n, dt, G);
            }
        }
        panel += bpb * (size_t)c->nblocks;
    }
}

/* panels outer (x of a panel stays in L1), blocks inner; without act[0].cm (decode, tests) each token is
 * a GEMV pass over a block's panel stream while it is in cache (weights from memory once: no prefetch) */
INLINE void run(const sb_v2_class *c, const sb_v2_act *act, int T, float *Y, int ldy, int b0, int b1, int n, int dt) {
    if (act[0].cm) {
        run_cm(c, &act[0], T, Y, ldy, b0, b1, n, dt);
        return;
    }
    const uint8_t *panel = c->stream;
    size_t pf = T == 1 ? sb_v2_prefetch_bytes() : 0;
    for (int p = 0; p < sb_v2_npanels(c->K, c->panel); p++) {
        int len = sb_v2_panel_len(c->K, c->panel, p), j0 = p * c->panel, b = b0;
        size_t bpb = sb_v2_block_panel_bytes(n, dt, c->K, c->panel, p);
        if (T == 1 && b1 - b0 >= STREAMS && (dt != SB_V2_I8 || bpb >= 1024)) {
            /* decode: the blocks as STREAMS contiguous runs read side by side (several sequential streams
             * read memory faster than one: bench/README.md, the read probe), then the leftover blocks. Not
             * int8 blocks of under 1 KiB a panel (dt_proj's K = 48 / 64): one chunk of a few hundred bytes
             * each, they ran 0.7-0.8x as fast so (AVX-512, n = 3) */
            int q = (b1 - b0) / STREAMS;
            for (int i = 0; i < q; i++) {
                const uint8_t *rec[STREAMS];
                __m256 lo[STREAMS], hi[STREAMS];
                for (int s = 0; s < STREAMS; s++) rec[s] = panel + (size_t)(b0 + s * q + i) * bpb;
                blocks_panel(&act[0], rec, STREAMS, j0, len, n, dt, lo, hi, pf);
                for (int s = 0; s < STREAMS; s++) scatter(c, b0 + s * q + i, lo[s], hi[s], Y, (size_t)ldy);
            }
            b = b0 + STREAMS * q;
        }
        for (; b < b1; b++)
            for (int t = 0; t < T; t++) {
                const uint8_t *rec = panel + (size_t)b * bpb;
                __m256 lo, hi;
                blocks_panel(&act[t], &rec, 1, j0, len, n, dt, &lo, &hi, pf);
                scatter(c, b, lo, hi, Y + t, (size_t)ldy);
            }
        panel += bpb * (size_t)c->nblocks;
    }
}

/* one specialised body per (dtype, n): the inner loops see constants */
#define BODY(N, DT) run(c, act, T, Y, ldy, b0, b1, N, DT)
void sb_v2_gemm_avx2(const sb_v2_class *c, const sb_v2_act *act, int T, float *Y, int ldy, int b0, int b1) {
    SB_V2_SPECIALISE(c, BODY)
}

void sb_v2_gemv_avx2(const sb_v2_class *c, const sb_v2_act *a, float *y, int b0, int b1) {
    sb_v2_gemm_avx2(c, a, 1, y, 1, b0, b1); /* T = 1 is a constant to the inlined loop of each body */
}

/* sb_v2_quantise_ref with 8 lanes: the same max, scale, rounding (vcvtps2dq: nearest even, as lrintf)
 * and clamp, so the same bits */
void sb_v2_quantise_avx2(sb_v2_act *a) {
    const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i lim = _mm256_set1_epi32(32767), nlim = _mm256_set1_epi32(-32767), lo16 = _mm256_set1_epi32(0xffff);
    for (int c = 0; c < a->nchunk; c++) {
        const float *xc = a->x + SB_V2_CHUNK * c;
        __m256 m = _mm256_setzero_ps();
        for (int i = 0; i < SB_V2_CHUNK; i += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(xc + i), abs));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float mx = _mm_cvtss_f32(h), s = mx > 0.0f ? mx / 32767.0f : 1.0f, inv = 1.0f / s;
        a->xs[c] = s;
        __m256 vinv = _mm256_set1_ps(inv);
        int16_t *xq = a->xq + SB_V2_CHUNK * c;
        uint32_t *xt = a->xt + 2 * SB_V2_CHUNK * c;
        for (int i = 0; i < SB_V2_CHUNK; i += 8) {
            __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xc + i), vinv));
            q = _mm256_min_epi32(_mm256_max_epi32(q, nlim), lim);
            _mm_storeu_si128((__m128i *)(xq + i), _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)));
            /* per group of 4: its q in the low int16 of 4 dwords, then in the high int16 */
            __m256i l = _mm256_and_si256(q, lo16), hgh = _mm256_slli_epi32(q, 16);
            _mm256_storeu_si256((__m256i *)(xt + 2 * i), _mm256_permute2x128_si256(l, hgh, 0x20));
            _mm256_storeu_si256((__m256i *)(xt + 2 * i + 8), _mm256_permute2x128_si256(l, hgh, 0x31));
        }
    }
}

/* sb_v2_cm_quantise_ref with 8 tokens in lanes: the same max, scale, rounding and clamp, so the same bits */
void sb_v2_cm_quantise_avx2(const float *X, int ldx, int K, int T, float *Q, int ldq, int ch0, int ch1) {
    const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i lim = _mm256_set1_epi32(32767), nlim = _mm256_set1_epi32(-32767);
    int T8 = T & ~7;
    for (int ch = ch0; ch < ch1; ch++) {
        int j0 = SB_V2_CHUNK * ch, j1 = j0 + SB_V2_CHUNK < K ? j0 + SB_V2_CHUNK : K;
        for (int t = 0; t < T8; t += 8) {
            __m256 m = _mm256_setzero_ps();
            for (int j = j0; j < j1; j++) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(X + (size_t)j * ldx + t), abs));
            __m256 s = _mm256_div_ps(m, _mm256_set1_ps(32767.0f));
            s = _mm256_blendv_ps(_mm256_set1_ps(1.0f), s, _mm256_cmp_ps(m, _mm256_setzero_ps(), _CMP_GT_OQ));
            __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), s);
            for (int j = j0; j < j1; j++) {
                __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(X + (size_t)j * ldx + t), inv));
                q = _mm256_min_epi32(_mm256_max_epi32(q, nlim), lim);
                _mm256_storeu_ps(Q + (size_t)j * ldq + t, _mm256_mul_ps(_mm256_cvtepi32_ps(q), s));
            }
        }
    }
    if (T8 < T) sb_v2_cm_quantise_ref(X + T8, ldx, K, T - T8, Q + T8, ldq, ch0, ch1);
}
