/* Every kernel of one family against the scalar reference (sb_kernels_ref) and against this file's own
 * unpacking of the packed format in double precision: gemv and gemm of every class n = 0..3 (and the
 * dense `.weight` layout) in f32, f16 and int8, on odd shapes (inputs not a multiple of 4, rows not a
 * multiple of the kernels' blocks, 1 to 37 tokens), with random row indices and codes; then silu,
 * softplus, mul_silu, scan_step and read_sum on odd lengths.
 *
 *   sparsamba-test-kernels FAMILY     FAMILY: scalar, avx2, neon, neon-fp16
 *
 * Exit 0: every check within its bound; 1: a check failed (each failure printed with its error and
 * bound); 77: this build or this CPU has no such family (the reason printed, "SKIP family: ...").
 * Built by CMakeLists.txt (target sparsamba-test-kernels) and run by tests/test_kernels.py. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static uint64_t next_u64(void) { /* splitmix64 */
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static float uniform(float lo, float hi) { return lo + (hi - lo) * (float)(next_u64() >> 40) / (float)(1 << 24); }
static int below(int n) { return (int)(next_u64() % (uint64_t)n); }

static const sb_kernels *K;  /* the family under test */
static double g_tol_f16_gemv; /* neon-fp16 multiplies f16 rows in fp16 */
static int g_checks, g_failures;
static double g_worst; /* the largest error / bound seen */

/* one comparison: |got - want| <= tol * scale; the worst ratio kept, failures printed */
static void check(const char *what, double got, double want, double tol, double scale) {
    double err = fabs(got - want), bound = tol * scale;
    g_checks++;
    if (bound > 0 && err / bound > g_worst) g_worst = err / bound;
    if (!(err <= bound)) {
        if (g_failures++ < 20)
            printf("FAIL %s %s: got %.9g, want %.9g, |err| %.3g > bound %.3g\n", K->name, what, got, want, err, bound);
    }
}

static int pad16(int n) { return (n + 15) / 16 * 16 + 16; }

/* ---------------------------------------------------------------- a random class */

typedef struct {
    sb_class c;
    int out, in;
    uint8_t *values, *codes;
    int32_t *idx;
    float *scale;
    double *dense; /* (rows, 4 * G): the class unpacked here, row scale included */
} test_class;

/* rows of (out, in) removing n of every 4 weights; dense: the `.weight` layout (len = in, no codes,
 * no row indices), else a packed class (len = G * (4 - n), row indices into out) */
