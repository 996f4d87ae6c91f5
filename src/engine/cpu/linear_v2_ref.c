/* The scalar reference of packed format v2: reads the layout the plainest way, one row at a time. It
 * is the spec the SIMD families are tested against; their order of operations is its own up to the
 * split of a panel's sum into several accumulators. */
#include <string.h>

#include "linear_v2.h"


/* the 16 rows of block b over panel p: out[r] = Σ over the panel's chunks (int8: scaled chunk sums) */
static void block_panel(const sb_v2_class *c, const sb_v2_act *a, int p, int b, float out[SB_V2_B]) {
    int len = sb_v2_panel_len(c->K, c->panel, p), nch = (len + SB_V2_CHUNK - 1) / SB_V2_CHUNK;
    for (int r = 0; r < SB_V2_B; r++) {
        const uint8_t *rec = sb_v2_block_stream(c, p, b);
        float acc = 0.0f;
        for (int ch = 0; ch < nch; ch++) {
            int rest = len - SB_V2_CHUNK * ch, G = rest >= SB_V2_CHUNK ? 16 : (rest + 3) / 4;
            int S = G * (4 - c->n), j0 = p * c->panel + SB_V2_CHUNK * ch; /* first input of the chunk */
            uint32_t w[2] = {0, 0};
            for (int k = 0; k < (int)sb_v2_code_bytes(c->n) / (4 * SB_V2_B); k++) memcpy(&w[k], rec + 4 * (SB_V2_B * k + r), 4);
            const uint8_t *v = rec + sb_v2_code_bytes(c->n);
            if (c->dtype == SB_V2_I8) { /* exact int32 sum per chunk, then the chunk's activation scale */
                int32_t s = 0;
                for (int t = 0; t < S; t++) s += (int8_t)v[sb_v2_value_at(c->dtype, t, r)] * a->xq[j0 + sb_v2_slot_pos(c->n, w, t)];
                acc += (float)s * a->xs[j0 / SB_V2_CHUNK];
            } else {
                for (int t = 0; t < S; t++) acc += sb_v2_value(c->dtype, v, sb_v2_value_at(c->dtype, t, r)) * a->x[j0 + sb_v2_slot_pos(c->n, w, t)];
            }
            rec += sb_v2_record_bytes(c->n, c->dtype, G);
        }
        out[r] = c->scale ? acc * c->scale[SB_V2_B * b + r] : acc;
    }
}

void sb_v2_gemv_ref(const sb_v2_class *c, const sb_v2_act *a, float *y, int b0, int b1) {
    for (int p = 0; p < sb_v2_npanels(c->K, c->panel); p++)
        for (int b = b0; b < b1; b++) {
            float out[SB_V2_B];
            block_panel(c, a, p, b, out);
            for (int r = 0; r < SB_V2_B; r++)
                if (c->index[SB_V2_B * b + r] >= 0) y[c->index[SB_V2_B * b + r]] += out[r];
        }
}

/* prefill on channel-major activations (act[0].cm): per row of block b and chunk of panel p, the sum over
 * the kept weights w (int8: q times the row scale) of w * x[j][t] for every token, then added to Y. The
 * token loops are plain C that a compiler vectorises (NEON's gemm runs this too). Inputs past K have
 * zero weights and are not read. */
#define CM_TILE 256 /* tokens per pass: the row's chunk sums stay on the stack */
static void block_panel_cm(const sb_v2_class *c, const sb_v2_act *a0, int t0, int T, float *Y, int ldy, int p, int b) {
    float acc[CM_TILE];
    int len = sb_v2_panel_len(c->K, c->panel, p), nch = (len + SB_V2_CHUNK - 1) / SB_V2_CHUNK;
    for (int r = 0; r < SB_V2_B; r++) {
        int32_t o = c->index[SB_V2_B * b + r];
        if (o < 0) continue;
        const uint8_t *rec = sb_v2_block_stream(c, p, b);
        float sc = c->scale ? c->scale[SB_V2_B * b + r] : 1.0f, *y = Y + (size_t)o * ldy + t0;
        for (int ch = 0; ch < nch; ch++) {
            int rest = len - SB_V2_CHUNK * ch, G = rest >= SB_V2_CHUNK ? 16 : (rest + 3) / 4;
            int S = G * (4 - c->n), j0 = p * c->panel + SB_V2_CHUNK * ch;
            uint32_t w[2] = {0, 0};
            for (int k = 0; k < (int)sb_v2_code_bytes(c->n) / (4 * SB_V2_B); k++) memcpy(&w[k], rec + 4 * (SB_V2_B * k + r), 4);
            const uint8_t *v = rec + sb_v2_code_bytes(c->n);
            for (int t = 0; t < T; t++) acc[t] = 0.0f;
            for (int s = 0; s < S; s++) {
                int j = j0 + sb_v2_slot_pos(c->n, w, s);
                if (j >= c->K) continue;
                float wv = sb_v2_value(c->dtype, v, sb_v2_value_at(c->dtype, s, r)) * sc;
                const float *x = a0->cm + (size_t)j * a0->ldc + t0;
                for (int t = 0; t < T; t++) acc[t] += wv * x[t];
            }
            for (int t = 0; t < T; t++) y[t] += acc[t];
            rec += sb_v2_record_bytes(c->n, c->dtype, G);
        }
    }
}

void sb_v2_gemm_ref(const sb_v2_class *c, const sb_v2_act *act, int T, float *Y, int ldy, int b0, int b1) {
    if (act[0].cm) {
        for (int p = 0; p < sb_v2_npanels(c->K, c->panel); p++)
            for (int b = b0; b < b1; b++)
                for (int t0 = 0; t0 < T; t0 += CM_TILE) block_panel_cm(c, &act[0], t0, T - t0 < CM_TILE ? T - t0 : CM_TILE, Y, ldy, p, b);
        return;
    }
    for (int p = 0; p < sb_v2_npanels(c->K, c->panel); p++)
        for (int b = b0; b < b1; b++)
            for (int t = 0; t < T; t++) {
                float out[SB_V2_B];
                block_panel(c, &act[t], p, b, out);
                for (int r = 0; r < SB_V2_B; r++)
                    if (c->index[SB_V2_B * b + r] >= 0) Y[(size_t)c->index[SB_V2_B * b + r] * ldy + t] += out[r];
            }
}
