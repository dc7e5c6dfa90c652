/* What this build of the kernels is, for cpu_kernels.py to read at load: the vector paths compiled in
 * (reported by --stats, and checked in CI for each QWEN3NEXT_KERNEL_CFLAGS variant) and the limits of
 * common.h, so that the Python side never restates them. */
#include "common.h"

/* The widest path the kernels take, from the same macros that select it. */
const char *q3n_isa(void) {
#if defined(Q3N_VNNI)
    return "avx512-vnni";
#elif defined(Q3N_AVX512)
    return "avx512";
#elif defined(Q3N_AVX2) && defined(Q3N_AVX_VNNI)
    return "avx2-vnni";
#elif defined(Q3N_AVX2)
    return "avx2";
#elif defined(__ARM_NEON)
    return "neon"; /* the portable loops, vectorised by the compiler */
#else
    return "portable";
#endif
}

/* 1 when built with OpenMP; without it every kernel runs on one thread. */
int q3n_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int64_t q3n_max_rows(void) { return Q3N_MAX_ROWS; }

int64_t q3n_max_conv_kernel(void) { return Q3N_MAX_CONV_KERNEL; }
