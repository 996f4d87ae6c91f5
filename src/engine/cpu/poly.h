/* The two polynomials of the SIMD families' expf and logf, written once: simd.h (AVX2),
 * kernels_avx512.c and kernels_neon.c each evaluate them with their own intrinsics, in the same order
 * (Horner from the first coefficient), so every family rounds the same way.
 *   expf: x = k ln2 + r (ln2 split in two, SB_LN2_HI + SB_LN2_LO, for an exact reduction), then
 *         e^r = 1 + r + r^2 (SB_EXP_P in r); relative error about 2e-7.
 *   logf: Cephes: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(1 + f) = f - f^2/2 + f^3 (SB_LOG_P in f)
 *         for f = m - 1; relative error about 1e-7. */
#ifndef SB_POLY_H
#define SB_POLY_H

#define SB_LN2_HI 0.693359375f
#define SB_LN2_LO (-2.12194440e-4f)
#define SB_LOG2E 1.44269504088896341f

static const float SB_EXP_P[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                  4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
static const float SB_LOG_P[9] = {7.0376836292e-2f,  -1.1514610310e-1f, 1.1676998740e-1f,
                                  -1.2420140846e-1f, 1.4249322787e-1f,  -1.6668057665e-1f,
                                  2.0000714765e-1f,  -2.4999993993e-1f, 3.3333331174e-1f};

#endif
