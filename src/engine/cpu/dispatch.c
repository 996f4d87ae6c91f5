/* Which kernel family runs: the best one this CPU has (asked at run time, so that one x86-64 or
 * AArch64 build runs everywhere), or the one a caller forces (sb_set_isa: tests, benchmarks). */
#include "engine.h"
#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDHP
#define HWCAP_ASIMDHP (1 << 10) /* asm/hwcap.h: Advanced SIMD half-precision arithmetic */
#endif
#endif

static const sb_kernels *g_kernels;

#if defined(__x86_64__) || defined(_M_X64)
/* F16C is CPUID.1:ECX bit 29; asked of cpuid directly because clang's __builtin_cpu_supports does
 * not know "f16c" (gcc's does) */
static int cpu_has_f16c(void) {
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c >> 29 & 1);
}
#endif

static const sb_kernels *best_kernels(void) {
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c())
        return &sb_kernels_avx2;
#endif
#if defined(__aarch64__)
#if defined(__linux__)
    if (getauxval(AT_HWCAP) & HWCAP_ASIMDHP) return &sb_kernels_neon_fp16; /* ARMv8.2-A fp16 arithmetic */
#endif
    return &sb_kernels_neon; /* Advanced SIMD is part of every ARMv8-A core */
#endif
    return &sb_kernels_ref;
}

const sb_kernels *sb_active_kernels(void) {
    if (!g_kernels) g_kernels = best_kernels();
    return g_kernels;
}

int32_t sb_set_isa(int32_t isa) {
    const sb_kernels *best = best_kernels();
    if (isa == SB_ISA_SCALAR) g_kernels = &sb_kernels_ref;
#if defined(__x86_64__) || defined(_M_X64)
    else if (isa == SB_ISA_AVX2 && best == &sb_kernels_avx2) g_kernels = &sb_kernels_avx2;
#endif
#if defined(__aarch64__)
    else if (isa == SB_ISA_NEON) g_kernels = &sb_kernels_neon;
    else if (isa == SB_ISA_NEON_FP16 && best == &sb_kernels_neon_fp16) g_kernels = &sb_kernels_neon_fp16;
#endif
    else g_kernels = isa == SB_ISA_AUTO ? best : &sb_kernels_ref;
#if defined(__aarch64__)
    if (g_kernels == &sb_kernels_neon) return SB_ISA_NEON;
    if (g_kernels == &sb_kernels_neon_fp16) return SB_ISA_NEON_FP16;
#endif
    return g_kernels == &sb_kernels_ref ? SB_ISA_SCALAR : SB_ISA_AVX2;
}

const char *sb_isa_name(void) { return sb_active_kernels()->name; }