static test_class make_class(int n, int dtype, int rows, int in, int dense) {
    test_class t = {0};
    int G = (in + 3) / 4, cb = (G + 1) / 2, len = dense ? in : G * (4 - n);
    int ts = dtype == GG_F32 ? 4 : dtype == GG_F16 ? 2 : 1;
    t.out = dense ? rows : rows + 3;
    t.in = in;
    /* exactly the bytes of the values: a kernel reading past them is caught by the sanitizers */
    t.values = malloc((size_t)rows * len * ts);
    t.dense = calloc((size_t)rows * 4 * G, sizeof(double));
    if (n) {
        t.codes = calloc((size_t)rows * cb, 1);
        for (int r = 0; r < rows; r++)
            for (int g = 0; g < G; g++) {
                int mask;
                do mask = below(16);
                while (__builtin_popcount((unsigned)mask) != 4 - n);
                t.codes[(size_t)r * cb + g / 2] |= (uint8_t)(mask << (g & 1) * 4);
            }
    }
    if (!dense) {
        int *perm = malloc(sizeof(int) * (size_t)t.out);
        for (int o = 0; o < t.out; o++) perm[o] = o;
        for (int o = t.out - 1; o > 0; o--) {
            int j = below(o + 1), tmp = perm[o];
            perm[o] = perm[j], perm[j] = tmp;
        }
        t.idx = malloc(sizeof(int32_t) * (size_t)rows);
        for (int r = 0; r < rows; r++) t.idx[r] = perm[r];
        free(perm);
    }
    if (dtype == GG_I8) {
        t.scale = malloc(sizeof(float) * (size_t)rows);
        for (int r = 0; r < rows; r++) t.scale[r] = uniform(0.001f, 0.02f);
    }
    for (size_t k = 0; k < (size_t)rows * len; k++) {
        if (dtype == GG_F32) {
            float v = uniform(-1.0f, 1.0f);
            memcpy(t.values + 4 * k, &v, 4);
        } else if (dtype == GG_F16) { /* sign, exponent 2^-6 .. 2^0, any mantissa; sometimes zero */
            uint16_t h = below(16) ? (uint16_t)(below(2) << 15 | (9 + below(7)) << 10 | below(1024)) : 0;
            memcpy(t.values + 2 * k, &h, 2);
        } else {
            t.values[k] = (uint8_t)(int8_t)(below(255) - 127);
        }
    }
    t.c = (sb_class){n, rows, len, G, cb, dtype, t.values, t.values + (size_t)rows * len * ts, t.codes, t.idx, t.scale};
    /* the unpacking, written from the format's description rather than from kernels_ref.c */
    for (int r = 0; r < rows; r++) {
        double s = t.scale ? t.scale[r] : 1.0, *row = t.dense + (size_t)r * 4 * G;
        if (!n) {
            for (int j = 0; j < len; j++) row[j] = sb_value(&t.c, r, j) * s;
            continue;
        }
        int e = 0;
        for (int g = 0; g < G; g++) {
            int mask = t.codes[(size_t)r * cb + g / 2] >> (g & 1) * 4 & 15;
            for (int j = 0; j < 4; j++)
                if (mask >> j & 1) row[4 * g + j] = sb_value(&t.c, r, e++) * s;
        }
    }
    return t;
}

static void free_class(test_class *t) {
    free(t->values), free(t->codes), free(t->idx), free(t->scale), free(t->dense);
}

static const char *dtype_name(int dt) { return dt == GG_F32 ? "f32" : dt == GG_F16 ? "f16" : "int8"; }

/* the bound of a product: a multiple of sum_j |w_j x_j| (the size of what was summed) */
static double product_tol(const test_class *t) {
    if (t->c.dtype == GG_F16 && g_tol_f16_gemv > 0) return g_tol_f16_gemv;
    return 2e-5;
}

static void test_gemv(int n, int dtype, int rows, int in, int dense) {
    test_class t = make_class(n, dtype, rows, in, dense);
    int G = t.c.G, nx = pad16(4 * G);
    float *x = calloc((size_t)nx, sizeof(float)); /* zero past `in`, as the engine pads */
    float *y0 = malloc(sizeof(float) * (size_t)t.out), *yr = malloc(sizeof(float) * (size_t)t.out),
          *yk = malloc(sizeof(float) * (size_t)t.out);
    for (int j = 0; j < in; j++) x[j] = uniform(-2.0f, 2.0f);
    for (int o = 0; o < t.out; o++) y0[o] = uniform(-1.0f, 1.0f); /* the kernels accumulate */
    memcpy(yr, y0, sizeof(float) * (size_t)t.out);
    memcpy(yk, y0, sizeof(float) * (size_t)t.out);
    for (int r0 = 0; r0 < rows; r0 += 16) { /* blocks of 16 rows, as sb_linear_vec splits them */
        int r1 = r0 + 16 < rows ? r0 + 16 : rows;
        sb_kernels_ref.gemv(&t.c, x, yr, r0, r1);
        K->gemv(&t.c, x, yk, r0, r1);
    }
    char what[128];
    for (int r = 0; r < rows; r++) {
        int o = t.idx ? t.idx[r] : r;
        double want = y0[o], mag = fabs(y0[o]) + 1e-6;
        for (int j = 0; j < 4 * G; j++) {
            want += t.dense[(size_t)r * 4 * G + j] * x[j];
            mag += fabs(t.dense[(size_t)r * 4 * G + j] * x[j]);
        }
        snprintf(what, sizeof what, "gemv %s n=%d %s rows=%d in=%d row %d", dense ? "dense" : "class", n,
                 dtype_name(dtype), rows, in, r);
        check(what, yk[o], yr[o], product_tol(&t), mag);
        check(what, yr[o], want, 2e-5, mag); /* the reference against the unpacking */
    }
    for (int o = 0; o < t.out; o++) /* outputs of no row are untouched */
        if (t.idx) {
            int written = 0;
            for (int r = 0; r < rows; r++) written |= t.idx[r] == o;
            if (!written) check("gemv: an output no row writes", yk[o], y0[o], 0.0, 1.0);
        }
    free(x), free(y0), free(yr), free(yk);
    free_class(&t);
}

