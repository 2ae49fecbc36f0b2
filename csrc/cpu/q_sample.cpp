// CPU implementation of fastddpm_cpp::q_sample: one pass over x0 and noise,
// coefficients gathered per sample, arithmetic in float (double for double).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

namespace fastddpm {

at::Tensor q_sample_cpu(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& noise,
                        const at::Tensor& sqrt_abar, const at::Tensor& sqrt_one_minus_abar) {
  TORCH_CHECK(x0.device().is_cpu(), "q_sample_cpu: x0 must be on the CPU, got ", x0.device());
  TORCH_CHECK(x0.sizes() == noise.sizes(), "q_sample: noise shape ", noise.sizes(),
              " must equal x0 shape ", x0.sizes());
  TORCH_CHECK(x0.scalar_type() == noise.scalar_type(), "q_sample: noise dtype ", noise.scalar_type(),
              " must equal x0 dtype ", x0.scalar_type());
  TORCH_CHECK(x0.dim() >= 1, "q_sample: x0 needs a batch dimension");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x0.size(0), "q_sample: t must have shape (", x0.size(0),
              ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kLong, "q_sample: t must be int64, got ", t.scalar_type());
  TORCH_CHECK(sqrt_abar.dim() == 1 && sqrt_one_minus_abar.sizes() == sqrt_abar.sizes(),
              "q_sample: coefficient tables must be 1-D and of equal length");
  const int64_t T = sqrt_abar.size(0);
  const int64_t B = x0.size(0);
  const int64_t n = B == 0 ? 0 : x0.numel() / B;
  auto xc = x0.contiguous();
  auto nc = noise.contiguous();
  auto tc = t.contiguous();
  auto out = at::empty_like(xc);
  const int64_t* tp = tc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(tp[b] >= 0 && tp[b] < T, "q_sample: t[", b, "] = ", tp[b], " is outside [0, ", T - 1, "]");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "q_sample_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto a = sqrt_abar.to(at::kDouble).contiguous();
    auto s = sqrt_one_minus_abar.to(at::kDouble).contiguous();
    const double* ap = a.data_ptr<double>();
    const double* sp = s.data_ptr<double>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* np = nc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const acc_t ca = static_cast<acc_t>(ap[tp[b]]);
        const acc_t cs = static_cast<acc_t>(sp[tp[b]]);
        const int64_t base = b * n;
        for (int64_t i = 0; i < n; ++i) {
          op[base + i] = static_cast<scalar_t>(ca * static_cast<acc_t>(xp[base + i]) +
                                               cs * static_cast<acc_t>(np[base + i]));
        }
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(fastddpm_cpp, CPU, m) { m.impl("q_sample", &q_sample_cpu); }

}  // namespace fastddpm
