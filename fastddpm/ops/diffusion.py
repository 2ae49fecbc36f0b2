"""Diffusion ops: q_sample, L_simple and the ancestral sampler step.

Coefficient tables are 1-D tensors of length T on the inputs' device (any float
dtype; GaussianDiffusion keeps them in float64); each sample's coefficients are
gathered by its t. Callers (GaussianDiffusion) check t's shape and range.
"""
import torch

from fastddpm import reference
from fastddpm.ops import _backend
from fastddpm.ops._checks import check_float, check_same, check_table


def _check_batch(x, t):
    if x.dim() < 1:
        raise ValueError("expected a batched tensor (B, ...)")
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != (x.shape[0],):
        raise ValueError(f"t must be an int64 tensor of shape ({x.shape[0]},), got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if t.device != x.device:
        raise ValueError(f"t is on {t.device}, x on {x.device}")


def q_sample(x0, t, noise, sqrt_abar, sqrt_one_minus_abar):
    """x_t = sqrt_abar[t] * x0 + sqrt_one_minus_abar[t] * noise, per sample."""
    check_float("x0", x0)
    check_same("noise", noise, "x0", x0)
    _check_batch(x0, t)
    check_table("sqrt_abar", sqrt_abar, x0.device)
    check_table("sqrt_one_minus_abar", sqrt_one_minus_abar, x0.device)
    return _backend.pick("q_sample", x0.device)(x0, t, noise, sqrt_abar, sqrt_one_minus_abar)


def simple_loss(eps_hat, noise):
    """L_simple = mean((noise - eps_hat)^2), a float32 scalar (float64 for float64)."""
    check_float("eps_hat", eps_hat)
    check_same("noise", noise, "eps_hat", eps_hat)
    return _backend.pick("simple_loss", eps_hat.device)(eps_hat, noise)


def p_sample_step(x_t, t, eps, sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var,
                  noise, clip=True):
    """x_{t-1} from x_t and eps_hat: see reference.p_sample_step_ref. No noise at t == 0."""
    check_float("x_t", x_t)
    check_same("eps", eps, "x_t", x_t)
    check_same("noise", noise, "x_t", x_t)
    _check_batch(x_t, t)
    for name, tab in (("sqrt_recip_abar", sqrt_recip_abar), ("sqrt_recipm1_abar", sqrt_recipm1_abar),
                      ("coef1", coef1), ("coef2", coef2), ("log_var", log_var)):
        check_table(name, tab, x_t.device)
    return _backend.pick("p_sample_step", x_t.device)(
        x_t, t, eps, sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var, noise, clip)


def _q_sample_cpp(x0, t, noise, sqrt_abar, sqrt_one_minus_abar):
    if x0.requires_grad or noise.requires_grad:  # the C++ op has no autograd
        return reference.q_sample_ref(x0, t, noise, sqrt_abar, sqrt_one_minus_abar)
    return torch.ops.fastddpm_cpp.q_sample(x0, t, noise, sqrt_abar, sqrt_one_minus_abar)


_backend.register("q_sample", "reference", reference.q_sample_ref)
_backend.register("q_sample", "cpp", _q_sample_cpp)
_backend.register("simple_loss", "reference", reference.simple_loss_ref)
_backend.register("p_sample_step", "reference", reference.p_sample_step_ref)