static void test_gemm(int n, int dtype, int rows, int in, int dense, int T) {
    test_class t = make_class(n, dtype, rows, in, dense);
    int G = t.c.G, nc = pad16(4 * G), ldx = (T + 7) / 8 * 8;
    if (ldx % 64 == 0) ldx += 8; /* the engine's stride rule (forward.c, grow_prefill) */
    float *X = calloc((size_t)nc * ldx, sizeof(float)); /* channel-major, zero past `in` */
    size_t ny = (size_t)t.out * ldx;
    float *Y0 = malloc(sizeof(float) * ny), *Yr = malloc(sizeof(float) * ny), *Yk = malloc(sizeof(float) * ny);
    void *scratch = aligned_alloc(64, (SB_GEMM_SCRATCH(G) + 63) / 64 * 64);
    for (int j = 0; j < in; j++)
        for (int tt = 0; tt < T; tt++) X[(size_t)j * ldx + tt] = uniform(-2.0f, 2.0f);
    for (size_t i = 0; i < ny; i++) Y0[i] = uniform(-1.0f, 1.0f);
    memcpy(Yr, Y0, sizeof(float) * ny);
    memcpy(Yk, Y0, sizeof(float) * ny);
    for (int r0 = 0; r0 < rows; r0 += SB_GEMM_ROWS) { /* blocks of SB_GEMM_ROWS, as sb_linear_mat splits them */
        int r1 = r0 + SB_GEMM_ROWS < rows ? r0 + SB_GEMM_ROWS : rows;
        sb_kernels_ref.gemm(&t.c, X, ldx, T, Yr, ldx, r0, r1, scratch);
        K->gemm(&t.c, X, ldx, T, Yk, ldx, r0, r1, scratch);
    }
    char what[160];
    for (int r = 0; r < rows; r++) {
        int o = t.idx ? t.idx[r] : r;
        for (int tt = 0; tt < T; tt++) {
            size_t at = (size_t)o * ldx + tt;
            double want = Y0[at], mag = fabs(Y0[at]) + 1e-6;
            for (int j = 0; j < 4 * G; j++) {
                double p = t.dense[(size_t)r * 4 * G + j] * X[(size_t)j * ldx + tt];
                want += p, mag += fabs(p);
            }
            snprintf(what, sizeof what, "gemm %s n=%d %s rows=%d in=%d T=%d row %d token %d",
                     dense ? "dense" : "class", n, dtype_name(dtype), rows, in, T, r, tt);
            check(what, Yk[at], Yr[at], 2e-5, mag); /* every family's gemm sums in fp32 */
            check(what, Yr[at], want, 2e-5, mag);
        }
    }
    free(X), free(Y0), free(Yr), free(Yk), free(scratch);
    free_class(&t);
}

/* ---------------------------------------------------------------- the element-wise kernels */

static double silu_d(double v) { return v / (1.0 + exp(-v)); }

