// CPU implementations of the diffusion ops: q_sample, simple_loss (L_simple
// with its gradient), p_sample_step (the ancestral update with given noise) and
// sample_step (every sampler's update, with given, drawn or no noise). One pass over the data each; per-sample coefficients are gathered
// from the float64-or-float32 tables on the host, arithmetic in float32
// (double for double), outputs contiguous in the input dtype.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>  // not torch/torch.h: its C++ frontend adds ~7 s to this file's build

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <tuple>
#include <vector>

#include "output_cache.h"

namespace fastddpm {
namespace {

void check_float_cpu(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op, ": ", name,
              " must be a floating tensor, got ", dt);
}

void check_like(const char* op, const char* name, const at::Tensor& y, const at::Tensor& x) {
  TORCH_CHECK(y.sizes() == x.sizes(), op, ": ", name, " shape ", y.sizes(), " must equal ", x.sizes());
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), op, ": ", name, " dtype ", y.scalar_type(), " must equal ",
              x.scalar_type());
  TORCH_CHECK(y.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", y.device());
}

// t as a host int64 vector of length B, each in [0, T)
std::vector<int64_t> timesteps(const char* op, const at::Tensor& t, int64_t B, int64_t T) {
  TORCH_CHECK(t.device().is_cpu(), op, ": t must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": t must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, op, ": t must have shape (", B, ",), got ", t.sizes());
  auto tc = t.contiguous();
  const int64_t* tp = tc.data_ptr<int64_t>();
  std::vector<int64_t> out(tp, tp + B);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(out[b] >= 0 && out[b] < T, op, ": t[", b, "] = ", out[b], " is outside [0, ", T - 1, "]");
  }
  return out;
}

// table[t[b]] for every b, as double
std::vector<double> gather(const char* op, const char* name, const at::Tensor& table, const std::vector<int64_t>& t,
                           int64_t T) {
  TORCH_CHECK(table.device().is_cpu() && table.is_floating_point() && table.dim() == 1 && table.size(0) == T, op,
              ": ", name, " must be a 1-D float CPU tensor of length ", T, ", got ", table.sizes());
  auto d = table.to(at::kDouble).contiguous();
  const double* p = d.data_ptr<double>();
  std::vector<double> out(t.size());
  for (size_t b = 0; b < t.size(); ++b) out[b] = p[t[b]];
  return out;
}

}  // namespace

