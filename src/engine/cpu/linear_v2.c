/* The parts of packed format v2 that are no kernel: validating a matrix blob (once, at load, so that
 * the kernels run without a bounds check), preparing activations, reading one dense row. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "linear_v2.h"

/* ---------------------------------------------------------------- activations */

static size_t up64(size_t v) { return sb_v2_up(v, 64); }

size_t sb_v2_act_bytes(int K) {
    size_t m = sb_v2_up((size_t)K, SB_V2_CHUNK), nch = m / SB_V2_CHUNK;
    return up64(m * 4) + up64(m * 2) + up64(nch * 4) + m * 8;
}

void sb_v2_act_bind(sb_v2_act *a, void *mem, int K) {
    size_t m = sb_v2_up((size_t)K, SB_V2_CHUNK), nch = m / SB_V2_CHUNK;
    uint8_t *p = mem;
    a->K = K;
    a->nchunk = (int)nch;
    a->x = (float *)p, p += up64(m * 4);
    a->xq = (int16_t *)p, p += up64(m * 2);
    a->xs = (float *)p, p += up64(nch * 4);
    a->xt = (uint32_t *)p;
    a->cm = NULL, a->ldc = 0;
    memset(mem, 0, sb_v2_act_bytes(K)); /* the padding past K stays zero from here on */
}

sb_v2_act *sb_v2_acts_new(int K, int n) {
    size_t ab = sb_v2_act_bytes(K);
    sb_v2_act *a = malloc(sizeof *a * (size_t)n);
    uint8_t *mem = aligned_alloc(64, ab * (size_t)n);
    if (!a || !mem) {
        free(a), free(mem);
        return NULL;
    }
    for (int t = 0; t < n; t++) sb_v2_act_bind(&a[t], mem + ab * (size_t)t, K);
    return a;
}

void sb_v2_acts_free(sb_v2_act *a) {
    if (a) free(a[0].x); /* the first binding starts at the memory's start */
    free(a);
}

void sb_v2_quantise_ref(sb_v2_act *a) {
    for (int c = 0; c < a->nchunk; c++) {
        const float *xc = a->x + SB_V2_CHUNK * c;
        float m = 0.0f;
        for (int i = 0; i < SB_V2_CHUNK; i++) m = fmaxf(m, fabsf(xc[i]));
        /* 32767 levels: |q| * 127 * 64 stays below 2^31, so a chunk's int32 sum cannot overflow */
        float s = m > 0.0f ? m / 32767.0f : 1.0f, inv = 1.0f / s;
        a->xs[c] = s;
        for (int i = 0; i < SB_V2_CHUNK; i++) {
            long v = lrintf(xc[i] * inv);
            int16_t q = (int16_t)(v > 32767 ? 32767 : v < -32767 ? -32767 : v);
            int j = SB_V2_CHUNK * c + i, g = j / 4;
            a->xq[j] = q;
            a->xt[8 * g + (j & 3)] = (uint16_t)q;
            a->xt[8 * g + 4 + (j & 3)] = (uint32_t)(uint16_t)q << 16;
        }
    }
}

void sb_v2_cm_quantise_ref(const float *X, int ldx, int K, int T, float *Q, int ldq, int ch0, int ch1) {
    for (int ch = ch0; ch < ch1; ch++) {
        int j0 = SB_V2_CHUNK * ch, j1 = j0 + SB_V2_CHUNK < K ? j0 + SB_V2_CHUNK : K;
        for (int t = 0; t < T; t++) {
            float m = 0.0f;
            for (int j = j0; j < j1; j++) m = fmaxf(m, fabsf(X[(size_t)j * ldx + t]));
            float s = m > 0.0f ? m / 32767.0f : 1.0f, inv = 1.0f / s;
            for (int j = j0; j < j1; j++) {
                long v = lrintf(X[(size_t)j * ldx + t] * inv);
                Q[(size_t)j * ldq + t] = (float)(v > 32767 ? 32767 : v < -32767 ? -32767 : v) * s;
            }
        }
    }
}

void sb_v2_cm_quantise(const float *X, int ldx, int K, int T, float *Q, int ldq, int ch0, int ch1) {
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) {
        sb_v2_cm_quantise_avx2(X, ldx, K, T, Q, ldq, ch0, ch1);
        return;
    }
#endif
    sb_v2_cm_quantise_ref(X, ldx, K, T, Q, ldq, ch0, ch1);
}

void sb_v2_act_set(sb_v2_act *a, const float *x, int stride, sb_v2_quantise_fn quantise) {
    if (stride == 1) memcpy(a->x, x, sizeof(float) * (size_t)a->K);
    else
        for (int j = 0; j < a->K; j++) a->x[j] = x[(size_t)j * stride];
    if (quantise) quantise(a);
}

/* ---------------------------------------------------------------- prefetch distance */

