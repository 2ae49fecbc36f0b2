"""Test helpers: tolerances in one place and the relative-error check."""
import torch

# ||out - ref|| / ||ref|| bounds against a float64 reference, per dtype.
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-2, torch.bfloat16: 1e-2}

HAS_CUDA = torch.cuda.is_available()


def rel_err(out, ref):
    """||out - ref|| / ||ref|| computed in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_close_rel(out, ref, dtype, name="output", tol=None):
    tol = REL_TOL[dtype] if tol is None else tol
    err = rel_err(out, ref)
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.1e} ({dtype})"