at::Tensor q_sample_cpu(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& noise,
                        const at::Tensor& sqrt_abar, const at::Tensor& sqrt_one_minus_abar) {
  check_float_cpu("q_sample", "x0", x0);
  check_like("q_sample", "noise", noise, x0);
  TORCH_CHECK(x0.dim() >= 1, "q_sample: x0 needs a batch dimension");
  const int64_t B = x0.size(0), T = sqrt_abar.dim() == 1 ? sqrt_abar.size(0) : -1;
  TORCH_CHECK(T > 0, "q_sample: sqrt_abar must be a non-empty 1-D table");
  const auto tv = timesteps("q_sample", t, B, T);
  const auto ca = gather("q_sample", "sqrt_abar", sqrt_abar, tv, T);
  const auto cs = gather("q_sample", "sqrt_one_minus_abar", sqrt_one_minus_abar, tv, T);
  const int64_t n = B == 0 ? 0 : x0.numel() / B;
  auto xc = x0.contiguous();
  auto nc = noise.contiguous();
  auto out = cached_empty(xc.sizes(), xc.scalar_type(), at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "q_sample_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* np = nc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const acc_t a = static_cast<acc_t>(ca[b]), s = static_cast<acc_t>(cs[b]);
        const scalar_t* __restrict x = xp + b * n;
        const scalar_t* __restrict z = np + b * n;
        scalar_t* __restrict o = op + b * n;
        for (int64_t i = 0; i < n; ++i)
          o[i] = static_cast<scalar_t>(a * static_cast<acc_t>(x[i]) + s * static_cast<acc_t>(z[i]));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> simple_loss_cpu(const at::Tensor& eps_hat, const at::Tensor& noise,
                                                   bool compute_grad) {
  check_float_cpu("simple_loss", "eps_hat", eps_hat);
  check_like("simple_loss", "noise", noise, eps_hat);
  auto ec = eps_hat.contiguous();
  auto nc = noise.contiguous();
  const int64_t numel = ec.numel();
  const bool dbl = ec.scalar_type() == at::kDouble;
  auto grad = compute_grad ? cached_empty(ec.sizes(), ec.scalar_type(), at::MemoryFormat::Contiguous)
                            : at::empty({0}, ec.options());
  // fixed chunks, partial sums in double added in order: the result does not
  // depend on the thread count
  constexpr int64_t kChunk = 16384;
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ec.scalar_type(), "simple_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ep = ec.data_ptr<scalar_t>();
    const scalar_t* np = nc.data_ptr<scalar_t>();
    scalar_t* gp = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    const acc_t gscale = static_cast<acc_t>(2.0 / static_cast<double>(numel > 0 ? numel : 1));
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t i0 = c * kChunk, i1 = std::min(numel, i0 + kChunk);
        constexpr int L = 16;
        acc_t acc[L] = {};
        int64_t i = i0;
        for (; i + L <= i1; i += L)
          for (int j = 0; j < L; ++j) {
            const acc_t d = static_cast<acc_t>(ep[i + j]) - static_cast<acc_t>(np[i + j]);
            acc[j] += d * d;
          }
        for (; i < i1; ++i) {
          const acc_t d = static_cast<acc_t>(ep[i]) - static_cast<acc_t>(np[i]);
          acc[0] += d * d;
        }
        double s = 0.0;
        for (int j = 0; j < L; ++j) s += acc[j];
        partial[c] = s;
        if (gp) {
          for (int64_t k = i0; k < i1; ++k)
            gp[k] = static_cast<scalar_t>(gscale * (static_cast<acc_t>(ep[k]) - static_cast<acc_t>(np[k])));
        }
      }
    });
  });
  double total = 0.0;
  for (double s : partial) total += s;
  const double loss = numel > 0 ? total / static_cast<double>(numel) : std::nan("");
  auto out = at::scalar_tensor(loss, ec.options().dtype(dbl ? at::kDouble : at::kFloat));
  return {out, grad};
}

at::Tensor p_sample_step_cpu(const at::Tensor& x_t, const at::Tensor& t, const at::Tensor& eps,
                             const at::Tensor& sqrt_recip_abar, const at::Tensor& sqrt_recipm1_abar,
                             const at::Tensor& coef1, const at::Tensor& coef2, const at::Tensor& log_var,
                             const at::Tensor& noise, bool clip) {
  const char* op = "p_sample_step";
  check_float_cpu(op, "x_t", x_t);
  check_like(op, "eps", eps, x_t);
  check_like(op, "noise", noise, x_t);
  TORCH_CHECK(x_t.dim() >= 1, op, ": x_t needs a batch dimension");
  const int64_t B = x_t.size(0), T = sqrt_recip_abar.dim() == 1 ? sqrt_recip_abar.size(0) : -1;
  TORCH_CHECK(T > 0, op, ": sqrt_recip_abar must be a non-empty 1-D table");
  const auto tv = timesteps(op, t, B, T);
  const auto ra = gather(op, "sqrt_recip_abar", sqrt_recip_abar, tv, T);
  const auto rm = gather(op, "sqrt_recipm1_abar", sqrt_recipm1_abar, tv, T);
  const auto c1 = gather(op, "coef1", coef1, tv, T);
  const auto c2 = gather(op, "coef2", coef2, tv, T);
  const auto lv = gather(op, "log_var", log_var, tv, T);
  const int64_t n = B == 0 ? 0 : x_t.numel() / B;
  auto xc = x_t.contiguous(), ec = eps.contiguous(), zc = noise.contiguous();
  auto out = cached_empty(xc.sizes(), xc.scalar_type(), at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "p_sample_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* ep = ec.data_ptr<scalar_t>();
    const scalar_t* zp = zc.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    // (sample, chunk) tasks: a batch of one still uses every thread
    constexpr int64_t kChunk = 8192;
    const int64_t per = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
    at::parallel_for(0, B * per, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t b = k / per, i0 = (k % per) * kChunk, i1 = std::min(n, i0 + kChunk);
        // the reference rounds each gathered coefficient to the compute dtype first
        const acc_t a = static_cast<acc_t>(ra[b]), m = static_cast<acc_t>(rm[b]);
        const acc_t k1c = static_cast<acc_t>(c1[b]), k2c = static_cast<acc_t>(c2[b]);
        const acc_t sd = tv[b] == 0 ? acc_t(0) : std::exp(acc_t(0.5) * static_cast<acc_t>(lv[b]));
        const scalar_t* __restrict x = xp + b * n;
        const scalar_t* __restrict e = ep + b * n;
        const scalar_t* __restrict z = zp + b * n;
        scalar_t* __restrict o = op_ + b * n;
        for (int64_t i = i0; i < i1; ++i) {
          const acc_t xv = static_cast<acc_t>(x[i]);
          acc_t x0 = a * xv - m * static_cast<acc_t>(e[i]);
          if (clip) x0 = x0 < acc_t(-1) ? acc_t(-1) : (x0 > acc_t(1) ? acc_t(1) : x0);
          o[i] = static_cast<scalar_t>(k1c * x0 + k2c * xv + sd * static_cast<acc_t>(z[i]));
        }
      }
    });
  });
  return out;
}

