/* Every kernel of one family against the scalar reference and numpy: the matrix products of packed
 * format v2 (gemv and gemm, every class n = 0..3 in f32, f16 and int8, on the case files that
 * tests/test_kernels.py writes with the numpy packer: K below a group, K not a multiple of a chunk,
 * several panels, rows not a multiple of a block), then silu, softplus, mul_silu, scan_step, scan_decode and
 * read_sum on odd lengths.
 *
 *   sparsamba-test-kernels FAMILY [CASE...]   FAMILY: scalar, avx2, avx512, neon
 *   sparsamba-test-kernels --check CASE       the loader's blob check alone: "ok" or its message
 *
 * Exit 0: every check within its bound; 1: a check failed (each failure printed with its error and
 * bound); 77: this build or this CPU has no such family (the reason printed, "SKIP family: ...").
 * AVX-512 uses VNNI for int8 where the CPU has it; SPARSAMBA_NO_VNNI=1 runs its vpmaddwd path.
 * Built by CMakeLists.txt (target sparsamba-test-kernels) and run by tests/test_kernels.py. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "mamba2.h"

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static uint64_t next_u64(void) { /* splitmix64 */
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static float uniform(float lo, float hi) { return lo + (hi - lo) * (float)(next_u64() >> 40) / (float)(1 << 24); }

static const sb_kernels *K; /* the family under test */
static int g_checks, g_failures;
static double g_worst;         /* the largest error / bound seen */
static double g_worst_dt[3];   /* per dtype, the largest product error / mag (the printed parity figures) */

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

/* ---------------------------------------------------------------- the matrix products (packed format v2) */

/* A case file (tests/test_kernels.py writes them with the numpy packer): u32 K, out, dtype, T; u64 blob
 * bytes; then x (T, K) f32, y (T, out) f32 (numpy's product in float64, rounded; int8: with the
 * activations quantised as the kernels do), mag (T, out) f32 = sum_j |w_j| max|x over j's chunk|, and the
 * blob. Read into 64-byte aligned memory, as a file's tensors are. */
typedef struct {
    int K, out, dt, T;
    size_t bytes;
    float *x, *y, *mag;
    uint8_t *blob;
} v2_case;

static int read_case(const char *path, v2_case *c) {
    FILE *f = fopen(path, "rb");
    uint32_t hd[4];
    uint64_t bs;
    memset(c, 0, sizeof *c);
    if (!f || fread(hd, 4, 4, f) != 4 || fread(&bs, 8, 1, f) != 1) {
        if (f) fclose(f);
        return fprintf(stderr, "%s: unreadable\n", path), -1;
    }
    c->K = (int)hd[0], c->out = (int)hd[1], c->dt = (int)hd[2], c->T = (int)hd[3], c->bytes = (size_t)bs;
    size_t nx = (size_t)c->T * c->K, ny = (size_t)c->T * c->out;
    c->x = malloc(4 * nx), c->y = malloc(4 * ny), c->mag = malloc(4 * ny);
    c->blob = aligned_alloc(64, sb_v2_up(bs ? bs : 1, 64));
    int ok = fread(c->x, 4, nx, f) == nx && fread(c->y, 4, ny, f) == ny && fread(c->mag, 4, ny, f) == ny &&
             fread(c->blob, 1, bs, f) == bs;
    fclose(f);
    return ok ? 0 : (fprintf(stderr, "%s: short\n", path), -1);
}

static void free_case(v2_case *c) { free(c->x), free(c->y), free(c->mag), free(c->blob); }

/* gemv (per token, the blocks split in two calls as two threads would) and gemm (all tokens) of the family
 * against numpy's product and the scalar reference; errors relative to mag: fp32 / f16 only reorder fp32
 * sums, and int8's numpy product already has the kernels' activation rounding */
