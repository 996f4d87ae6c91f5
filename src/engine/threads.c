/* Threads: the count (OpenMP's, process-wide) and the one way a matrix product is split over them —
 * by blocks of rows of each class. Classes write disjoint outputs, so no thread waits for another
 * between classes. A build without OpenMP runs the same loops on one thread. */
#ifdef _OPENMP
#include <omp.h>
#endif

#include "engine.h"

int32_t sb_set_threads(int32_t n) {
#ifdef _OPENMP
    if (n <= 0) n = omp_get_num_procs();
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

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

void sb_linear_vec(const sb_kernels *k, const sb_linear *lin, const float *x, float *y) {
    long work = 0;
    for (int ci = 0; ci < lin->nclass; ci++) work += (long)lin->cls[ci].rows * lin->cls[ci].len;
    (void)work; /* read only by the pragma, which a build without OpenMP ignores */
#pragma omp parallel if (work > 16384)
    for (int ci = 0; ci < lin->nclass; ci++) {
        const sb_class *c = &lin->cls[ci];
        int nb = (c->rows + 15) / 16;
#pragma omp for schedule(static) nowait
        for (int b = 0; b < nb; b++) k->gemv(c, x, y, b * 16, b * 16 + 16 < c->rows ? b * 16 + 16 : c->rows);
    }
}

void sb_linear_mat(const sb_kernels *k, const sb_linear *lin, const float *X, int ldx, int T, float *Y, void *scr,
                   size_t scr_size) {
#pragma omp parallel
    {
        void *mine = (char *)scr + scr_size * (size_t)thread_id();
        for (int ci = 0; ci < lin->nclass; ci++) {
            const sb_class *c = &lin->cls[ci];
            int nb = (c->rows + SB_GEMM_ROWS - 1) / SB_GEMM_ROWS;
#pragma omp for schedule(static) nowait
            for (int b = 0; b < nb; b++) {
                int r0 = b * SB_GEMM_ROWS, r1 = r0 + SB_GEMM_ROWS < c->rows ? r0 + SB_GEMM_ROWS : c->rows;
                k->gemm(c, X, ldx, T, Y, ldx, r0, r1, mine);
            }
        }
    }
}