size_t sb_v2_prefetch_bytes(void) {
    static size_t pf = (size_t)-1;
    size_t v = __atomic_load_n(&pf, __ATOMIC_RELAXED);
    if (v != (size_t)-1) return v;
    const char *env = getenv("SPARSAMBA_PREFETCH");
    v = 0;
    if (env && *env) {
        long l = strtol(env, NULL, 10);
        v = l > 0 ? (size_t)(l < (1L << 20) ? l : 1L << 20) / 64 * 64 : 0;
    } else {
#if defined(__x86_64__) || defined(_M_X64)
        __builtin_cpu_init();
        v = __builtin_cpu_is("intel") ? 4096 : 0;
#endif
    }
    __atomic_store_n(&pf, v, __ATOMIC_RELAXED); /* racing threads store the same value */
    return v;
}

/* ---------------------------------------------------------------- one dense row */

void sb_v2_row(const sb_v2_class *c, int r, float *out) {
    int b = r / SB_V2_B, l = r % SB_V2_B;
    float s = c->scale ? c->scale[r] : 1.0f;
    for (int p = 0; p < sb_v2_npanels(c->K, c->panel); p++) {
        const uint8_t *rec = sb_v2_block_stream(c, p, b);
        int len = sb_v2_panel_len(c->K, c->panel, p);
        for (int j0 = 0; j0 < len; j0 += SB_V2_CHUNK) {
            int rest = len - j0, G = rest >= SB_V2_CHUNK ? 16 : (rest + 3) / 4;
            for (int t = 0; t < 4 * G && j0 + t < len; t++)
                out[p * c->panel + j0 + t] = sb_v2_value(c->dtype, rec, sb_v2_value_at(c->dtype, t, l)) * s;
            rec += sb_v2_record_bytes(0, c->dtype, G);
        }
    }
}

/* ---------------------------------------------------------------- validation */