namespace {

// The sample_step loops, float32 only and free of torch calls, each compiled
// for AVX-512, AVX2+FMA and baseline x86-64 (GCC picks the copy at load time
// through target_clones).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FASTDDPM_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTDDPM_CLONES
#endif

#define FASTDDPM_INLINE inline __attribute__((always_inline))

// Philox-4x32-10 (Salmon et al. 2011), as reference.philox4x32_ref: the first
// two output words of counter (c0, c1, c2, c3) under key (k0, k1).
FASTDDPM_INLINE void philox_w01(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                                uint32_t& w0, uint32_t& w1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = static_cast<uint64_t>(c2) * 0xCD9E8D57u;
    const uint64_t pa = static_cast<uint64_t>(c0) * 0xD2511F53u;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0, n1 = static_cast<uint32_t>(pb);
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1, n3 = static_cast<uint32_t>(pa);
    c0 = n0, c1 = n1, c2 = n2, c3 = n3;
    k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
  }
  w0 = c0, w1 = c1;
}

FASTDDPM_INLINE float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

FASTDDPM_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// ln(u) for normal u > 0 (here u in (0, 1]): u = m 2^k with m in [sqrt(1/2),
// sqrt(2)), ln(1 + f) from the classic minimax series in s = f / (2 + f)
// (the fdlibm logf scheme, under an ulp). Branch-free so that it vectorises.
FASTDDPM_INLINE float log_pos(float u) {
  uint32_t ix = float_bits(u) + (0x3f800000u - 0x3f3504f3u);
  const float k = static_cast<float>(static_cast<int32_t>(ix >> 23) - 0x7f);
  const float f = bits_float((ix & 0x007fffffu) + 0x3f3504f3u) - 1.0f;
  const float s = f / (2.0f + f), z = s * s, w = z * z;
  const float t1 = w * (0.40000972152f + w * 0.24279078841f);
  const float t2 = z * (0.66666662693f + w * 0.28498786688f);
  const float hfsq = 0.5f * f * f;
  return s * (hfsq + t1 + t2) + k * 9.0580006145e-06f - hfsq + f + k * 6.9313812256e-01f;
}

// sqrt(a) for finite a >= 0 to about an ulp: a * rsqrt(a), the reciprocal root
// from the bit-level estimate (3.4% off) and three Newton steps (std::sqrt keeps an errno
// branch that stops GCC vectorising the loop; a = 0 gives 0)
FASTDDPM_INLINE float sqrt_nonneg(float a) {
  float y = bits_float(0x5f3759dfu - (float_bits(a) >> 1));
  y = y * (1.5f - 0.5f * a * y * y);
  y = y * (1.5f - 0.5f * a * y * y);
  y = y * (1.5f - 0.5f * a * y * y);
  return a * y;
}

// cos(2 pi u) for u in [0, 1]: 4u = q + r exactly (q integer, |r| <= 1/2), then
// the sine or cosine series of r pi / 2 on [-pi/4, pi/4] by quadrant q mod 4.
FASTDDPM_INLINE float cos_2pi(float u) {
  const float v = 4.0f * u;
  const float q = static_cast<float>(static_cast<int32_t>(v + 0.5f));  // v >= 0: truncation is floor
  const float x = (v - q) * 1.57079632679489662f, x2 = x * x;
  const float sn = x + x * x2 * (-1.6666654611e-1f + x2 * (8.3321608736e-3f + x2 * -1.9515295891e-4f));
  const float cs = 1.0f - 0.5f * x2 + x2 * x2 * (4.166664568298827e-2f + x2 * (-1.388731625493765e-3f +
                                                                                x2 * 2.443315711809948e-5f));
  const int32_t qi = static_cast<int32_t>(q) & 3;
  const float val = (qi & 1) ? sn : cs;
  return (qi == 1 || qi == 2) ? -val : val;
}

