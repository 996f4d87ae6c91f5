/* Parity of the packed-format-v2 kernels (src/engine/cpu/linear_v2*.c), driven by tests/test_linear_v2.py.
 *
 *   test_linear_v2 CASE...        every case: sb_v2_check, then gemv (one call per token, the blocks
 *                                 split in two calls as two threads would) and gemm (all tokens) of
 *                                 every family this CPU runs, against numpy's product and the scalar
 *                                 reference; prints the worst errors, exit status 1 on a failure
 *   test_linear_v2 --check CASE   only sb_v2_check: prints "ok" or its message
 *
 * A case file: u32 K, out, dtype, T; u64 blob bytes; then x (T, K) f32, y (T, out) f32 (numpy's
 * product, float64 then rounded; int8: with the activations quantised as the kernels do), mag (T, out)
 * f32 = Σ_j |w_j| max|x over j's chunk|, and the blob. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "linear_v2.h"

typedef struct {
    const char *name;
    sb_v2_gemv_fn gemv;
    sb_v2_gemm_fn gemm;
} family;

int main(int argc, char **argv) {
    int check_only = argc > 1 && !strcmp(argv[1], "--check");
    family fam[4] = {{"ref", sb_v2_gemv_ref, sb_v2_gemm_ref}};
    int nf = 1;
#if defined(__x86_64__)
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl");
    if (avx2) fam[nf++] = (family){"avx2", sb_v2_gemv_avx2, sb_v2_gemm_avx2};
    else if (!check_only) printf("skip avx2: the CPU lacks AVX2/FMA\n");
    if (avx512) fam[nf++] = (family){sb_v2_avx512_vnni() ? "avx512-vnni" : "avx512", sb_v2_gemv_avx512, sb_v2_gemm_avx512};
    else if (!check_only) printf("skip avx512: the CPU lacks AVX-512 F/BW/VL\n");
#elif defined(__aarch64__)
    fam[nf++] = (family){"neon", sb_v2_gemv_neon, sb_v2_gemm_neon};
#endif
    double worst[3][4] = {{0}};
    int fails = 0, ncases = 0;
    for (int i = 1 + check_only; i < argc; i++, ncases++) {
        FILE *f = fopen(argv[i], "rb");
        uint32_t hd[4];
        uint64_t bs;
        if (!f || fread(hd, 4, 4, f) != 4 || fread(&bs, 8, 1, f) != 1) return fprintf(stderr, "%s: unreadable\n", argv[i]), 2;
        int K = (int)hd[0], out = (int)hd[1], dt = (int)hd[2], T = (int)hd[3];
        size_t nx = (size_t)T * K, ny = (size_t)T * out;
        float *x = malloc(4 * nx), *ye = malloc(4 * ny), *mag = malloc(4 * ny);
        uint8_t *blob = aligned_alloc(64, sb_v2_up(bs ? bs : 1, 64));
        if (fread(x, 4, nx, f) != nx || fread(ye, 4, ny, f) != ny || fread(mag, 4, ny, f) != ny || fread(blob, 1, bs, f) != bs)
            return fprintf(stderr, "%s: short\n", argv[i]), 2;
        fclose(f);
        sb_v2_matrix m;
        char err[256];
        if (sb_v2_check(blob, bs, out, K, dt, &m, err, sizeof err)) {
            printf(check_only ? "%s\n" : "FAIL %s: %s\n", check_only ? err : argv[i], err);
            fails++;
            free(x), free(ye), free(mag), free(blob);
            continue;
        }
        if (check_only) {
            printf("ok\n");
            free(x), free(ye), free(mag), free(blob);
            continue;
        }
        size_t ab = sb_v2_act_bytes(K);
        uint8_t *amem = aligned_alloc(64, ab * (size_t)T);
        sb_v2_act *act = malloc(sizeof *act * (size_t)T);
        for (int t = 0; t < T; t++) {
            sb_v2_act_bind(&act[t], amem + ab * t, K);
            sb_v2_act_set(&act[t], x + (size_t)t * K, 1, dt == SB_V2_I8);
        }
        float *yv[4], *ym[4];
        for (int k = 0; k < nf; k++) {
            yv[k] = calloc(ny, 4), ym[k] = calloc(ny, 4);
            for (int ci = 0; ci < m.nclass; ci++) {
                const sb_v2_class *c = &m.cls[ci];
                for (int t = 0; t < T; t++) { /* two calls over a split of the blocks, as two threads make */
                    fam[k].gemv(c, &act[t], yv[k] + (size_t)t * out, 0, c->nblocks / 2);
                    fam[k].gemv(c, &act[t], yv[k] + (size_t)t * out, c->nblocks / 2, c->nblocks);
                }
                /* gemm writes channel-major Y[o * T + t] */
                fam[k].gemm(c, act, T, ym[k], T, 0, c->nblocks / 2);
                fam[k].gemm(c, act, T, ym[k], T, c->nblocks / 2, c->nblocks);
            }
        }
        /* tolerances relative to mag: fp32 / f16 only reorder fp32 sums; int8's numpy product already
         * has the kernels' activation rounding, so the same reordering bound holds */
        double tol = 1e-6 * (1 + K / 1000.0);
        for (int k = 0; k < nf; k++) {
            double e_np = 0, e_ref = 0, e_mm = 0;
            for (int t = 0; t < T; t++)
                for (int o = 0; o < out; o++) {
                    size_t a = (size_t)t * out + o;
                    double mg = mag[a] > 0 ? mag[a] : 1;
                    e_np = fmax(e_np, fabs((double)yv[k][a] - ye[a]) / mg);
                    e_ref = fmax(e_ref, fabs((double)yv[k][a] - yv[0][a]) / mg);
                    e_mm = fmax(e_mm, fabs((double)ym[k][(size_t)o * T + t] - yv[k][a]) / mg);
                }
            worst[dt][k] = fmax(worst[dt][k], fmax(e_np, e_mm));
            if (!(e_np <= tol && e_ref <= tol && e_mm <= tol)) {
                printf("FAIL %s K=%d out=%d dtype=%d %s: gemv vs numpy %.3g, vs ref %.3g, gemm vs gemv %.3g (tol %.3g)\n",
                       argv[i], K, out, dt, fam[k].name, e_np, e_ref, e_mm, tol);
                fails++;
            }
        }
        for (int k = 0; k < nf; k++) free(yv[k]), free(ym[k]);
        free(act), free(amem), free(x), free(ye), free(mag), free(blob);
    }
    if (!check_only) {
        const char *dn[3] = {"f32", "f16", "int8"};
        for (int d = 0; d < 3; d++) {
            printf("%-5s max error / sum|w||x|:", dn[d]);
            for (int k = 0; k < nf; k++) printf("  %s %.2e", fam[k].name, worst[d][k]);
            printf("\n");
        }
        printf("%d cases, %d failures\n", ncases, fails);
    }
    return fails != 0;
}
