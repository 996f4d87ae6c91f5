/* Latency profiling: what a decode step's matrix-vector products cost on this machine, measured
 * with the kernels and the thread count the engine runs, for the latency tables that a latency
 * target learns against (docs/DESIGN.md §4, sparsamba/runtime/profile.py).
 *
 * Decode reads every weight once per token, and a model of any useful size is larger than the last
 * level cache, so weights arrive from DRAM. A profile that timed one small matrix over and over
 * would time the cache instead. So both entry points keep the weights cold:
 *  - sb_profile_linear lays out enough copies of its synthetic class (a packed-format-v2 matrix blob
 *    of one n-class, as the compiler writes it) to fill a working set of
 *    max(64 MiB, 2 x the LLC one core uses; at most 512 MiB) and times each call on the next copy,
 *    round robin: by the time a copy comes round again, the whole working set has been read since;
 *  - sb_profile_model reads (sums) a buffer of that size before every pass over the model, so each
 *    pass starts with the model's matrices out of cache, as they are for a model larger than the LLC.
 * Times are per call (clock_gettime around the activation preparation and sb_linear_vec, OpenMP fork
 * and join included), and the
 * median over repetitions is returned: a shared machine's interruptions land in the tail. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine.h"
#include "mamba2.h"

#define MIN_WORKING_SET ((size_t)64 << 20)
#define MAX_WORKING_SET ((size_t)512 << 20)

double sb_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* The last-level cache one core can use: Linux's sysfs (per core: on an AMD EPYC the L3 of the
 * core's complex, where sysconf reports the whole socket's, 8x more), else sysconf, else 0. */
static size_t llc_bytes(void) {
    size_t best = 0;
    for (int i = 0; i < 8; i++) {
        char path[96], buf[32];
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", i);
        FILE *f = fopen(path, "r");
        if (!f) break;
        size_t v = 0;
        if (fgets(buf, sizeof buf, f)) {
            char *end;
            v = strtoull(buf, &end, 10);
            v <<= *end == 'K' ? 10 : *end == 'M' ? 20 : 0;
        }
        fclose(f);
        if (v > best) best = v;
    }
#ifdef _SC_LEVEL3_CACHE_SIZE
    if (!best) {
        long v = sysconf(_SC_LEVEL3_CACHE_SIZE); /* 0 or -1 where the OS does not say (VMs, Android) */
        if (v > 0) best = (size_t)v;
    }
#endif
    return best;
}

