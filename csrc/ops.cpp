// Schemas for every fastddpm C++ op, declared once (namespace fastddpm_cpp).
// CPU implementations register in cpu/*.cpp; group_norm's autograd too
// (cpu/group_norm_autograd.cpp); fake implementations and the other ops'
// autograd are in Python (fastddpm/ops/_cpp.py).
#include <Python.h>
#include <torch/library.h>

// Importing fastddpm._C only runs the registrations below; no Python API.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fastddpm_cpp, m) {
  // GroupNorm(num_groups) of x + add[:, :, None...] (add: (N, C) or None), then
  // SiLU if silu, then dropout with probability p from the counter-based mask of
  // seed (a one-element int64 tensor; needed when p > 0). Returns (y in x's dtype
  // and layout, mean (N, G) float64, rstd (N, G) float64).
  m.def("group_norm(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, bool silu, "
        "Tensor? add, float p, Tensor? seed) -> (Tensor, Tensor, Tensor)");
  // The backward of group_norm: (dx, dweight, dbias, dadd); a gradient not asked
  // for comes back as an empty (0,) tensor.
  m.def("group_norm_backward(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor? add, Tensor mean, "
        "Tensor rstd, int num_groups, bool silu, float p, Tensor? seed, bool weight_grad, bool bias_grad, "
        "bool add_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // x_t = sqrt_abar[t[b]] * x0 + sqrt_one_minus_abar[t[b]] * noise, per sample b.
  m.def("q_sample(Tensor x0, Tensor t, Tensor noise, Tensor sqrt_abar, Tensor sqrt_one_minus_abar) -> Tensor");
  // (mean((noise - eps_hat)^2) as a float32 scalar (float64 for float64),
  //  d loss / d eps_hat = 2 (eps_hat - noise) / numel if compute_grad else an empty (0,) tensor)
  m.def("simple_loss(Tensor eps_hat, Tensor noise, bool compute_grad) -> (Tensor, Tensor)");
  // One ancestral step with the given noise: see fastddpm.reference.p_sample_step_ref.
  m.def("p_sample_step(Tensor x_t, Tensor t, Tensor eps, Tensor sqrt_recip_abar, Tensor sqrt_recipm1_abar, "
        "Tensor coef1, Tensor coef2, Tensor log_var, Tensor noise, bool clip) -> Tensor");
  // One step of any sampler: see fastddpm.reference.sample_step_ref. Returns
  // (x_next, x0_hat if write_x0 else an empty (0,) tensor), contiguous in x_t's dtype,
  // and writes this step's prediction into the history ring (in place).
  m.def("sample_step(Tensor x_t, Tensor eps, Tensor table, Tensor step, Tensor(a!)? history, Tensor? noise, "
        "Tensor? rng, bool clip, bool write_x0) -> (Tensor, Tensor)");
  // The CPU ops' output block cache (cpu/output_cache.h): (bytes held, hits,
  // misses, limit in bytes), and a call that hands every held block back.
  m.def("cpu_cache_stats() -> (int, int, int, int)");
  m.def("cpu_empty_cache() -> ()");
}
