/* The prefill GEMM's loop over a block of decoded rows, shared by every SIMD family: each includes
 * this after defining its two tile functions (a wide tile of WIDE tokens and an 8-token one).
 *
 * Rows [r0, r1) are decoded into (column, weight) pairs, k per group of 4 columns, so column j's
 * entries start at j/4*k. KB input columns are taken at a time: the X slab that the rows of the block
 * read (KB columns x WIDE tokens) stays in L1 while each row passes over it. */
#ifndef SB_GEMM_BLOCKS_H
#define SB_GEMM_BLOCKS_H

#include "engine.h"

#define SB_KB 64

typedef void (*sb_tile_fn)(const int32_t *col, const float *w, int e0, int e1, const float *X, int ldx, float *yp);

static inline __attribute__((always_inline)) void sb_gemm_blocks(const sb_class *c, const float *X, int ldx, int T,
                                                                 float *Y, int ldy, int r0, int r1, const int32_t *cols,
                                                                 const float *ws, const int *count, int stride,
                                                                 int wide_tokens, sb_tile_fn wide, sb_tile_fn narrow) {
    int k = c->codes ? 4 - c->n : 4;
    int Tp = (T + 7) / 8 * 8; /* ldx is a multiple of 8: the padding columns are scratch */
    for (int kb = 0; kb < 4 * c->G; kb += SB_KB) {
        for (int t0 = 0; t0 < Tp;) {
            int is_wide = t0 + wide_tokens <= Tp;
            for (int r = r0; r < r1; r++) {
                int e0 = kb / 4 * k, e1 = (kb + SB_KB) / 4 * k;
                if (e1 > count[r - r0]) e1 = count[r - r0];
                if (e0 >= e1) continue;
                const int32_t *col = cols + (size_t)(r - r0) * stride;
                const float *w = ws + (size_t)(r - r0) * stride;
                float *yp = Y + (size_t)(c->idx ? c->idx[r] : r) * ldy + t0;
                if (is_wide) wide(col, w, e0, e1, X + t0, ldx, yp); /* direct calls once inlined */
                else narrow(col, w, e0, e1, X + t0, ldx, yp);
            }
            t0 += is_wide ? wide_tokens : 8;
        }
    }
}

#endif
