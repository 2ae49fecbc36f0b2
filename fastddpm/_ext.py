"""Loads the optional C++ extension fastddpm._C. A missing or broken build never
breaks `import fastddpm`: the error is kept and reported by
`fastddpm.ops.available_backends`."""
import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

_error = None
try:
    from fastddpm import _C  # noqa: F401  (import runs the TORCH_LIBRARY registrations)
except Exception as e:  # ImportError, or an undefined symbol from an ABI mismatch
    _error = f"{type(e).__name__}: {e}"


def has_extension() -> bool:
    return _error is None


def extension_error():
    """Why fastddpm._C could not be loaded, or None when it is loaded."""
    return _error


if _error is None:
    @torch.library.register_fake("fastddpm_cpp::q_sample")
    def _q_sample_fake(x0, t, noise, sqrt_abar, sqrt_one_minus_abar):
        torch._check(noise.shape == x0.shape, lambda: "q_sample: noise shape must equal x0 shape")
        torch._check(t.dim() == 1 and t.shape[0] == x0.shape[0], lambda: "q_sample: t must be (B,)")
        return torch.empty_like(x0, memory_format=torch.contiguous_format)
