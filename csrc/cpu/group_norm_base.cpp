// The GroupNorm kernels for any CPU (baseline instruction set).
#include <cstdint>

#include "group_norm_kernel.h"

namespace fastddpm {
namespace gn_base {
#include "group_norm_kernel.inc"
}  // namespace gn_base
}  // namespace fastddpm
