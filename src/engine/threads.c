/* Threads: the count (OpenMP's, process-wide) and the one way a matrix product is split over them —
 * by whole blocks of 16 rows of each class. Classes write disjoint outputs, so no thread waits for
 * another between classes. The forward opens one parallel region per token (decode) or per prefill
 * chunk and calls these from every thread of it (orphaned worksharing); a caller outside a region
 * (the profiler) gets one opened here. A build without OpenMP runs the same loops on one thread. */
#ifdef _OPENMP
#include <omp.h>
#endif

#include "engine.h"

int32_t sb_set_threads(int32_t n) {
#ifdef _OPENMP
    int procs = omp_get_num_procs();
    if (n <= 0) n = procs;
    if (n > 4 * procs) n = 4 * procs;
    if (n > SB_MAX_THREADS) n = SB_MAX_THREADS;
    omp_set_num_threads(n);
    return n;
#else
    (void)n;
    return 1;
#endif
}

int sb_n_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static int team_size(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static int in_parallel(void) {
#ifdef _OPENMP
    return omp_in_parallel();
#else
    return 0;
#endif
}

/* below this many stream bytes a product runs on one thread: a team's barrier costs more than it saves */
#define MIN_SPLIT_BYTES (64 << 10)

/* Every thread of the team runs this: each class's blocks split evenly, whole blocks of 16 rows,
 * no wait between classes (they write disjoint outputs), one barrier at the end. */
static void vec_team(const sb_kernels *k, const sb_linear *lin, const sb_v2_act *a, float *y) {
    if (lin->bytes < MIN_SPLIT_BYTES) {
#pragma omp single
        for (int ci = 0; ci < lin->w.nclass; ci++) k->gemv(&lin->w.cls[ci], a, y, 0, lin->w.cls[ci].nblocks);
        return; /* single ends in a barrier */
    }
    int nt = team_size(), id = thread_id();
    for (int ci = 0; ci < lin->w.nclass; ci++) { /* a contiguous range of blocks: x's panel stays in L1 */
        const sb_v2_class *c = &lin->w.cls[ci];
        int b0 = (int)((long)c->nblocks * id / nt), b1 = (int)((long)c->nblocks * (id + 1) / nt);
        if (b0 < b1) k->gemv(c, a, y, b0, b1);
    }
#pragma omp barrier
}

static void mat_team(const sb_kernels *k, const sb_linear *lin, const sb_v2_act *act, int T, float *Y, int ldy) {
    int nt = team_size(), id = thread_id();
    for (int ci = 0; ci < lin->w.nclass; ci++) {
        const sb_v2_class *c = &lin->w.cls[ci];
        int b0 = (int)((long)c->nblocks * id / nt), b1 = (int)((long)c->nblocks * (id + 1) / nt);
        if (b0 < b1) k->gemm(c, act, T, Y, ldy, b0, b1);
    }
#pragma omp barrier
}

void sb_linear_vec(const sb_kernels *k, const sb_linear *lin, const sb_v2_act *a, float *y) {
    if (in_parallel() || lin->bytes < MIN_SPLIT_BYTES || sb_n_threads() == 1) {
        vec_team(k, lin, a, y);
        return;
    }
#pragma omp parallel
    vec_team(k, lin, a, y);
}

void sb_linear_mat(const sb_kernels *k, const sb_linear *lin, const sb_v2_act *act, int T, float *Y, int ldy) {
    if (in_parallel() || sb_n_threads() == 1) {
        mat_team(k, lin, act, T, Y, ldy);
        return;
    }
#pragma omp parallel
    mat_team(k, lin, act, T, Y, ldy);
}