size_t sb_profile_working_set(void) {
    static size_t ws;
    if (!ws) {
        size_t llc = llc_bytes();
        ws = 2 * llc > MIN_WORKING_SET ? 2 * llc : MIN_WORKING_SET;
        if (ws > MAX_WORKING_SET) ws = MAX_WORKING_SET;
    }
    return ws;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static uint64_t next_u64(uint64_t *s) { /* xorshift64* */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545F4914F6CDD1DULL;
}

static size_t up64(size_t n) { return (n + 63) / 64 * 64; }

/* One buffer for all profiles, kept until sb_profile_release: faulting in 64 MiB afresh for every
 * entry costs more than the timing itself (half a second in a VM). Not thread-safe. */
static uint8_t *g_arena;
static size_t g_arena_size;

static uint8_t *arena(size_t bytes) {
    if (bytes > g_arena_size) {
        free(g_arena);
        bytes = (bytes + ((size_t)1 << 20) - 1) >> 20 << 20;
        g_arena = aligned_alloc(64, bytes);
        g_arena_size = g_arena ? bytes : 0;
    }
    return g_arena;
}

void sb_profile_release(void) {
    free(g_arena);
    g_arena = NULL;
    g_arena_size = 0;
}

/* ---------------------------------------------------------------- one synthetic class */

/* a random value of the dtype at v (f16: sign, exponent 10..14, any mantissa: |w| in [2^-5, 1)) */
static void random_value(uint8_t *v, int dt, uint64_t *s) {
    uint64_t u = next_u64(s);
    if (dt == SB_V2_F32) {
        float f = (float)(u >> 40) / (float)(1 << 24) * 2.0f - 1.0f;
        memcpy(v, &f, 4);
    } else if (dt == SB_V2_F16) {
        uint16_t h = (uint16_t)(((u >> 63) << 15) | ((10 + (u >> 32) % 5) << 10) | (u & 0x3ff));
        memcpy(v, &h, 2);
    } else {
        *v = (uint8_t)(int8_t)((int)(u % 255) - 127);
    }
}

/* A matrix blob (docs/packed-format.md) of one class: `out` rows removing n of every 4 inputs, random
 * values and random valid codes, rows in order; b holds 64 + sb_v2_class_bytes(...) bytes. */
static void synthetic_blob(uint8_t *b, int out, int in, int n, int dt, uint64_t *s) {
    int P = sb_v2_default_panel(in), nb = (out + SB_V2_B - 1) / SB_V2_B, es = sb_v2_esize(dt);
    size_t off_stream = sb_v2_stream_off(dt, (size_t)nb), sbytes = sb_v2_stream_bytes(n, dt, in, P, nb);
    memset(b, 0, 64 + off_stream + sbytes);
    sb_v2_header h = {SB_V2_MAGIC, SB_V2_VERSION, (uint32_t)dt, (uint32_t)out, (uint32_t)in, (uint32_t)P, SB_V2_B, 0,
                      {0, 0, 0, 0}};
    h.class_off[n] = 64;
    sb_v2_class_header ch = {(uint32_t)n, (uint32_t)out, (uint32_t)nb, 0, 64,
                             dt == SB_V2_I8 ? 64 + 64 * (uint64_t)nb : 0, off_stream, sbytes, {0, 0}};
    memcpy(b, &h, sizeof h);
    uint8_t *c = b + 64;
    memcpy(c, &ch, sizeof ch);
    for (int r = 0; r < SB_V2_B * nb; r++) {
        int32_t o = r < out ? r : -1;
        memcpy(c + 64 + 4 * r, &o, 4);
        if (dt == SB_V2_I8 && r < out) {
            float sc = 1.0f / 127.0f;
            memcpy(c + ch.off_scale + 4 * r, &sc, 4);
        }
    }
    static const uint8_t pairs[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};
    uint8_t *rec = c + off_stream;
    for (int p = 0; p < sb_v2_npanels(in, P); p++)
        for (int bl = 0; bl < nb; bl++)
            for (int j0 = 0; j0 < sb_v2_panel_len(in, P, p); j0 += SB_V2_CHUNK) {
                int rest = sb_v2_panel_len(in, P, p) - j0, G = rest >= SB_V2_CHUNK ? 16 : (rest + 3) / 4;
                uint8_t *v = rec + sb_v2_code_bytes(n);
                for (int r = 0; r < SB_V2_B && SB_V2_B * bl + r < out; r++) {
                    uint32_t w[2] = {0, 0};
                    for (int g = 0; n && g < G; g++) {
                        uint64_t u = next_u64(s);
                        if (n == 2) {
                            for (int k = 0; k < 2; k++) w[(2 * g + k) / 16] |= (uint32_t)pairs[u % 6][k] << 2 * ((2 * g + k) % 16);
                        } else {
                            w[0] |= (uint32_t)(u & 3) << 2 * g;
                        }
                    }
                    for (size_t k = 0; k < sb_v2_code_bytes(n) / (4 * SB_V2_B); k++) memcpy(rec + 4 * (SB_V2_B * k + r), &w[k], 4);
                    for (int t = 0; t < G * (4 - n); t++) random_value(v + es * sb_v2_value_at(dt, t, r), dt, s);
                }
                rec += sb_v2_record_bytes(n, dt, G);
            }
}

int sb_profile_linear(int32_t out, int32_t in, int32_t n, int32_t dtype, int32_t reps, double *seconds, char *err,
                      size_t errlen) {
    if (out <= 0 || in <= 0 || out > (1 << 24) || in > (1 << 24)) {
        snprintf(err, errlen, "layer shape (%d, %d) is not valid: out and in must be in 1..%d", out, in, 1 << 24);
        return SB_ERR_ARG;
    }
    if (n < 0 || n > 3) {
        snprintf(err, errlen, "n = %d is not 0..3 (weights removed per group of 4; a row at n = 4 is not read)", n);
        return SB_ERR_ARG;
    }
    if (dtype != GG_F32 && dtype != GG_F16 && dtype != GG_I8) {
        snprintf(err, errlen, "dtype %d is not 0 (f32), 1 (f16) or 24 (int8)", dtype);
        return SB_ERR_ARG;
    }
    if (reps <= 0 || !seconds) {
        snprintf(err, errlen, "reps must be positive and seconds non-NULL (got reps %d)", reps);
        return SB_ERR_ARG;
    }
    int dt = dtype == GG_F32 ? SB_V2_F32 : dtype == GG_F16 ? SB_V2_F16 : SB_V2_I8;
    /* one copy: the blob, as a packed file stores it */
    size_t copy = up64(64 + sb_v2_class_bytes(n, dt, in, sb_v2_default_panel(in), out)), ws = sb_profile_working_set();
    size_t ncopy = (ws + copy - 1) / copy;
    if (ncopy < 2) ncopy = 2;
    uint8_t *buf = arena(ncopy * copy);
    float *x = calloc((size_t)in, sizeof(float)), *y = calloc((size_t)out, sizeof(float));
    double *t = malloc(sizeof(double) * (size_t)reps);
    sb_v2_act a;
    void *amem = aligned_alloc(64, sb_v2_act_bytes(in));
    if (!buf || !x || !y || !t || !amem) {
        free(x), free(y), free(t), free(amem);
        snprintf(err, errlen, "out of memory: %zu copies of a (%d, %d) class need %zu MiB", ncopy, out, in,
                 (ncopy * copy) >> 20);
        return SB_ERR_NOMEM;
    }
    sb_v2_act_bind(&a, amem, in);
    uint64_t s = 0x9E3779B97F4A7C15ULL ^ ((uint64_t)out << 32) ^ (uint64_t)in ^ ((uint64_t)n << 60);
    synthetic_blob(buf, out, in, n, dt, &s);
    sb_linear lin = {out, in, {0}, NULL, copy};
    if (sb_v2_check(buf, 64 + sb_v2_class_bytes(n, dt, in, sb_v2_default_panel(in), out), out, in, dt, &lin.w, err,
                    errlen)) {
        free(x), free(y), free(t), free(amem);
        return SB_ERR_FORMAT; /* a bug here: the synthetic blob is not what the loader accepts */
    }
    for (size_t c = 1; c < ncopy; c++) memcpy(buf + c * copy, buf, copy);
    for (int j = 0; j < in; j++) x[j] = (float)(next_u64(&s) >> 40) / (float)(1 << 24) - 0.5f;

    const sb_kernels *k = sb_active_kernels();
    sb_v2_class c0 = lin.w.cls[0];
    size_t at = 0;
    int warm = reps / 10 + 2;
    for (int i = -warm; i < reps; i++) {
        size_t delta = at * copy; /* the same views, into the next copy */
        at = at + 1 == ncopy ? 0 : at + 1;
        lin.w.cls[0].index = (const int32_t *)((const uint8_t *)c0.index + delta);
        lin.w.cls[0].scale = c0.scale ? (const float *)((const uint8_t *)c0.scale + delta) : NULL;
        lin.w.cls[0].stream = c0.stream + delta;
        double t0 = sb_now();
        sb_v2_act_set(&a, x, 1, dt == SB_V2_I8 ? k->quantise : NULL); /* every product prepares its activations */
        sb_linear_vec(k, &lin, &a, y);
        double dt_s = sb_now() - t0;
        if (i >= 0) t[i] = dt_s;
    }
    *seconds = median(t, reps);
    free(x), free(y), free(t), free(amem);
    return SB_OK;
}

/* ---------------------------------------------------------------- a loaded model's prunable layers */

int sb_profile_model(const sb_model *m, int32_t reps, double *seconds, char *err, size_t errlen) {
    if (!m || reps <= 0 || !seconds) {
        snprintf(err, errlen, "a model, a positive reps and a seconds buffer are needed (got reps %d)", reps);
        return SB_ERR_ARG;
    }
    if (m->m2) {
        snprintf(err, errlen, "profiling a model's layers is for Mamba-1 models; this is a Mamba-2 (sparsamba.mamba2)");
        return SB_ERR_ARG;
    }
    const sb_info *I = &m->info;
    int L = I->n_layer, widest = 2 * I->d_inner;
    if (I->d_model > widest) widest = I->d_model;
    size_t ws = sb_profile_working_set(), nf = ws / sizeof(float) / 128 * 128;
    float *flush = (float *)arena(nf * sizeof(float));
    float *x = calloc((size_t)widest + 64, sizeof(float)), *y = calloc((size_t)widest + 64, sizeof(float));
    double *t = malloc(sizeof(double) * (size_t)reps * 4 * L);
    void *amem = aligned_alloc(64, sb_v2_act_bytes(widest));
    if (!flush || !x || !y || !t || !amem) {
        free(x), free(y), free(t), free(amem);
        snprintf(err, errlen, "out of memory allocating the %zu MiB flush buffer", ws >> 20);
        return SB_ERR_NOMEM;
    }
    for (size_t i = 0; i < nf; i++) flush[i] = (float)(i & 255);
    uint64_t s = 12345;
    const sb_kernels *k = sb_active_kernels();
    volatile float sink = 0.0f;
    int warm = reps / 10 + 2;
    for (int r = -warm; r < reps; r++) {
        sink = k->read_sum(flush, nf, 1, 1);
        for (int i = 0; i < L; i++) {
            const sb_layer *ly = &m->layers[i];
            const sb_linear *lin[4] = {&ly->in, &ly->x, &ly->dt, &ly->out};
            for (int j = 0; j < 4; j++) {
                memset(x, 0, sizeof(float) * ((size_t)widest + 64));
                for (int c = 0; c < lin[j]->in; c++) x[c] = (float)(next_u64(&s) >> 40) / (float)(1 << 24) - 0.5f;
                memset(y, 0, sizeof(float) * (size_t)lin[j]->out);
                sb_v2_act a;
                sb_v2_act_bind(&a, amem, lin[j]->in);
                double t0 = sb_now();
                sb_v2_act_set(&a, x, 1, I->dtype == GG_I8 ? k->quantise : NULL);
                sb_linear_vec(k, lin[j], &a, y);
                double dt = sb_now() - t0;
                if (r >= 0) t[((size_t)(4 * i + j)) * reps + r] = dt;
            }
        }
    }
    (void)sink;
    for (int l = 0; l < 4 * L; l++) seconds[l] = median(t + (size_t)l * reps, reps);
    free(x), free(y), free(t), free(amem);
    return SB_OK;
}

/* ---------------------------------------------------------------- a decode step, stage by stage */

static double g_stage_t;

void sb_stage_mark(double *st, int stage) {
    double t = sb_now();
    if (stage < SB_NSTAGE) st[stage] += t - g_stage_t;
    g_stage_t = t;
}

int sb_profile_decode(const sb_model *m, int32_t n_tokens, double *seconds, double *bytes, double *total, char *err,
                      size_t errlen) {
    if (!m || n_tokens <= 0 || !seconds || !bytes || !total) {
        snprintf(err, errlen, "a model, a positive n_tokens and output buffers are needed (got n_tokens %d)", n_tokens);
        return SB_ERR_ARG;
    }
    const sb_info *I = &m->info;
    size_t ns = (size_t)(I->n_layer + 1) * SB_NSTAGE;
    sb_state *s;
    int rc = sb_state_new(m, &s, err, errlen);
    if (rc) return rc;
    float *logits = malloc(sizeof(float) * (size_t)I->vocab_size);
    if (!logits) {
        sb_state_free(s);
        snprintf(err, errlen, "out of memory");
        return SB_ERR_NOMEM;
    }
    int32_t tok[4] = {1, 2, 3, 4};
    for (int i = 0; i < 4; i++) tok[i] %= I->vocab_size;
    rc = sb_forward(m, s, tok, 4, logits, 1, err, errlen); /* a short prompt; then one untimed step */
    if (!rc) rc = sb_forward(m, s, tok, 1, logits, 1, err, errlen);
    memset(seconds, 0, sizeof(double) * ns);
    double t0 = sb_now();
    sb_decode_stages = seconds;
    for (int g = 0; g < n_tokens && !rc; g++) {
        int32_t next = (int32_t)((g * 104729L + 3) % I->vocab_size); /* fixed tokens, as sb_bench */
        rc = sb_forward(m, s, &next, 1, logits, 1, err, errlen);
    }
    sb_decode_stages = NULL;
    *total = (sb_now() - t0) / n_tokens;
    for (size_t i = 0; i < ns; i++) seconds[i] /= n_tokens;
    memset(bytes, 0, sizeof(double) * ns);
    for (int i = 0; i < I->n_layer; i++) {
        double *b = bytes + (size_t)i * SB_NSTAGE;
        if (m->m2) { /* Mamba-2: two products (no x_proj, dt_proj) */
            b[SB_ST_IN] = (double)m->m2->layers[i].in.bytes, b[SB_ST_OUT] = (double)m->m2->layers[i].out.bytes;
            continue;
        }
        const sb_layer *ly = &m->layers[i];
        b[SB_ST_IN] = (double)ly->in.bytes, b[SB_ST_X] = (double)ly->x.bytes;
        b[SB_ST_DT] = (double)ly->dt.bytes, b[SB_ST_OUT] = (double)ly->out.bytes;
    }
    bytes[(size_t)I->n_layer * SB_NSTAGE + SB_ST_HEAD] = (double)m->head.bytes;
    free(logits);
    sb_state_free(s);
    return rc;
}