static void test_case(const char *path) {
    v2_case c;
    if (read_case(path, &c)) {
        g_failures++;
        return;
    }
    sb_v2_matrix m;
    char err[256], what[512];
    if (sb_v2_check(c.blob, c.bytes, c.out, c.K, c.dt, &m, err, sizeof err)) {
        printf("FAIL %s: %s\n", path, err);
        g_failures++;
        free_case(&c);
        return;
    }
    int T = c.T, out = c.out;
    size_t ab = sb_v2_act_bytes(c.K), ny = (size_t)T * out;
    uint8_t *amem = aligned_alloc(64, ab * (size_t)T);
    sb_v2_act *act = malloc(sizeof *act * (size_t)T);
    for (int t = 0; t < T; t++) {
        sb_v2_act_bind(&act[t], amem + ab * (size_t)t, c.K);
        sb_v2_act_set(&act[t], c.x + (size_t)t * c.K, 1, c.dt == SB_V2_I8 ? K->quantise : NULL);
    }
    float *yv = calloc(ny, 4), *yr = calloc(ny, 4), *ym = calloc(ny, 4), *yc = calloc(ny, 4);
    /* channel-major x (int8: quantised per token and chunk, as q * s), and the quantiser's bits against act[] */
    int ldc = T + 3;
    float *xraw = calloc((size_t)c.K * ldc, 4), *xcm = calloc((size_t)c.K * ldc, 4), *xref = calloc((size_t)c.K * ldc, 4);
    for (int t = 0; t < T; t++)
        for (int j = 0; j < c.K; j++) xraw[(size_t)j * ldc + t] = c.x[(size_t)t * c.K + j];
    int nch = (c.K + SB_V2_CHUNK - 1) / SB_V2_CHUNK;
    if (c.dt == SB_V2_I8) {
        sb_v2_cm_quantise(xraw, ldc, c.K, T, xcm, ldc, 0, 1);
        sb_v2_cm_quantise(xraw, ldc, c.K, T, xcm, ldc, 1, nch); /* in two ranges, as two threads would */
        sb_v2_cm_quantise_ref(xraw, ldc, c.K, T, xref, ldc, 0, nch);
        int same = 1;
        for (int t = 0; t < T; t++)
            for (int j = 0; j < c.K; j++) {
                float want = (float)act[t].xq[j] * act[t].xs[j / SB_V2_CHUNK];
                same &= memcmp(&xcm[(size_t)j * ldc + t], &want, 4) == 0 && memcmp(&xref[(size_t)j * ldc + t], &want, 4) == 0;
            }
        snprintf(what, sizeof what, "%s: channel-major quantiser bits equal the per-token q * s", path);
        check(what, !same, 0, 0, 0);
    } else {
        memcpy(xcm, xraw, sizeof(float) * (size_t)c.K * ldc);
    }
    for (int ci = 0; ci < m.nclass; ci++) {
        const sb_v2_class *cl = &m.cls[ci];
        for (int t = 0; t < T; t++) {
            K->gemv(cl, &act[t], yv + (size_t)t * out, 0, cl->nblocks / 2);
            K->gemv(cl, &act[t], yv + (size_t)t * out, cl->nblocks / 2, cl->nblocks);
            sb_kernels_ref.gemv(cl, &act[t], yr + (size_t)t * out, 0, cl->nblocks);
        }
        K->gemm(cl, act, T, ym, T, 0, cl->nblocks / 2); /* channel-major Y[o * T + t] */
        K->gemm(cl, act, T, ym, T, cl->nblocks / 2, cl->nblocks);
        act[0].cm = xcm, act[0].ldc = T + 3; /* prefill's channel-major activations, a row stride not T */
        K->gemm(cl, act, T, yc, T, 0, cl->nblocks / 2);
        K->gemm(cl, act, T, yc, T, cl->nblocks / 2, cl->nblocks);
        act[0].cm = NULL;
    }
    double tol = 1e-6 * (1 + c.K / 1000.0), worst[3] = {0};
    for (int t = 0; t < T; t++)
        for (int o = 0; o < out; o++) {
            size_t a = (size_t)t * out + o;
            double mg = c.mag[a] > 0 ? c.mag[a] : 1;
            snprintf(what, sizeof what, "%s: token %d output %d, gemv vs numpy", path, t, o);
            check(what, yv[a], c.y[a], tol, mg);
            snprintf(what, sizeof what, "%s: token %d output %d, gemv vs scalar", path, t, o);
            check(what, yv[a], yr[a], tol, mg);
            snprintf(what, sizeof what, "%s: token %d output %d, gemm vs gemv", path, t, o);
            check(what, ym[(size_t)o * T + t], yv[a], tol, mg);
            snprintf(what, sizeof what, "%s: token %d output %d, channel-major gemm vs gemv", path, t, o);
            check(what, yc[(size_t)o * T + t], yv[a], tol, mg);
            worst[c.dt] = fmax(worst[c.dt], fabs((double)yv[a] - c.y[a]) / mg);
        }
    for (int d = 0; d < 3; d++) g_worst_dt[d] = fmax(g_worst_dt[d], worst[d]);
    free(yv), free(yr), free(ym), free(yc), free(xraw), free(xcm), free(xref), free(act), free(amem);
    free_case(&c);
}

