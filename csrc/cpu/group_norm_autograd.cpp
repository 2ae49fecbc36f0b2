// Autograd of fastddpm_cpp::group_norm, in C++ at the Autograd dispatch key.
// Forward and backward call the ops through the dispatcher below autograd, so
// the CPU kernels run in eager mode and torch.compile's fake tensors reach the
// fake implementations (fastddpm/ops/_cpp.py). In Python (register_autograd or
// an autograd.Function) the same wiring cost ~60 us a call, forward and
// backward together: more than the kernels themselves at the tiny UNet's sizes.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace fastddpm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Tensor3 forward_op(const at::Tensor& x, int64_t G, const OptTensor& w, const OptTensor& b, double eps, bool silu,
                   const OptTensor& add, double p, const OptTensor& seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastddpm_cpp::group_norm", "")
                       .typed<Tensor3(const at::Tensor&, int64_t, const OptTensor&, const OptTensor&, double, bool,
                                      const OptTensor&, double, const OptTensor&)>();
  return op.call(x, G, w, b, eps, silu, add, p, seed);
}

Tensor4 backward_op(const at::Tensor& dy, const at::Tensor& x, const OptTensor& w, const OptTensor& b,
                    const OptTensor& add, const at::Tensor& mean, const at::Tensor& rstd, int64_t G, bool silu,
                    double p, const OptTensor& seed, bool wg, bool bg, bool ag) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastddpm_cpp::group_norm_backward", "")
                       .typed<Tensor4(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                      const OptTensor&, const at::Tensor&, const at::Tensor&, int64_t, bool, double,
                                      const OptTensor&, bool, bool, bool)>();
  return op.call(dy, x, w, b, add, mean, rstd, G, silu, p, seed, wg, bg, ag);
}

OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); }

class GroupNormFunction : public torch::autograd::Function<GroupNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, int64_t G, const OptTensor& w,
                               const OptTensor& b, double eps, bool silu, const OptTensor& add, double p,
                               const OptTensor& seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = forward_op(x, G, w, b, eps, silu, add, p, seed);
    ctx->mark_non_differentiable({mean, rstd});
    const at::Tensor none;
    ctx->save_for_backward({x, w.value_or(none), b.value_or(none), add.value_or(none), mean, rstd,
                            seed.value_or(none)});
    // gradient edges exist only for the tensors given (x always first)
    int64_t edge = 1;
    ctx->saved_data["w_edge"] = w.has_value() ? edge++ : -1;
    ctx->saved_data["b_edge"] = b.has_value() ? edge++ : -1;
    ctx->saved_data["add_edge"] = add.has_value() ? edge++ : -1;
    ctx->saved_data["G"] = G;
    ctx->saved_data["silu"] = silu;
    ctx->saved_data["p"] = p;
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    auto needs = [&](const char* key) {
      const int64_t e = ctx->saved_data[key].toInt();
      return e >= 0 && ctx->needs_input_grad(static_cast<size_t>(e));
    };
    const bool wg = needs("w_edge"), bg = needs("b_edge"), ag = needs("add_edge");
    auto [dx, dw, db, da] =
        backward_op(grads[0], s[0], opt(s[1]), opt(s[2]), opt(s[3]), s[4], s[5], ctx->saved_data["G"].toInt(),
                    ctx->saved_data["silu"].toBool(), ctx->saved_data["p"].toDouble(), opt(s[6]), wg, bg, ag);
    const at::Tensor none;
    // one gradient per forward argument: (x, G, weight, bias, eps, silu, add, p, seed)
    return {ctx->needs_input_grad(0) ? dx : none, none, wg ? dw : none, bg ? db : none, none, none,
            ag ? da : none, none, none};
  }
};

Tensor3 group_norm_autograd(const at::Tensor& x, int64_t G, const OptTensor& w, const OptTensor& b, double eps,
                            bool silu, const OptTensor& add, double p, const OptTensor& seed) {
  auto out = GroupNormFunction::apply(x, G, w, b, eps, silu, add, p, seed);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastddpm_cpp, Autograd, m) { m.impl("group_norm", &group_norm_autograd); }

}  // namespace fastddpm
