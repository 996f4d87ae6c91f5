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

/* Each thread sums its own contiguous share of the buffer in segments of SEG bytes and times every
 * segment; its rate is the median segment's, and the team's the sum of its threads' rates. A pass
 * timed whole would count the time the thread spent descheduled: on a shared machine that is most
 * of the difference between a long sweep and a product's per-call median (profile.c), which is
 * what the probe is compared with. */
#define SEG ((size_t)1 << 20)

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double sb_read_bandwidth(int64_t bytes, int32_t reps) {
    size_t n = (size_t)(bytes / (int64_t)sizeof(float)) / 128 * 128;
    if (n == 0 || reps <= 0) return -1.0;
    float *buf = aligned_alloc(64, n * sizeof(float));
    int nt = sb_n_threads();
    size_t per = (n / (size_t)nt) / 128 * 128, segf = SEG / sizeof(float), nseg = per / segf + 1;
    double *rate = malloc(sizeof(double) * (size_t)nt), *seg = malloc(sizeof(double) * nseg * (size_t)nt);
    if (!buf || !rate || !seg) {
        free(buf), free(rate), free(seg);
        return -1.0;
    }
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) buf[i] = (float)(i & 255); /* first touch by the reading thread */
    double best = 0.0;
    volatile float sink = 0.0f;
    const sb_kernels *k = sb_active_kernels();
    for (int r = 0; r < reps; r++) {
        for (int t = 0; t < nt; t++) rate[t] = 0.0; /* a thread the runtime did not start adds nothing */
#pragma omp parallel num_threads(nt)
        {
            int id = 0, team = 1;
#ifdef _OPENMP
            id = omp_get_thread_num(), team = omp_get_num_threads();
#endif
            if (team == nt) {
                size_t lo = (size_t)id * per, len = id + 1 == nt ? n - lo : per, m = 0;
                double *ts = seg + nseg * (size_t)id;
                float total = 0.0f;
                for (size_t o = 0; o < len; o += segf, m++) {
                    size_t l = len - o < segf ? len - o : segf;
                    double t0 = now();
                    total += k->read_sum(buf + lo + o, l);
                    ts[m] = l * sizeof(float) / (now() - t0);
                }
                sink = total;
                qsort(ts, m, sizeof *ts, cmp_d);
                rate[id] = m ? ts[m / 2] : 0.0;
            }
        }
        double sum = 0.0;
        for (int t = 0; t < nt; t++) sum += rate[t];
        if (sum > best) best = sum;
    }
    (void)sink;
    free(buf), free(rate), free(seg);
    return best;
}
