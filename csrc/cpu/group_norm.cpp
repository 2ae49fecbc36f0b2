// CPU implementation of fastddpm_cpp::group_norm and ::group_norm_backward:
// GroupNorm of x + add (per (n, c)), optional SiLU, optional dropout, forward
// and backward. The float32 kernels are in group_norm_kernel.inc; this file
// checks the call, puts the data in float32 (fp16 is converted; bf16 is read and
// written as it is, each task converting its own slice; the math is always
// float32 with double statistics), and runs the tasks in parallel.
//
// Layouts: contiguous NCHW (any number of spatial dims) and channels_last
// (4-D); anything else is made contiguous first. The output has x's layout.
// Dropout: element (n, c, s) (logical NCHW index i) is kept iff
// splitmix64(seed, i) >> 40 >= ceil(p 2^24), scaled by 1 / (1 - p); the
// backward regenerates the same mask from the same seed.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>  // not torch/torch.h: its C++ frontend adds ~7 s to this file's build

#include <ATen/Dispatch.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "group_norm_kernel.h"
#include "output_cache.h"

namespace fastddpm {
namespace {

// The best copy this CPU runs; FASTDDPM_CPU_ISA=avx2 or base (read at the first
// call) caps it, so the tests run every copy on one machine.
const GnKernels& best_kernels() {
  const char* cap = std::getenv("FASTDDPM_CPU_ISA");
  const std::string want = cap ? cap : "";
  TORCH_CHECK(want.empty() || want == "avx512" || want == "avx2" || want == "base",
              "FASTDDPM_CPU_ISA must be avx512, avx2 or base, got '", want, "'");
#if defined(__x86_64__) && defined(__GNUC__)
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
                      (want.empty() || want == "avx512");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && want != "base";
  return avx512 ? gn_avx512::kernels : avx2 ? gn_avx2::kernels : gn_base::kernels;
#else
  return gn_base::kernels;
#endif
}

const GnKernels& pick_kernels() {
  static const GnKernels& k = best_kernels();
  return k;
}

bool is_nhwc(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// x in float32, dense in the layout the kernels read
at::Tensor as_float(const at::Tensor& x, bool nhwc) {
  return x.to(at::kFloat).contiguous(nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

at::Tensor param_float(const c10::optional<at::Tensor>& p) {
  return p.has_value() ? p->to(at::kFloat).contiguous() : at::Tensor();
}

void check_common(const char* op, const at::Tensor& x, int64_t num_groups, const c10::optional<at::Tensor>& weight,
                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add, double p,
                  const c10::optional<at::Tensor>& seed) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be on the CPU, got ", x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(x.dim() >= 2, op, ": x must be (N, C, *spatial), got ", x.dim(), "-D");
  const int64_t C = x.size(1);
  TORCH_CHECK(num_groups > 0 && C % num_groups == 0, op, ": channels ", C, " are not divisible by num_groups ",
              num_groups);
  for (const auto* pp : {&weight, &bias}) {
    if (pp->has_value()) {
      const auto& t = pp->value();
      TORCH_CHECK(t.device().is_cpu() && t.is_floating_point() && t.dim() == 1 && t.size(0) == C, op,
                  ": weight and bias must be float CPU tensors of shape (", C, "), got ", t.sizes(), " ",
                  t.scalar_type(), " on ", t.device());
    }
  }
  if (add.has_value()) {
    const auto& t = add.value();
    TORCH_CHECK(t.device().is_cpu() && t.is_floating_point() && t.dim() == 2 && t.size(0) == x.size(0) &&
                    t.size(1) == C,
                op, ": add must be a float CPU tensor of shape (", x.size(0), ", ", C, "), got ", t.sizes());
  }
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout p must be in [0, 1), got ", p);
  if (p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->numel() == 1 && seed->scalar_type() == at::kLong && seed->device().is_cpu(),
                op, ": dropout needs a one-element int64 CPU seed tensor");
  }
}

// x for the kernels: bfloat16 as it is (the tasks convert their slices), any other
// dtype as float32; dense in the layout the kernels read
at::Tensor kernel_input(const at::Tensor& x, bool nhwc) {
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return x.scalar_type() == at::kBFloat16 ? x.contiguous(fmt) : as_float(x, nhwc);
}

const uint16_t* bf16_data(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

GnArgs make_args(const at::Tensor& xf, const at::Tensor& w, const at::Tensor& b, const at::Tensor& a,
                 int64_t num_groups, double eps, bool silu, double p, const c10::optional<at::Tensor>& seed) {
  GnArgs args{};
  if (xf.scalar_type() == at::kBFloat16) {
    args.x_bf16 = bf16_data(xf);
  } else {
    args.x = xf.data_ptr<float>();
  }
  args.weight = w.defined() ? w.data_ptr<float>() : nullptr;
  args.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  args.add = a.defined() ? a.data_ptr<float>() : nullptr;
  args.N = xf.size(0);
  args.C = xf.size(1);
  args.G = num_groups;
  args.HW = args.N * args.C == 0 ? 0 : xf.numel() / (args.N * args.C);
  args.eps = eps;
  args.silu = silu;
  args.dropout = p > 0.0;
  if (args.dropout) {
    args.seed = static_cast<uint64_t>(seed->item<int64_t>());
    args.keep_threshold = static_cast<uint32_t>(std::ceil(p * 16777216.0));
    args.drop_scale = static_cast<float>(1.0 / (1.0 - p));
  }
  return args;
}

void run_tasks(const GnArgs& args, bool nhwc, bool backward) {
  const GnKernels& k = pick_kernels();
  if (args.N == 0 || args.HW == 0) return;
  if (nhwc) {
    auto fn = backward ? k.bwd_nhwc : k.fwd_nhwc;
    at::parallel_for(0, args.N, 1, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) fn(args, n);
    });
  } else {
    auto fn = backward ? k.bwd_nchw : k.fwd_nchw;
    const int64_t G = args.G;
    // about 32K elements per chunk: enough work to pay for a thread
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, (args.C / G) * args.HW));
    at::parallel_for(0, args.N * G, grain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) fn(args, i / G, i % G);
    });
  }
}

