// The GroupNorm kernels compiled for AVX-512 (F, VL, DQ, BW); group_norm.cpp calls them only
// where the CPU has them all (see group_norm_kernel.h for why this file includes
// no torch header).
#include <cstdint>

#include "group_norm_kernel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,prefer-vector-width=512")
#define FASTDDPM_GN_POP
#elif defined(__x86_64__) && defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,prefer-vector-width=512"))), apply_to = function)
#define FASTDDPM_GN_POP_CLANG
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FASTDDPM_GN_AVX512  // the .inc's SIMD SiLU
#endif

namespace fastddpm {
namespace gn_avx512 {
#include "group_norm_kernel.inc"
}  // namespace gn_avx512
}  // namespace fastddpm

#if defined(FASTDDPM_GN_POP)
#pragma GCC pop_options
#elif defined(FASTDDPM_GN_POP_CLANG)
#pragma clang attribute pop
#endif
