/* Timing inside the engine, to keep Python out of the numbers: llama-bench's pp/tg protocol
 * (sb_bench) and the memory read bandwidth that is the decode roofline's denominator (sb_read_bandwidth). */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "engine.h"

/* ---------------------------------------------------------------- bench */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int sb_bench(const sb_model *m, int32_t n_prompt, int32_t n_gen, int32_t reps, double *pp_ts, double *tg_ts,
             char *err, size_t errlen) {
    if (n_prompt <= 0 || n_gen <= 0 || reps <= 0) {
        snprintf(err, errlen, "n_prompt, n_gen and reps must be positive (got %d, %d, %d)", n_prompt, n_gen, reps);
        return SB_ERR_ARG;
    }
    sb_state *s;
    int rc = sb_state_new(m, &s, err, errlen);
    if (rc) return rc;
    int V = m->info.vocab_size;
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)n_prompt);
    float *logits = malloc(sizeof(float) * (size_t)V);
    if (!tok || !logits) {
        rc = SB_ERR_NOMEM;
        snprintf(err, errlen, "out of memory");
        goto done;
    }
    for (int t = 0; t < n_prompt; t++) tok[t] = (int32_t)((t * 7919L + 1) % V);
    for (int r = -1; r < reps; r++) { /* r = -1: the warm-up run, as llama-bench does */
        sb_state_reset(s);
        double t0 = now();
        if ((rc = sb_forward(m, s, tok, n_prompt, logits, 1, err, errlen))) goto done;
        double t1 = now();
        for (int g = 0; g < n_gen; g++) {
            int32_t next = (int32_t)((g * 104729L + 3) % V); /* fixed tokens: no sampling in the timing */
            if ((rc = sb_forward(m, s, &next, 1, logits, 1, err, errlen))) goto done;
        }
        double t2 = now();
        if (r >= 0) {
            pp_ts[r] = n_prompt / (t1 - t0);
            tg_ts[r] = n_gen / (t2 - t1);
        }
    }
done:
    free(tok);
    free(logits);
    sb_state_free(s);
    return rc;
}

/* ---------------------------------------------------------------- roofline */

double sb_read_bandwidth(int64_t bytes, int32_t reps) {
    size_t n = (size_t)(bytes / (int64_t)sizeof(float)) / 64 * 64;
    if (n == 0 || reps <= 0) return -1.0;
    float *buf = aligned_alloc(64, n * sizeof(float));
    if (!buf) return -1.0;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) buf[i] = (float)(i & 255); /* first touch by the reading thread */
    double best = 0.0;
    volatile float sink = 0.0f;
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        float total = 0.0f;
        const sb_kernels *k = sb_active_kernels();
        size_t chunks = (size_t)sb_n_threads() * 16, per = (n / chunks) / 64 * 64;
#pragma omp parallel for schedule(static) reduction(+ : total)
        for (size_t c = 0; c < chunks; c++) {
            size_t lo = c * per, len = c + 1 == chunks ? n - lo : per;
            total += k->read_sum(buf + lo, len);
        }
        double dt = now() - t0;
        sink = total;
        if (n * sizeof(float) / dt > best) best = n * sizeof(float) / dt;
    }
    (void)sink;
    free(buf);
    return best;
}
