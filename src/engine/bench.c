/* Timing inside the engine, to keep Python out of the numbers: llama-bench's pp/tg protocol
 * (sb_bench) and the memory read bandwidth that is the decode roofline's denominator (sb_read_bandwidth). */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif

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

/* The read probe: the fastest reading of memory we can write, the ceiling of a decode product. Each
 * thread sums its own contiguous share of the buffer in whole passes, by each reader in turn (read_sum:
 * one stream with the kernels' prefetch; PROBE_STREAMS streams side by side with none; 4 streams with
 * the kernels' prefetch, the pattern of the decode kernels' 4 block streams, which on the Intel Xeon
 * here read up to ~20% faster than both others on some days, so that without it our products read
 * above the probe); a pass is timed by the thread's CPU clock, so that the time the thread spends
 * descheduled on a shared machine (as the products' per-call medians leave out) does not count, while
 * everything the pass did does. A thread's rate is its best pass of any reader; the team's the sum of
 * its threads' rates. */
#define PROBE_STREAMS 8
static const int PROBE_READERS[][2] = {{1, 1}, {PROBE_STREAMS, 0}, {4, 1}}; /* streams, prefetch */

static double thread_cpu(void) {
    struct timespec ts;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)) return now(); /* no thread clock: the wall clock */
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

double sb_read_bandwidth(int64_t bytes, int32_t reps) {
    int nt = sb_n_threads();
    size_t unit = 64 * PROBE_STREAMS, per = (size_t)(bytes / (int64_t)sizeof(float)) / (size_t)nt / unit * unit;
    if (per == 0 || reps <= 0) return -1.0;
    size_t n = per * (size_t)nt;
    float *buf = aligned_alloc(64, n * sizeof(float));
    double *rate = malloc(sizeof(double) * (size_t)nt);
    if (!buf || !rate) {
        free(buf), free(rate);
        return -1.0;
    }
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) buf[i] = (float)(i & 255); /* first touch by the reading thread */
    volatile float sink = 0.0f;
    const sb_kernels *k = sb_active_kernels();
    for (int t = 0; t < nt; t++) rate[t] = 0.0; /* a thread the runtime did not start adds nothing */
    for (int r = 0; r < reps; r++)
        for (size_t pr = 0; pr < sizeof PROBE_READERS / sizeof *PROBE_READERS; pr++) {
            int streams = PROBE_READERS[pr][0], prefetch = PROBE_READERS[pr][1];
#pragma omp parallel num_threads(nt)
            {
                int id = 0, team = 1;
#ifdef _OPENMP
                id = omp_get_thread_num(), team = omp_get_num_threads();
#endif
                if (team == nt) {
                    double t0 = thread_cpu();
                    float total = k->read_sum(buf + (size_t)id * per, per, streams, prefetch);
                    double dt = thread_cpu() - t0, v = dt > 0 ? per * sizeof(float) / dt : 0.0;
                    sink = total;
                    if (v > rate[id]) rate[id] = v;
                }
            }
        }
    (void)sink;
    double sum = 0.0;
    for (int t = 0; t < nt; t++) sum += rate[t];
    free(buf), free(rate);
    return sum;
}