// a (C,) tensor of `dtype`: column sums of the (N, C) doubles in a fixed order
// (deterministic), or the (N, C) values themselves when sum_rows is false
at::Tensor from_doubles(const double* p, int64_t N, int64_t C, bool sum_rows, at::ScalarType dtype,
                        const at::TensorOptions& opts) {
  auto out = sum_rows ? at::empty({C}, opts.dtype(dtype)) : at::empty({N, C}, opts.dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "group_norm_grad_out", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    if (sum_rows) {
      for (int64_t c = 0; c < C; ++c) {
        double acc = 0.0;
        for (int64_t n = 0; n < N; ++n) acc += p[n * C + c];
        o[c] = static_cast<scalar_t>(acc);
      }
    } else {
      for (int64_t i = 0; i < N * C; ++i) o[i] = static_cast<scalar_t>(p[i]);
    }
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_cpu(
    const at::Tensor& x, int64_t num_groups, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, bool silu, const c10::optional<at::Tensor>& add, double p,
    const c10::optional<at::Tensor>& seed) {
  check_common("group_norm", x, num_groups, weight, bias, add, p, seed);
  TORCH_CHECK(eps > 0.0, "group_norm: eps must be > 0, got ", eps);
  const bool nhwc = is_nhwc(x);
  const auto xf = kernel_input(x, nhwc);
  const bool bf16 = xf.scalar_type() == at::kBFloat16;
  const auto w = param_float(weight), b = param_float(bias), a = param_float(add);
  auto out = cached_empty(xf.sizes(), xf.scalar_type(),
                          nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  auto mean = at::empty({x.size(0), num_groups}, x.options().dtype(at::kDouble));
  auto rstd = at::empty_like(mean);
  GnArgs args = make_args(xf, w, b, a, num_groups, eps, silu, p, seed);
  if (bf16) {
    args.out_bf16 = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  } else {
    args.out = out.data_ptr<float>();
  }
  args.mean = mean.data_ptr<double>();
  args.rstd = rstd.data_ptr<double>();
  run_tasks(args, nhwc, false);
  return {out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type()), mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, bool silu, double p, const c10::optional<at::Tensor>& seed,
    bool weight_grad, bool bias_grad, bool add_grad) {
  check_common("group_norm_backward", x, num_groups, weight, bias, add, p, seed);
  TORCH_CHECK(dy.sizes() == x.sizes(), "group_norm_backward: dy shape ", dy.sizes(), " must equal x shape ",
              x.sizes());
  TORCH_CHECK(dy.device().is_cpu() && dy.is_floating_point(), "group_norm_backward: dy must be a float CPU tensor");
  const int64_t N = x.size(0), C = x.size(1);
  for (const auto* t : {&mean, &rstd}) {
    TORCH_CHECK(t->scalar_type() == at::kDouble && t->dim() == 2 && t->size(0) == N && t->size(1) == num_groups,
                "group_norm_backward: mean and rstd must be float64 (", N, ", ", num_groups, "), got ",
                t->scalar_type(), " ", t->sizes());
  }
  TORCH_CHECK(!weight_grad || weight.has_value(), "group_norm_backward: weight_grad needs a weight");
  TORCH_CHECK(!bias_grad || bias.has_value(), "group_norm_backward: bias_grad needs a bias");
  TORCH_CHECK(!add_grad || add.has_value(), "group_norm_backward: add_grad needs add");
  const bool nhwc = is_nhwc(x);
  // bfloat16 I/O when both x and dy are bfloat16 (autocast); else float32 copies
  const bool bf16 = x.scalar_type() == at::kBFloat16 && dy.scalar_type() == at::kBFloat16;
  const auto xf = bf16 ? kernel_input(x, nhwc) : as_float(x, nhwc);
  const auto dyf = bf16 ? kernel_input(dy, nhwc) : as_float(dy, nhwc);
  const auto w = param_float(weight), b = param_float(bias), a = param_float(add);
  auto mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  auto dx = cached_empty(xf.sizes(), xf.scalar_type(),
                         nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  // per-sample partial sums, one buffer: (N, C) each for dweight, dbias, dadd
  std::vector<double> part(static_cast<size_t>(3 * N * C), 0.0);
  GnArgs args = make_args(xf, w, b, a, num_groups, 1.0, silu, p, seed);
  if (bf16) {
    args.dy_bf16 = bf16_data(dyf);
    args.out_bf16 = reinterpret_cast<uint16_t*>(dx.data_ptr<at::BFloat16>());
  } else {
    args.dy = dyf.data_ptr<float>();
    args.out = dx.data_ptr<float>();
  }
  args.mean = mean_c.data_ptr<double>();
  args.rstd = rstd_c.data_ptr<double>();
  args.dw_part = part.data();
  args.db_part = part.data() + N * C;
  args.dadd = add_grad ? part.data() + 2 * N * C : nullptr;
  run_tasks(args, nhwc, true);  // (empty spatial dims: the zeros stay)
  auto none = [&] { return at::empty({0}, x.options()); };
  const auto o = x.options();
  auto dweight = weight_grad ? from_doubles(args.dw_part, N, C, true, weight->scalar_type(), o) : none();
  auto dbias = bias_grad ? from_doubles(args.db_part, N, C, true, bias->scalar_type(), o) : none();
  auto dadd_out = add_grad ? from_doubles(args.dadd, N, C, false, add->scalar_type(), o) : none();
  return {dx.scalar_type() == x.scalar_type() ? dx : dx.to(x.scalar_type()), dweight, dbias, dadd_out};
}

TORCH_LIBRARY_IMPL(fastddpm_cpp, CPU, m) {
  m.impl("group_norm", &group_norm_cpu);
  m.impl("group_norm_backward", &group_norm_backward_cpu);
}

}  // namespace fastddpm
