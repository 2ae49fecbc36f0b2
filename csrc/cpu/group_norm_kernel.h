// The GroupNorm(+add)(+SiLU)(+dropout) CPU kernels, float32 only, one call per
// task (one (n, group) of an NCHW tensor, or one sample n of an NHWC one).
//
// The kernels live in group_norm_kernel.inc, compiled three times: for
// AVX-512 (group_norm_avx512.cpp), AVX2+FMA (group_norm_avx2.cpp) and baseline
// x86-64 (group_norm_base.cpp); group_norm.cpp picks one at run time. (Not
// at::vec: in an extension it compiles to its scalar fallback unless the file
// is built per instruction set, which is what this does without it.) They include no torch header, so no inline
// torch function is ever instantiated with AVX2 instructions (one such copy,
// picked by the linker, would crash an older CPU). GCC vectorises their
// fixed-width lane loops for the target of each copy; it needs
// -fno-trapping-math (setup.py) to vectorise the clamps and compares.
#pragma once
#include <cstdint>

namespace fastddpm {

struct GnArgs {
  const float* x;        // (N, C, HW) NCHW or (N, HW, C) NHWC
  const float* dy;       // backward only: like x
  float* out;            // y (forward) or dx (backward), like x
  int64_t base;          // x, dy and out point at element `base` of the tensor (0, or a task's slice)
  // bfloat16 I/O instead (x, dy, out unset): each task converts its slice of x (and
  // dy) to float32 scratch, runs the float32 kernel on it and rounds its output back
  const uint16_t* x_bf16;
  const uint16_t* dy_bf16;
  uint16_t* out_bf16;
  const float* weight;   // (C,) or nullptr (= ones)
  const float* bias;     // (C,) or nullptr (= zeros)
  const float* add;      // (N, C) or nullptr: added to x before normalising
  double* mean;          // (N, G): written by the forward, read by the backward
  double* rstd;          // (N, G)
  double* dw_part;       // backward: (N, C) sum of dy_z * xhat per sample
  double* db_part;       // backward: (N, C) sum of dy_z per sample
  double* dadd;          // backward: (N, C) d/d add, or nullptr
  int64_t N, C, G, HW;
  double eps;
  bool silu;
  bool dropout;          // mask keep iff hash(seed, NCHW index) >> 40 >= keep_threshold
  uint64_t seed;
  uint32_t keep_threshold;  // ceil(p * 2^24)
  float drop_scale;         // 1 / (1 - p)
};

struct GnKernels {
  void (*fwd_nchw)(const GnArgs&, int64_t n, int64_t g);
  void (*fwd_nhwc)(const GnArgs&, int64_t n);
  void (*bwd_nchw)(const GnArgs&, int64_t n, int64_t g);
  void (*bwd_nhwc)(const GnArgs&, int64_t n);
};

namespace gn_avx2 { extern const GnKernels kernels; }
namespace gn_base { extern const GnKernels kernels; }
namespace gn_avx512 { extern const GnKernels kernels; }

}  // namespace fastddpm