// z[i] for element j0 + i of sample counter c1: reference.philox_normal_ref's
// Philox words exactly, Box-Muller to float32 rounding
FASTDDPM_CLONES void philox_normal(float* __restrict z, int64_t len, uint32_t j0, uint32_t c1, uint32_t o0,
                                   uint32_t o1, uint32_t k0, uint32_t k1) {
  for (int64_t i = 0; i < len; ++i) {
    uint32_t w0, w1;
    philox_w01(j0 + static_cast<uint32_t>(i), c1, o0, o1, k0, k1, w0, w1);
    const float u1 = (static_cast<float>(static_cast<int32_t>(w0 >> 8)) + 0.5f) * (1.0f / 16777216.0f);
    const float u2 = (static_cast<float>(static_cast<int32_t>(w1 >> 8)) + 0.5f) * (1.0f / 16777216.0f);
    z[i] = sqrt_nonneg(-2.0f * log_pos(u1)) * cos_2pi(u2);
  }
}

constexpr int kMaxHistory = 4;  // reference.MAX_HISTORY
constexpr int kNumCoefs = 11;   // reference.SAMPLER_COEFS

struct StepCoefs {
  float a_x, a_e, c_x, c_0, c[kMaxHistory], h_x, h_0, sigma;
};

// out = c_x x + c_0 x0 + sum_j c_j hist[j] (+ sigma z), x0 = clip(a_x x - a_e e),
// h_out = h_x x + h_0 x0 (when k > 0); z, x0_out may be null. The history terms are
// added in the reference's order (j = 1 .. k).
FASTDDPM_CLONES void step_update(const StepCoefs& c, const float* __restrict x, const float* __restrict e,
                                 int k, const float* const* hist, const float* __restrict z,
                                 float* __restrict out, float* __restrict x0_out, float* __restrict h_out,
                                 int64_t len, bool clip) {
  const float lo = clip ? -1.0f : -INFINITY, hi = clip ? 1.0f : INFINITY;
  const float a_x = c.a_x, a_e = c.a_e, c_x = c.c_x, c_0 = c.c_0, h_x = c.h_x, h_0 = c.h_0, sigma = c.sigma;
  for (int64_t i = 0; i < len; ++i) {
    float v = a_x * x[i] - a_e * e[i];
    v = v < lo ? lo : (v > hi ? hi : v);
    if (x0_out) x0_out[i] = v;
    out[i] = c_x * x[i] + c_0 * v;
  }
  for (int j = 0; j < k; ++j) {
    const float cj = c.c[j];
    const float* __restrict p = hist[j];
    for (int64_t i = 0; i < len; ++i) out[i] += cj * p[i];
  }
  if (k > 0) {
    for (int64_t i = 0; i < len; ++i) {
      float v = a_x * x[i] - a_e * e[i];
      v = v < lo ? lo : (v > hi ? hi : v);
      h_out[i] = h_x * x[i] + h_0 * v;
    }
  }
  if (z)
    for (int64_t i = 0; i < len; ++i) out[i] += sigma * z[i];
}

// src[i0, i0 + n) of a float tensor as float32: a pointer into it for float32,
// else converted into buf
const float* as_float(const at::Tensor& t, int64_t i0, int64_t n, float* __restrict buf) {
  if (t.scalar_type() == at::kFloat) return t.const_data_ptr<float>() + i0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "sample_step_load", [&] {
    const scalar_t* __restrict s = t.const_data_ptr<scalar_t>() + i0;
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(s[i]);
  });
  return buf;
}

template <typename scalar_t>
void store(const float* __restrict src, int64_t n, scalar_t* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

}  // namespace

