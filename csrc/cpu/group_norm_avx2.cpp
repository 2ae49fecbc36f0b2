// The GroupNorm kernels compiled for AVX2 + FMA; group_norm.cpp calls them only
// where the CPU has both (see group_norm_kernel.h for why this file includes
// no torch header).
#include <cstdint>

#include "group_norm_kernel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FASTDDPM_GN_POP
#elif defined(__x86_64__) && defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#define FASTDDPM_GN_POP_CLANG
#endif

namespace fastddpm {
namespace gn_avx2 {
#include "group_norm_kernel.inc"
}  // namespace gn_avx2
}  // namespace fastddpm

#if defined(FASTDDPM_GN_POP)
#pragma GCC pop_options
#elif defined(FASTDDPM_GN_POP_CLANG)
#pragma clang attribute pop
#endif
