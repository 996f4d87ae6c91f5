/* Which kernel family runs: the best one this CPU has (asked at run time, so that one x86-64 or
 * AArch64 build runs everywhere), or the one a caller forces (sb_set_isa: tests, benchmarks). */
#include "engine.h"
#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

static const sb_kernels *g_kernels;

#if defined(__x86_64__) || defined(_M_X64)
/* F16C is CPUID.1:ECX bit 29; asked of cpuid directly because clang's __builtin_cpu_supports does
 * not know "f16c" (gcc's does) */
static int cpu_has_f16c(void) {
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c >> 29 & 1);
}

static int cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
}
/* F, BW and VL (the kernels' 512-bit integer and masked ops); VNNI is the kernels' own run-time choice */
static int cpu_has_avx512(void) {
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
}
#endif

static const sb_kernels *best_kernels(void) {
#if defined(__x86_64__) || defined(_M_X64)
    if (cpu_has_avx512()) return &sb_kernels_avx512;
    if (cpu_has_avx2()) return &sb_kernels_avx2;
#endif
#if defined(__aarch64__)
    return &sb_kernels_neon; /* Advanced SIMD is part of every ARMv8-A core */
#endif
    return &sb_kernels_ref;
}

const sb_kernels *sb_active_kernels(void) {
    if (!g_kernels) g_kernels = best_kernels();
    return g_kernels;
}

int32_t sb_set_isa(int32_t isa) {
    g_kernels = isa == SB_ISA_AUTO ? best_kernels() : &sb_kernels_ref;
#if defined(__x86_64__) || defined(_M_X64)
    if (isa == SB_ISA_AVX2 && cpu_has_avx2()) g_kernels = &sb_kernels_avx2;
    if (isa == SB_ISA_AVX512 && cpu_has_avx512()) g_kernels = &sb_kernels_avx512;
    if (g_kernels == &sb_kernels_avx2) return SB_ISA_AVX2;
    if (g_kernels == &sb_kernels_avx512) return SB_ISA_AVX512;
#endif
#if defined(__aarch64__)
    if (isa == SB_ISA_NEON) g_kernels = &sb_kernels_neon;
    if (g_kernels == &sb_kernels_neon) return SB_ISA_NEON;
#endif
    return SB_ISA_SCALAR;
}

/* the family's name; AVX-512 says whether its int8 products use VNNI */
const char *sb_isa_name(void) {
    const sb_kernels *k = sb_active_kernels();
#if defined(__x86_64__) || defined(_M_X64)
    if (k == &sb_kernels_avx512 && sb_v2_avx512_vnni()) return "avx512-vnni";
#endif
    return k->name;
}