// reference.sample_step_ref for float32 / float16 / bfloat16 x_t (eps and noise
// of any of those dtypes): float32 math in chunks; each chunk's inputs are read
// into float32 buffers, combined, and written out in x_t's dtype; this step's
// prediction goes into the history ring in place. With rng the noise is drawn
// here: Philox-4x32-10 words as in reference.philox_normal_ref (bit-exact),
// Box-Muller in float32 with vectorisable ln / cos series (within a few float32
// ulps of the reference's normals).
std::tuple<at::Tensor, at::Tensor> sample_step_cpu(const at::Tensor& x_t, const at::Tensor& eps,
                                                   const at::Tensor& table, const at::Tensor& step,
                                                   const c10::optional<at::Tensor>& history,
                                                   const c10::optional<at::Tensor>& noise,
                                                   const c10::optional<at::Tensor>& rng, bool clip, bool write_x0) {
  const char* op = "sample_step";
  const auto dt = x_t.scalar_type();
  TORCH_CHECK(x_t.device().is_cpu(), op, ": x_t must be on the CPU, got ", x_t.device());
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": x_t must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(x_t.dim() >= 1, op, ": x_t needs a batch dimension");
  auto check_in = [&](const char* name, const at::Tensor& y, bool same_dtype) {
    TORCH_CHECK(y.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", y.device());
    TORCH_CHECK(y.sizes() == x_t.sizes(), op, ": ", name, " shape ", y.sizes(), " must equal x_t's ", x_t.sizes());
    const auto yt = y.scalar_type();
    TORCH_CHECK(yt == at::kFloat || yt == at::kHalf || yt == at::kBFloat16, op, ": ", name,
                " must be float32, float16 or bfloat16, got ", yt);
    TORCH_CHECK(!same_dtype || yt == dt, op, ": ", name, " dtype ", yt, " must equal x_t's ", dt);
  };
  check_in("eps", eps, false);
  int64_t R = 0;  // ring slots (K + 1), 0 without history
  if (history.has_value()) {
    const auto& h = *history;
    TORCH_CHECK(h.device().is_cpu() && h.dim() == x_t.dim() + 1 && h.size(0) >= 2 && h.size(0) <= kMaxHistory + 1 &&
                    h.is_contiguous() && h.scalar_type() == dt,
                op, ": history must be a contiguous (K + 1, *x_t.shape) CPU ring in x_t's dtype, K in [1, ",
                kMaxHistory, "], got ", h.sizes(), " ", h.scalar_type());
    check_in("history[0]", h.select(0, 0), true);
    R = h.size(0);
  }
  TORCH_CHECK(!(noise.has_value() && rng.has_value()), op, ": give noise or rng, not both");
  if (noise.has_value()) check_in("noise", *noise, false);
  TORCH_CHECK(table.device().is_cpu() && table.is_floating_point() && table.dim() == 2 &&
                  table.size(1) == kNumCoefs && table.size(0) >= 1,
              op, ": table must be a (S, 11) float CPU tensor, got ", table.sizes(), " ", table.scalar_type());
  TORCH_CHECK(step.device().is_cpu() && step.scalar_type() == at::kLong && step.numel() == 1, op,
              ": step must be a one-element int64 CPU tensor");
  const int64_t s = step.reshape({}).item<int64_t>();
  TORCH_CHECK(s >= 0 && s < table.size(0), op, ": step ", s, " is outside [0, ", table.size(0) - 1, "]");
  // the row rounded to float32 straight from the table's dtype, as the reference
  const auto row = table.select(0, s).to(at::kFloat).contiguous();
  const float* cf = row.const_data_ptr<float>();
  StepCoefs coefs{cf[0], cf[1], cf[2], cf[3], {cf[4], cf[5], cf[6], cf[7]}, cf[8], cf[9], cf[10]};
  const int64_t B = x_t.size(0), n = B == 0 ? 0 : x_t.numel() / B;
  uint32_t k0 = 0, k1 = 0, o0 = 0, o1 = 0;
  uint64_t first = 0;
  if (rng.has_value()) {
    TORCH_CHECK(rng->device().is_cpu() && rng->scalar_type() == at::kLong && rng->numel() == 3, op,
                ": rng must be a (3,) int64 CPU tensor");
    TORCH_CHECK(n < (int64_t(1) << 32), op, ": in-kernel noise needs fewer than 2^32 elements per sample, got ", n);
    const auto rc = rng->contiguous();
    const int64_t* r = rc.const_data_ptr<int64_t>();
    const uint64_t key = static_cast<uint64_t>(r[0]), off = static_cast<uint64_t>(r[1]);
    k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
    o0 = static_cast<uint32_t>(off), o1 = static_cast<uint32_t>(off >> 32);
    first = static_cast<uint64_t>(r[2]);
  }
  const auto xc = x_t.contiguous(), ec = eps.contiguous();
  const auto zc = noise.has_value() ? noise->contiguous() : at::Tensor();
  auto out = cached_empty(x_t.sizes(), x_t.scalar_type(), at::MemoryFormat::Contiguous);
  auto x0_out = write_x0 ? cached_empty(x_t.sizes(), x_t.scalar_type(), at::MemoryFormat::Contiguous)
                         : at::empty({0}, x_t.options());
  const int k = R > 0 ? static_cast<int>(R - 1) : 0;
  // H_{s-j} in slot (s - j) mod R (j = 1 .. k); H_s goes to slot s mod R, which none of them is
  int64_t read_slot[kMaxHistory] = {};
  for (int j = 1; j <= k; ++j) read_slot[j - 1] = ((s - j) % R + R) % R;
  const int64_t write_slot = R > 0 ? s % R : 0, slot_elems = B * n;
  const bool has_z = zc.defined(), draw = rng.has_value();
  constexpr int64_t kChunk = 2048;
  const int64_t per = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "sample_step_cpu", [&] {
    constexpr bool f32 = std::is_same_v<scalar_t, float>;
    scalar_t* op_ = out.data_ptr<scalar_t>();
    scalar_t* x0p = write_x0 ? x0_out.data_ptr<scalar_t>() : nullptr;
    scalar_t* hp = R > 0 ? history->data_ptr<scalar_t>() : nullptr;
    // (sample, chunk) tasks: a batch of one still uses every thread
    at::parallel_for(0, B * per, 1, [&](int64_t t0, int64_t t1) {
      alignas(64) float xb[kChunk], eb[kChunk], zb[kChunk], ob[kChunk], x0b[kChunk], hb[kChunk];
      alignas(64) float pb[kMaxHistory][kChunk];
      for (int64_t q = t0; q < t1; ++q) {
        const int64_t b = q / per, j0 = (q % per) * kChunk, len = std::min(n, j0 + kChunk) - j0;
        const int64_t i0 = b * n + j0;
        const float* x = as_float(xc, i0, len, xb);
        const float* e = as_float(ec, i0, len, eb);
        const float* hist[kMaxHistory] = {};
        for (int j = 0; j < k; ++j) {
          if constexpr (f32) {
            hist[j] = reinterpret_cast<const float*>(hp) + read_slot[j] * slot_elems + i0;
          } else {
            const scalar_t* src = hp + read_slot[j] * slot_elems + i0;
            for (int64_t i = 0; i < len; ++i) pb[j][i] = static_cast<float>(src[i]);
            hist[j] = pb[j];
          }
        }
        const float* z = has_z ? as_float(zc, i0, len, zb) : nullptr;
        if (draw) {
          philox_normal(zb, len, static_cast<uint32_t>(j0), static_cast<uint32_t>(first + static_cast<uint64_t>(b)),
                        o0, o1, k0, k1);
          z = zb;
        }
        float* o = ob;
        float* x0o = x0p ? x0b : nullptr;
        float* ho = hb;
        if constexpr (f32) {  // write straight into the outputs
          o = reinterpret_cast<float*>(op_ + i0);
          x0o = x0p ? reinterpret_cast<float*>(x0p + i0) : nullptr;
          if (k > 0) ho = reinterpret_cast<float*>(hp) + write_slot * slot_elems + i0;
        }
        step_update(coefs, x, e, k, hist, z, o, x0o, ho, len, clip);
        if constexpr (!f32) {
          store(ob, len, op_ + i0);
          if (x0p) store(x0b, len, x0p + i0);
          if (k > 0) store(hb, len, hp + write_slot * slot_elems + i0);
        }
      }
    });
  });
  return {out, x0_out};
}

TORCH_LIBRARY_IMPL(fastddpm_cpp, CPU, m) {
  m.impl("q_sample", &q_sample_cpu);
  m.impl("simple_loss", &simple_loss_cpu);
  m.impl("p_sample_step", &p_sample_step_cpu);
  m.impl("sample_step", &sample_step_cpu);
}

}  // namespace fastddpm
