// Schemas for every fastddpm C++ op, declared once. Implementations register
// per device in cpu/*.cpp and cuda/*.cu.
#include <Python.h>
#include <torch/library.h>

// Importing fastddpm._C only runs the registrations below; no Python API.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fastddpm_cpp, m) {
  // x_t = sqrt_abar[t[b]] * x0 + sqrt_one_minus_abar[t[b]] * noise, per sample b.
  m.def("q_sample(Tensor x0, Tensor t, Tensor noise, Tensor sqrt_abar, Tensor sqrt_one_minus_abar) -> Tensor");
}