static void test_pointwise(int n, int offset) {
    /* offset: the vectors start one float past an aligned address (a channel row of a prefill chunk) */
    float *a = malloc(sizeof(float) * (size_t)(n + 1)), *b = malloc(sizeof(float) * (size_t)(n + 1)),
          *z = malloc(sizeof(float) * (size_t)(n + 1)), *x0 = malloc(sizeof(float) * (size_t)n);
    char what[96];
    for (int i = 0; i < n; i++) x0[i] = uniform(-30.0f, 30.0f), z[offset + i] = uniform(-12.0f, 12.0f);
    for (int op = 0; op < 3; op++) {
        static const char *names[] = {"silu", "softplus", "mul_silu"};
        memcpy(a + offset, x0, sizeof(float) * (size_t)n);
        memcpy(b + offset, x0, sizeof(float) * (size_t)n);
        if (op == 0) sb_kernels_ref.silu(a + offset, n), K->silu(b + offset, n);
        if (op == 1) sb_kernels_ref.softplus(a + offset, n), K->softplus(b + offset, n);
        if (op == 2) sb_kernels_ref.mul_silu(a + offset, z + offset, n), K->mul_silu(b + offset, z + offset, n);
        for (int i = 0; i < n; i++) {
            double v = x0[i];
            double want = op == 0 ? silu_d(v) : op == 1 ? (v > 20.0 ? v : log1p(exp(v))) : v * silu_d(z[offset + i]);
            snprintf(what, sizeof what, "%s n=%d offset %d at %d (x = %g)", names[op], n, offset, i, v);
            check(what, b[offset + i], a[offset + i], 1e-5, fabs(want) + 1e-6);
            check(what, a[offset + i], want, 1e-5, fabs(want) + 1e-6);
        }
    }
    free(a), free(b), free(z), free(x0);
}

static void test_scan_step(int N) {
    float *A = malloc(sizeof(float) * (size_t)N), *B = malloc(sizeof(float) * (size_t)N),
          *C = malloc(sizeof(float) * (size_t)N), *s0 = malloc(sizeof(float) * (size_t)N),
          *sr = malloc(sizeof(float) * (size_t)N), *sk = malloc(sizeof(float) * (size_t)N);
    for (int i = 0; i < N; i++) {
        A[i] = -expf(uniform(-2.0f, 2.5f)); /* A = -exp(A_log) */
        B[i] = uniform(-1.0f, 1.0f), C[i] = uniform(-1.0f, 1.0f), s0[i] = uniform(-2.0f, 2.0f);
    }
    float dt = uniform(0.001f, 0.5f), dtx = dt * uniform(-2.0f, 2.0f), yr, yk;
    memcpy(sr, s0, sizeof(float) * (size_t)N);
    memcpy(sk, s0, sizeof(float) * (size_t)N);
    sb_kernels_ref.scan_step(N, A, dt, dtx, B, C, sr, &yr);
    K->scan_step(N, A, dt, dtx, B, C, sk, &yk);
    char what[96];
    double want = 0.0, mag = 1e-6;
    for (int i = 0; i < N; i++) {
        double s = exp((double)dt * A[i]) * s0[i] + (double)dtx * B[i];
        want += s * C[i], mag += fabs(s * C[i]);
        snprintf(what, sizeof what, "scan_step N=%d state %d", N, i);
        check(what, sk[i], sr[i], 1e-5, fabs(s) + 1e-6);
        check(what, sr[i], s, 1e-5, fabs(s) + 1e-6);
    }
    snprintf(what, sizeof what, "scan_step N=%d output", N);
    check(what, yk, yr, 1e-5, mag);
    check(what, yr, want, 1e-5, mag);
    free(A), free(B), free(C), free(s0), free(sr), free(sk);
}