/* the loader's check alone: "ok" or its message (exit 0 / 1) */
static int check_only(const char *path) {
    v2_case c;
    if (read_case(path, &c)) return 2;
    sb_v2_matrix m;
    char err[256];
    int rc = sb_v2_check(c.blob, c.bytes, c.out, c.K, c.dt, &m, err, sizeof err);
    printf("%s\n", rc ? err : "ok");
    free_case(&c);
    return rc ? 1 : 0;
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

/* the decode scan of channels [c0, c1) against the reference's scan_step channel by channel: groups whole
 * and cut at either end, N at, below and past a SIMD width; channels outside the range left untouched */
static void test_scan_decode(int N, int c0, int c1) {
    int di = c1 + 3;
    float *A = malloc(sizeof(float) * (size_t)di * N), *D = malloc(sizeof(float) * (size_t)di),
          *dt = malloc(sizeof(float) * (size_t)di), *x = malloc(sizeof(float) * (size_t)di),
          *B = malloc(sizeof(float) * (size_t)N), *C = malloc(sizeof(float) * (size_t)N),
          *s0 = malloc(sizeof(float) * (size_t)di * N), *sk = malloc(sizeof(float) * (size_t)di * N),
          *yk = malloc(sizeof(float) * (size_t)di);
    for (int i = 0; i < di * N; i++) A[i] = -expf(uniform(-2.0f, 2.5f)), s0[i] = sk[i] = uniform(-2.0f, 2.0f);
    for (int i = 0; i < di; i++) D[i] = uniform(-1.0f, 1.0f), dt[i] = uniform(0.001f, 0.5f), x[i] = uniform(-2.0f, 2.0f);
    for (int i = 0; i < N; i++) B[i] = uniform(-1.0f, 1.0f), C[i] = uniform(-1.0f, 1.0f);
    for (int i = 0; i < di; i++) yk[i] = -7.0f;
    K->scan_decode(N, A, D, dt, x, B, C, sk, yk, c0, c1);
    char what[96];
    float *sr = malloc(sizeof(float) * (size_t)N);
    for (int c = 0; c < di; c++) {
        int in = c >= c0 && c < c1;
        float yr = -7.0f, mag = 1e-6f;
        memcpy(sr, s0 + (size_t)c * N, sizeof(float) * (size_t)N);
        if (in) {
            sb_kernels_ref.scan_step(N, A + (size_t)c * N, dt[c], dt[c] * x[c], B, C, sr, &yr);
            for (int n = 0; n < N; n++) mag += fabsf(sr[n] * C[n]);
            yr += D[c] * x[c], mag += fabsf(D[c] * x[c]);
        }
        snprintf(what, sizeof what, "scan_decode N=%d channels [%d, %d): channel %d output", N, c0, c1, c);
        check(what, yk[c], yr, in ? 1e-5 : 0.0, mag);
        for (int n = 0; n < N; n++) {
            snprintf(what, sizeof what, "scan_decode N=%d channels [%d, %d): channel %d state %d", N, c0, c1, c, n);
            check(what, sk[(size_t)c * N + n], sr[n], in ? 1e-5 : 0.0, fabsf(sr[n]) + 0.1f);
        }
    }
    free(A), free(D), free(dt), free(x), free(B), free(C), free(s0), free(sk), free(yk), free(sr);
}

/* the prefill scan of channels [c0, c1) over T tokens against the reference's scan_step, token by token:
 * channel counts below and at a SIMD width, N below, at and past the register-held 16 */
static void test_scan_chunk(int N, int T, int c0, int c1) {
    if (!K->scan_chunk) return;
    int di = c1 + 2, ld = T + 5;
    float *A = malloc(sizeof(float) * (size_t)di * N), *D = malloc(sizeof(float) * (size_t)di),
          *dt = malloc(sizeof(float) * (size_t)di * ld), *x = malloc(sizeof(float) * (size_t)di * ld),
          *B = malloc(sizeof(float) * (size_t)T * N), *C = malloc(sizeof(float) * (size_t)T * N),
          *sr = malloc(sizeof(float) * (size_t)di * N), *sk = malloc(sizeof(float) * (size_t)di * N),
          *yk = calloc((size_t)di * ld, sizeof(float));
    for (int i = 0; i < di * N; i++) A[i] = -expf(uniform(-2.0f, 2.5f)), sr[i] = sk[i] = uniform(-2.0f, 2.0f);
    for (int i = 0; i < di; i++) D[i] = uniform(-1.0f, 1.0f);
    for (int i = 0; i < di * ld; i++) dt[i] = uniform(0.001f, 0.5f), x[i] = uniform(-2.0f, 2.0f);
    for (int i = 0; i < T * N; i++) B[i] = uniform(-1.0f, 1.0f), C[i] = uniform(-1.0f, 1.0f);
    K->scan_chunk(N, T, A, D, dt, x, ld, B, C, sk, yk, c0, c1);
    char what[96];
    for (int c = 0; c < di; c++)
        for (int t = 0; t < T; t++) {
            float yr = 0.0f, mag = 1e-6f;
            if (c >= c0 && c < c1) {
                float d = dt[(size_t)c * ld + t], xc = x[(size_t)c * ld + t];
                sb_kernels_ref.scan_step(N, A + (size_t)c * N, d, d * xc, B + (size_t)t * N, C + (size_t)t * N, sr + (size_t)c * N, &yr);
                for (int n = 0; n < N; n++) mag += fabsf(sr[(size_t)c * N + n] * C[(size_t)t * N + n]);
                yr += D[c] * xc, mag += fabsf(D[c] * xc);
            }
            snprintf(what, sizeof what, "scan_chunk N=%d T=%d channels [%d, %d): channel %d token %d", N, T, c0, c1, c, t);
            check(what, yk[(size_t)c * ld + t], yr, 1e-5, mag);
        }
    for (int i = 0; i < di * N; i++) {
        snprintf(what, sizeof what, "scan_chunk N=%d channels [%d, %d): final state %d", N, c0, c1, i);
        check(what, sk[i], sr[i], 1e-5, fabsf(sr[i]) + 0.1f); /* states are O(1): absolute near 0 */
    }
    free(A), free(D), free(dt), free(x), free(B), free(C), free(sr), free(sk), free(yk);
}

/* Mamba-2 prefill: the family's whole-chunk SSD of one head (where it has one) against the reference's,
 * token after token; T past the kernel's 256-token buffer */
static void test_ssd_chunk(int p, int N, int T) {
    sb_ssd_chunk_fn f = sb_ssd_chunk_for(K, p, N);
    if (!f) return;
    int ldbc = N + 3, ldy = T + 1;
    float *dec = malloc(sizeof(float) * (size_t)T), *dtx = malloc(sizeof(float) * (size_t)T * p),
          *B = malloc(sizeof(float) * (size_t)T * ldbc), *C = malloc(sizeof(float) * (size_t)T * ldbc),
          *sr = malloc(sizeof(float) * (size_t)p * N), *sk = malloc(sizeof(float) * (size_t)p * N),
          *yr = calloc((size_t)p * ldy, sizeof(float)), *yk = calloc((size_t)p * ldy, sizeof(float));
    for (int t = 0; t < T; t++) dec[t] = uniform(0.5f, 1.0f);
    for (int i = 0; i < T * p; i++) dtx[i] = uniform(-0.5f, 0.5f);
    for (int i = 0; i < T * ldbc; i++) B[i] = uniform(-1.0f, 1.0f), C[i] = uniform(-1.0f, 1.0f);
    for (int i = 0; i < p * N; i++) sr[i] = sk[i] = uniform(-1.0f, 1.0f);
    sb_ssd_chunk_ref(p, N, T, dec, dtx, B, C, ldbc, sr, yr, ldy);
    f(p, N, T, dec, dtx, B, C, ldbc, sk, yk, ldy);
    char what[96];
    for (int c = 0; c < p; c++)
        for (int t = 0; t < T; t++) {
            snprintf(what, sizeof what, "ssd_chunk p=%d N=%d T=%d: channel %d token %d", p, N, T, c, t);
            check(what, yk[(size_t)c * ldy + t], yr[(size_t)c * ldy + t], 1e-5, 0.5 * N);
        }
    for (int i = 0; i < p * N; i++) {
        snprintf(what, sizeof what, "ssd_chunk p=%d N=%d T=%d: final state %d", p, N, T, i);
        check(what, sk[i], sr[i], 1e-5, fabsf(sr[i]) + 0.1f);
    }
    free(dec), free(dtx), free(B), free(C), free(sr), free(sk), free(yr), free(yk);
}

static void test_read_sum(size_t n, int streams, int prefetch) {
    float *x = aligned_alloc(64, sizeof(float) * n);
    double want = 0.0, mag = 0.0;
    for (size_t i = 0; i < n; i++) x[i] = uniform(-1.0f, 1.0f), want += x[i], mag += fabs(x[i]);
    char what[64];
    snprintf(what, sizeof what, "read_sum n=%zu streams=%d prefetch=%d", n, streams, prefetch);
    check(what, K->read_sum(x, n, streams, prefetch), sb_kernels_ref.read_sum(x, n, streams, prefetch), 1e-5, mag);
    check(what, sb_kernels_ref.read_sum(x, n, streams, prefetch), want, 1e-5, mag);
    free(x);
}

/* the int8 products' activation quantiser: this family's must give the scalar definition's bits (values
 * and scales; the AVX2 family's also the tables its kernels read, which the others do not build), on
 * odd lengths, a chunk of zeros and values at half-steps (ties round to even) */
static void test_quantise(int Kn) {
    if (K->quantise == sb_v2_quantise_ref) return; /* the definition itself */
    size_t ab = sb_v2_act_bytes(Kn);
    uint8_t *m1 = aligned_alloc(64, ab), *m2 = aligned_alloc(64, ab);
    float *x = malloc(sizeof(float) * (size_t)Kn);
    for (int j = 0; j < Kn; j++) x[j] = j / 64 == 1 ? 0.0f : uniform(-3.0f, 3.0f);
    for (int j = 128; j + 1 < Kn && j < 192; j += 2) x[j] = 32767.0f, x[j + 1] = (float)(j - 160) + 0.5f;
    sb_v2_act a, b;
    sb_v2_act_bind(&a, m1, Kn), sb_v2_act_bind(&b, m2, Kn);
    memcpy(a.x, x, sizeof(float) * (size_t)Kn), memcpy(b.x, x, sizeof(float) * (size_t)Kn);
    sb_v2_quantise_ref(&a);
    K->quantise(&b);
    char what[80];
    snprintf(what, sizeof what, "quantise K=%d: the family's xq and xs equal the scalar's", Kn);
    size_t nq = (size_t)a.nchunk * SB_V2_CHUNK;
    check(what, memcmp(a.xq, b.xq, nq * sizeof *a.xq) || memcmp(a.xs, b.xs, (size_t)a.nchunk * sizeof *a.xs), 0, 0, 0);
#if defined(__x86_64__) || defined(_M_X64)
    if (K->quantise == sb_v2_quantise_avx2) {
        snprintf(what, sizeof what, "quantise K=%d: the AVX2 tables equal the scalar's", Kn);
        check(what, memcmp(a.xt, b.xt, nq * 2 * sizeof *a.xt) != 0, 0, 0, 0);
    }
#endif
    free(m1), free(m2), free(x);
}

/* ---------------------------------------------------------------- the family */

static const struct {
    const char *name;
    int isa;
    const char *needs; /* what the CPU must have, for the skip message */
} FAMILIES[] = {
    {"scalar", SB_ISA_SCALAR, ""},
    {"avx2", SB_ISA_AVX2, "an x86-64 CPU with AVX2, FMA and F16C"},
    {"avx512", SB_ISA_AVX512, "an x86-64 CPU with AVX-512 F, BW and VL"},
    {"neon", SB_ISA_NEON, "an AArch64 CPU (Advanced SIMD)"},
};

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "--check")) return check_only(argv[2]);
    if (argc < 2) {
        fprintf(stderr, "usage: %s scalar|avx2|avx512|neon [CASE...]  |  %s --check CASE\n", argv[0], argv[0]);
        return 2;
    }
    int f = -1;
    for (int i = 0; i < (int)(sizeof FAMILIES / sizeof *FAMILIES); i++)
        if (!strcmp(argv[1], FAMILIES[i].name)) f = i;
    if (f < 0) {
        fprintf(stderr, "unknown kernel family '%s' (scalar, avx2, avx512, neon)\n", argv[1]);
        return 2;
    }
    sb_set_isa(FAMILIES[f].isa);
    K = sb_active_kernels();
    if (strcmp(K->name, FAMILIES[f].name)) { /* sb_set_isa fell back: not in this build, or not on this CPU */
        printf("SKIP %s: this CPU or build has no %s kernels (needs %s)\n", FAMILIES[f].name, FAMILIES[f].name,
               FAMILIES[f].needs);
        return 77;
    }
    for (int i = 2; i < argc; i++) test_case(argv[i]);
    static const int LENS[] = {1, 3, 8, 15, 16, 17, 37, 100};
    for (size_t i = 0; i < sizeof LENS / sizeof *LENS; i++) {
        test_pointwise(LENS[i], 0);
        test_pointwise(LENS[i], 1);
    }
    static const int NS[] = {1, 4, 7, 16, 17, 33, 64};
    for (size_t i = 0; i < sizeof NS / sizeof *NS; i++) test_scan_step(NS[i]);
    static const int DEC[][3] = {{16, 0, 16}, {16, 0, 64}, {16, 5, 37}, {16, 3, 4}, {32, 1, 30}, {8, 0, 24},
                                 {4, 2, 11}, {5, 0, 19}, {17, 4, 21}, {48, 0, 17}};
    for (size_t i = 0; i < sizeof DEC / sizeof *DEC; i++) test_scan_decode(DEC[i][0], DEC[i][1], DEC[i][2]);
    test_scan_chunk(16, 21, 0, 16), test_scan_chunk(16, 3, 5, 8), test_scan_chunk(5, 21, 3, 17);
    test_scan_chunk(33, 9, 0, 11), test_scan_chunk(70, 4, 1, 3);
    test_ssd_chunk(16, 16, 5), test_ssd_chunk(32, 48, 21), test_ssd_chunk(16, 32, 300), test_ssd_chunk(8, 24, 9);
    for (int pf = 0; pf < 2; pf++) {
        test_read_sum(64, 1, pf), test_read_sum(640, 1, pf), test_read_sum(64 * 1001, 1, pf);
        test_read_sum(64 * 3, 3, pf), test_read_sum(64 * 4 * 7, 4, pf), test_read_sum(64 * 8, 8, pf);
        test_read_sum(64 * 8 * 125, 8, pf); /* every part counted */
    }
    static const int QK[] = {1, 5, 64, 200, 1536};
    for (size_t i = 0; i < sizeof QK / sizeof *QK; i++) test_quantise(QK[i]);
    printf("products of %d cases, max error / sum|w||x|: f32 %.2e, f16 %.2e, int8 %.2e\n", argc - 2, g_worst_dt[0],
           g_worst_dt[1], g_worst_dt[2]);
    printf("%s %s: %d checks, %d failed, worst error %.3f of its bound\n", g_failures ? "FAIL" : "PASS",
           sb_isa_name(), g_checks, g_failures, g_worst);
    return g_failures ? 1 : 0;
}