static int fail(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

/* the code words of one record: fields past the chunk's slots are 0; n = 2 keeps two distinct
 * positions per group in ascending order (n = 1, 3: every 2-bit value is a position) */
static int check_codes(int n, const uint8_t *rec, int G, int r, int pad, uint32_t *bad) {
    uint32_t w[2] = {0, 0};
    int nw = (int)sb_v2_code_bytes(n) / (4 * SB_V2_B);
    for (int k = 0; k < nw; k++) memcpy(&w[k], rec + 4 * (SB_V2_B * k + r), 4);
    int fields = n == 2 ? 2 * G : G; /* n = 1: one per group (removed), n = 3: one (kept) */
    for (int f = fields; f < 16 * nw; f++)
        if (w[f / 16] >> 2 * (f % 16) & 3) return *bad = (uint32_t)f, 1;
    if (pad) return (w[0] | w[1]) ? (*bad = 0, 3) : 0;
    if (n == 2)
        for (int g = 0; g < G; g++) {
            int a = (int)(w[(2 * g) / 16] >> 2 * ((2 * g) % 16) & 3), b = (int)(w[(2 * g + 1) / 16] >> 2 * ((2 * g + 1) % 16) & 3);
            if (a >= b) return *bad = (uint32_t)g, 2;
        }
    return 0;
}

int sb_v2_check(const void *blob, size_t size, int out, int in, int dtype, sb_v2_matrix *m, char *err, size_t errlen) {
    const uint8_t *b = blob;
    sb_v2_header h;
    memset(m, 0, sizeof *m);
    if ((uintptr_t)b % SB_V2_ALIGN) return fail(err, errlen, "blob is not 64-byte aligned in the file");
    if (size < sizeof h) return fail(err, errlen, "%zu bytes, shorter than the 64-byte matrix header", size);
    memcpy(&h, b, sizeof h);
    if (h.magic != SB_V2_MAGIC) return fail(err, errlen, "bad magic 0x%08x (expected 0x%08x, \"SPV2\")", h.magic, SB_V2_MAGIC);
    if (h.version != SB_V2_VERSION) return fail(err, errlen, "matrix layout version %u, this engine reads %d", h.version, SB_V2_VERSION);
    if (h.dtype != (uint32_t)dtype) return fail(err, errlen, "dtype %u, the file's compile dtype is %d", h.dtype, dtype);
    if (h.out != (uint32_t)out || h.in != (uint32_t)in)
        return fail(err, errlen, "header says (%u, %u), expected (%d, %d)", h.out, h.in, out, in);
    if (h.block != SB_V2_B || h.reserved) return fail(err, errlen, "block %u (expected %d) or reserved field not 0", h.block, SB_V2_B);
    if (h.panel == 0 || h.panel % SB_V2_CHUNK || h.panel > (1u << 20))
        return fail(err, errlen, "panel %u is not a positive multiple of %d", h.panel, SB_V2_CHUNK);
    *m = (sb_v2_matrix){out, in, dtype, 0, {{0}}};
    uint64_t end_prev = 64, rows_total = 0;
    for (int n = 0; n < 4; n++) {
        uint64_t o = h.class_off[n];
        if (!o) continue;
        /* sections in increasing n, back to back from 64: no overlap, nothing hidden between them */
        if (o != end_prev) return fail(err, errlen, "class n=%d at offset %llu, expected %llu", n, (unsigned long long)o, (unsigned long long)end_prev);
        if (o + sizeof(sb_v2_class_header) > size) return fail(err, errlen, "class n=%d header past the end", n);
        sb_v2_class_header ch;
        memcpy(&ch, b + o, sizeof ch);
        if (ch.n != (uint32_t)n) return fail(err, errlen, "class at slot n=%d declares n=%u", n, ch.n);
        if (ch.rows == 0 || ch.rows > (uint32_t)out)
            return fail(err, errlen, "class n=%d declares %u rows (1 to %d)", n, ch.rows, out);
        uint64_t nb = ((uint64_t)ch.rows + SB_V2_B - 1) / SB_V2_B;
        uint64_t sb = sb_v2_stream_bytes(n, dtype, in, (int)h.panel, (int)nb);
        if (ch.nblocks != nb || ch.reserved || ch.pad[0] || ch.pad[1] || ch.off_index != 64 ||
            ch.off_scale != (dtype == SB_V2_I8 ? 64 + 64 * nb : 0) || ch.off_stream != sb_v2_stream_off(dtype, nb) ||
            ch.stream_bytes != sb)
            return fail(err, errlen,
                        "class n=%d: declared counts do not match the class (rows %u, blocks %u, stream %llu bytes; "
                        "expected blocks %llu, stream %llu bytes)",
                        n, ch.rows, ch.nblocks, (unsigned long long)ch.stream_bytes, (unsigned long long)nb,
                        (unsigned long long)sb);
        uint64_t need = ch.off_stream + sb;
        if (o + need > size)
            return fail(err, errlen, "class n=%d needs %llu bytes at offset %llu, the blob has %zu", n,
                        (unsigned long long)need, (unsigned long long)o, size);
        end_prev = o + need;
        rows_total += ch.rows;
        sb_v2_class *c = &m->cls[m->nclass++];
        *c = (sb_v2_class){.n = n, .dtype = dtype, .rows = (int)ch.rows, .K = in, .panel = (int)h.panel,
                           .nblocks = (int)nb, .index = (const int32_t *)(b + o + 64),
                           .scale = dtype == SB_V2_I8 ? (const float *)(b + o + ch.off_scale) : NULL,
                           .stream = b + o + ch.off_stream};
    }
    if (end_prev != size) return fail(err, errlen, "%zu bytes, the classes end at %llu", size, (unsigned long long)end_prev);
    if (rows_total > (uint64_t)out) return fail(err, errlen, "%llu rows in the classes, more than out = %d", (unsigned long long)rows_total, out);
    unsigned char *seen = calloc((size_t)out, 1);
    if (!seen) return fail(err, errlen, "out of memory");
    int rc = 0;
    for (int ci = 0; ci < m->nclass && !rc; ci++) {
        sb_v2_class *c = &m->cls[ci];
        for (int r = 0; r < SB_V2_B * c->nblocks && !rc; r++) {
            int32_t o = c->index[r];
            if (r >= c->rows) {
                if (o != -1) rc = fail(err, errlen, "class n=%d: padding row %d has index %d, not -1", c->n, r, o);
                else if (c->scale && c->scale[r] != 0.0f) rc = fail(err, errlen, "class n=%d: padding row %d has a scale", c->n, r);
                continue;
            }
            if (o < 0 || o >= out || seen[o]) {
                rc = fail(err, errlen, "class n=%d: row %d writes output %d, which is %s", c->n, r, o,
                          (o < 0 || o >= out) ? "out of range" : "already written by another row");
                break;
            }
            seen[o] = 1;
            if (c->scale && !(isfinite(c->scale[r]) && c->scale[r] > 0.0f))
                rc = fail(err, errlen, "class n=%d: row %d has scale %g (not finite and positive)", c->n, r, (double)c->scale[r]);
        }
        if (rc || c->n == 0) continue;
        for (int p = 0; p < sb_v2_npanels(in, c->panel) && !rc; p++) {
            int len = sb_v2_panel_len(in, c->panel, p);
            for (int bl = 0; bl < c->nblocks && !rc; bl++) {
                const uint8_t *rec = sb_v2_block_stream(c, p, bl);
                for (int j0 = 0; j0 < len && !rc; j0 += SB_V2_CHUNK) {
                    int rest = len - j0, G = rest >= SB_V2_CHUNK ? 16 : (rest + 3) / 4;
                    for (int r = 0; r < SB_V2_B && !rc; r++) {
                        uint32_t bad;
                        int row = SB_V2_B * bl + r;
                        int k = check_codes(c->n, rec, G, r, row >= c->rows, &bad);
                        if (k == 1)
                            rc = fail(err, errlen, "class n=%d: row %d, inputs %d..: code field %u past the chunk's %d groups is not 0",
                                      c->n, row, p * c->panel + j0, bad, G);
                        else if (k == 2)
                            rc = fail(err, errlen, "class n=%d: row %d, group %d: the two kept positions are not distinct and ascending",
                                      c->n, row, (p * c->panel + j0) / 4 + (int)bad);
                        else if (k == 3)
                            rc = fail(err, errlen, "class n=%d: padding row %d has codes", c->n, row);
                    }
                    rec += sb_v2_record_bytes(c->n, c->dtype, G);
                }
            }
        }
    }
    free(seen);
    return rc;
}