static void test_read_sum(size_t n) {
    float *x = aligned_alloc(64, sizeof(float) * n);
    double want = 0.0, mag = 0.0;
    for (size_t i = 0; i < n; i++) x[i] = uniform(-1.0f, 1.0f), want += x[i], mag += fabs(x[i]);
    char what[64];
    snprintf(what, sizeof what, "read_sum n=%zu", n);
    check(what, K->read_sum(x, n), sb_kernels_ref.read_sum(x, n), 1e-5, mag);
    check(what, sb_kernels_ref.read_sum(x, n), want, 1e-5, mag);
    free(x);
}

/* ---------------------------------------------------------------- the family */

static const struct {
    const char *name;
    int isa;
    const char *needs; /* what the CPU must have, for the skip message */
} FAMILIES[] = {
    {"scalar", SB_ISA_SCALAR, ""},
    {"avx2", SB_ISA_AVX2, "an x86-64 CPU with AVX2, FMA and F16C"},
    {"neon", SB_ISA_NEON, "an AArch64 CPU (Advanced SIMD)"},
    {"neon-fp16", SB_ISA_NEON_FP16, "an AArch64 CPU with fp16 arithmetic (ARMv8.2-A FEAT_FP16, HWCAP_ASIMDHP)"},
};

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s scalar|avx2|neon|neon-fp16\n", argv[0]);
        return 2;
    }
    int f = -1;
    for (int i = 0; i < (int)(sizeof FAMILIES / sizeof *FAMILIES); i++)
        if (!strcmp(argv[1], FAMILIES[i].name)) f = i;
    if (f < 0) {
        fprintf(stderr, "unknown kernel family '%s' (scalar, avx2, neon, neon-fp16)\n", argv[1]);
        return 2;
    }
    sb_set_isa(FAMILIES[f].isa);
    K = sb_active_kernels();
    if (strcmp(K->name, FAMILIES[f].name)) { /* sb_set_isa fell back: not in this build, or not on this CPU */
        printf("SKIP %s: this CPU or build has no %s kernels (needs %s)\n", FAMILIES[f].name, FAMILIES[f].name,
               FAMILIES[f].needs);
        return 77;
    }
    /* fp16 products and partial sums of at most 64 inputs, each within 2^-11 of the fp32 ones */
    if (!strcmp(K->name, "neon-fp16")) g_tol_f16_gemv = 4e-3;

    static const int DTYPES[] = {GG_F32, GG_F16, GG_I8};
    static const int INS[] = {1, 3, 6, 13, 37, 67, 130}, ROWS[] = {1, 7, 17, 33}, TS[] = {1, 7, 37};
    for (int d = 0; d < 3; d++)
        for (int n = 0; n <= 4; n++) /* n = 4: the dense `.weight` layout (n = 0, len = in) */
            for (size_t i = 0; i < sizeof INS / sizeof *INS; i++)
                for (size_t r = 0; r < sizeof ROWS / sizeof *ROWS; r++) {
                    int dense = n == 4, cls = dense ? 0 : n;
                    test_gemv(cls, DTYPES[d], ROWS[r], INS[i], dense);
                    for (size_t t = 0; t < sizeof TS / sizeof *TS; t++)
                        test_gemm(cls, DTYPES[d], ROWS[r], INS[i], dense, TS[t]);
                }
    static const int LENS[] = {1, 3, 8, 15, 16, 17, 37, 100};
    for (size_t i = 0; i < sizeof LENS / sizeof *LENS; i++) {
        test_pointwise(LENS[i], 0);
        test_pointwise(LENS[i], 1);
    }
    static const int NS[] = {1, 4, 7, 16, 17, 33, 64};
    for (size_t i = 0; i < sizeof NS / sizeof *NS; i++) test_scan_step(NS[i]);
    test_read_sum(64), test_read_sum(640), test_read_sum(64 * 1001);
    printf("%s %s: %d checks, %d failed, worst error %.3f of its bound\n", g_failures ? "FAIL" : "PASS", K->name,
           g_checks, g_failures, g_worst);
    return g_failures ? 1 : 0;
}
