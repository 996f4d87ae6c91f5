/* Threads: the count (OpenMP's, process-wide) and the one way a matrix product is split over them —
 * by whole blocks of 16 rows: decode by bytes over all classes (vec_team), prefill each class's blocks
 * evenly. Classes write disjoint outputs, so no thread waits for another between classes. The forward opens one parallel region per token (decode) or per prefill
 * chunk and calls these from every thread of it (orphaned worksharing); a caller outside a region
 * (the profiler) gets one opened here. A build without OpenMP runs the same loops on one thread. */
#ifdef _OPENMP
#include <omp.h>
#endif

#include <stdlib.h>
#include <string.h>

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

int sb_team_size(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

int sb_thread_id(void) {
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

/* below this many stream bytes a product runs on one thread: a team's barrier costs more than it saves.
 * SPARSAMBA_MIN_SPLIT_BYTES overrides it (read once): the tests split a small model's every product. */
static size_t min_split_bytes(void) {
    static size_t v = (size_t)-1;
    size_t m = __atomic_load_n(&v, __ATOMIC_RELAXED);
    if (m != (size_t)-1) return m;
    const char *env = getenv("SPARSAMBA_MIN_SPLIT_BYTES");
    m = env && *env ? (size_t)strtoull(env, NULL, 10) : (size_t)64 << 10;
    __atomic_store_n(&v, m, __ATOMIC_RELAXED); /* racing threads store the same value */
    return m;
}

/* bytes of one block's stream (every panel): all blocks of a class weigh the same */
static size_t block_bytes(const sb_v2_class *c) {
    size_t b = 0;
    for (int p = 0; p < sb_v2_npanels(c->K, c->panel); p++)
        b += sb_v2_block_panel_bytes(c->n, c->dtype, c->K, c->panel, p);
    return b;
}

/* first block of class c (starting `off` bytes into the product's stream, blocks of bb bytes) whose
 * first byte is at or after byte `at` */
static int first_block_at(const sb_v2_class *c, size_t off, size_t bb, size_t at) {
    if (at <= off) return 0;
    size_t j = (at - off + bb - 1) / bb;
    return j < (size_t)c->nblocks ? (int)j : c->nblocks;
}

/* This thread's blocks [b0[ci], b1[ci]) of each class of a decode product. The classes' blocks in order
 * (n ascending) are one stream of bytes, and each thread takes the blocks that start in its contiguous
 * 1/nt of those bytes: a class of n = 3 costs a quarter of a dense one per block, so an even split of
 * each class's blocks (what this did before) left one thread every class's odd block, and a small
 * layer with a few blocks per class badly unbalanced. A product under the size floor is thread 0's
 * alone, so that what follows it on the same thread needs no wait (forward.c: dt_proj's scan). */
void sb_vec_share(const sb_linear *lin, int *b0, int *b1) {
    int nt = sb_team_size(), id = sb_thread_id();
    const sb_v2_matrix *w = &lin->w;
    if (nt == 1 || lin->bytes < min_split_bytes()) {
        for (int ci = 0; ci < w->nclass; ci++) b0[ci] = 0, b1[ci] = id == 0 ? w->cls[ci].nblocks : 0;
        return;
    }
    size_t bb[4], total = 0;
    for (int ci = 0; ci < w->nclass; ci++) total += (bb[ci] = block_bytes(&w->cls[ci])) * (size_t)w->cls[ci].nblocks;
    /* [lo, hi): this thread's bytes; thread id + 1's lo is this hi */
    size_t lo = total / nt * id + total % nt * id / nt, hi = total / nt * (id + 1) + total % nt * (id + 1) / nt;
    size_t off = 0;
    for (int ci = 0; ci < w->nclass; ci++) { /* a contiguous range of blocks: x's panel stays in L1 */
        const sb_v2_class *c = &w->cls[ci];
        b0[ci] = first_block_at(c, off, bb[ci], lo), b1[ci] = first_block_at(c, off, bb[ci], hi);
        off += bb[ci] * (size_t)c->nblocks;
    }
}

/* Every thread of the team runs this: its share of the product, no wait (classes write disjoint
 * outputs, and so do the threads). The caller syncs before anything reads y. */
void sb_linear_vec_part(const sb_kernels *k, const sb_linear *lin, const sb_v2_act *a, float *y) {
    int b0[4], b1[4];
    sb_vec_share(lin, b0, b1);
    for (int ci = 0; ci < lin->w.nclass; ci++)
        if (b0[ci] < b1[ci]) k->gemv(&lin->w.cls[ci], a, y, b0[ci], b1[ci]);
}

static void vec_team(const sb_kernels *k, const sb_linear *lin, const sb_v2_act *a, float *y) {
    sb_linear_vec_part(k, lin, a, y);
#pragma omp barrier
}

static void mat_team(const sb_kernels *k, const sb_linear *lin, const sb_v2_act *act, int T, float *Y, int ldy) {
    int nt = sb_team_size(), id = sb_thread_id();
    for (int ci = 0; ci < lin->w.nclass; ci++) {
        const sb_v2_class *c = &lin->w.cls[ci];
        int b0 = (int)((long)c->nblocks * id / nt), b1 = (int)((long)c->nblocks * (id + 1) / nt);
        if (b0 < b1) k->gemm(c, act, T, Y, ldy, b0, b1);
    }
#pragma omp barrier
}

void sb_linear_vec(const sb_kernels *k, const sb_linear *lin, const sb_v2_act *a, float *y) {
    if (in_parallel() || lin->bytes < min_split_bytes() || sb_n_threads() == 1) {
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

void sb_thread_slice(int n, int *lo, int *hi) {
    int nt = sb_team_size(), id = sb_thread_id();
    *lo = (int)((long)n * id / nt), *hi = (int)((long)n * (id + 1) / nt);
}

void sb_fill_bias(float *y, const float *bias, int n) {
    if (bias) memcpy(y, bias, sizeof(float) * (size_t)n);
    else memset(y, 0, sizeof(float) * (size_t)n);
}

void sb_fill_bias_slice(float *y, const float *bias, int n) {
    int lo, hi;
    sb_thread_slice(n, &lo, &hi);
    if (hi > lo) sb_fill_bias(y + lo, bias ? bias + lo : NULL, hi - lo);
}
