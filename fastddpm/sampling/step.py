"""One denoising step: the state a sampler keeps on the device and the step that
advances it (network forward + the one fused update ops.sample_step).

One step: t = timesteps[step]; out = model(x, t) (eps_hat, or x0_hat / v_hat
for an x0 / v network: the table's a_x, a_e columns read it); x = sample_step(x, out,
table[step], history, z(rng)) (which also writes this step's prediction into
the history ring); step += 1; rng.offset += 1. All of it reads and writes device
tensors only, so one captured step replays for every step with no host
synchronisation (fastddpm.sampling.graphs). A plan with dynamic thresholding
rescales the network output before the update (dynamic_threshold), so the
fused update itself is the same for every plan.
"""
from dataclasses import dataclass

import torch

from fastddpm import ops, reference
from fastddpm.runtime import autocast


@dataclass
class StepState:
    """Everything one denoising step reads and writes, on the device (fixed
    addresses: a CUDA graph captures them)."""
    x: torch.Tensor            # (B, C, H, W) float32, the current sample
    history: torch.Tensor      # (K + 1, B, C, H, W) ring of past predictions (plan.history = K > 0), else (0,)
    step: torch.Tensor         # (1,) int64: the table row of the next step
    rng: torch.Tensor          # (3,) int64: Philox key (seed), offset, first sample index
    health: torch.Tensor       # (1,) float32: running sum of the network outputs (NaN/inf stick)
    table: torch.Tensor        # (N, 11) float64 coefficients
    timesteps: torch.Tensor    # (N,) int64 network timesteps
    stochastic: bool           # whether steps add noise (else no Philox work)
    threshold: float = 0.0     # dynamic-thresholding quantile (plan.threshold), 0: plain clipping

    @classmethod
    def allocate(cls, plan, shape, device):
        ring = (plan.history + 1, *shape) if plan.history else (0,)
        return cls(x=torch.empty(shape, device=device),
                   history=torch.zeros(ring, device=device),
                   step=torch.zeros(1, dtype=torch.int64, device=device),
                   rng=torch.zeros(3, dtype=torch.int64, device=device),
                   health=torch.zeros(1, dtype=torch.float32, device=device),
                   table=plan.table.to(device),
                   timesteps=torch.tensor(plan.timesteps, dtype=torch.int64, device=device),
                   stochastic=plan.stochastic, threshold=plan.threshold)

    def reset(self, seed, first_sample):
        """Start a batch: x = x_T from (seed, first_sample) at offset 0, step 0, an
        empty (zero: the first rows give it weight 0, and 0 * 0 stays finite) history."""
        self.rng.copy_(torch.tensor([seed, 0, first_sample], dtype=torch.int64))
        self.x.copy_(reference.philox_normal_ref(self.rng, tuple(self.x.shape)))
        self.rng[1:2].fill_(1)
        self.step.zero_()
        self.history.zero_()
        self.health.zero_()


def denoise_step(model, state, precision, clip):
    """One step of the plan held in `state`, in place; no host synchronisation."""
    x = state.x
    t = state.timesteps.index_select(0, state.step).expand(x.shape[0])
    # cache_enabled=False: no cast cache kept across a CUDA-graph capture
    with autocast(x.device, precision, cache_enabled=False):
        eps = model(x, t)
    if eps.shape != x.shape:
        raise ValueError(f"model output has shape {tuple(eps.shape)}, expected {tuple(x.shape)}")
    state.health.add_(eps.detach().sum(dtype=torch.float32))
    eps = eps.detach()
    if state.threshold:
        if not clip:
            raise ValueError("dynamic thresholding needs clipping on (clip=True)")
        eps = dynamic_threshold(x, eps, state.table, state.step, state.threshold)
    x_next, _ = ops.sample_step(x, eps, state.table, state.step,
                                state.history if state.history.numel() else None,
                                rng=state.rng if state.stochastic else None, clip=clip,
                                check_range=False)   # step built here
    x.copy_(x_next)
    state.step.add_(1)
    state.rng[1:2].add_(1)


def dynamic_threshold(x, out, table, step, p):
    """The network output out' for which the fused update's clipped x0_hat is
    Imagen's dynamic threshold of x0_hat = a_x x - a_e out (Saharia et al. 2022):
    per sample s = max(1, the p-quantile of |x0_hat|, interpolated linearly as
    torch.quantile), x0_hat -> clamp(x0_hat, -s, s) / s. The update computes
    a_x x - a_e out' = x0_hat / s and clamps it to [-1, 1], which is that. A sort
    instead of torch.quantile: no size limit, no host synchronisation. float32
    (float64 for float64 x)."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    row = table.index_select(0, step).to(cd)[0]
    a_x, a_e = row[0], row[1]
    xc = x.to(cd)
    x0 = a_x * xc - a_e * out.to(cd)
    flat = x0.abs().flatten(1).sort(dim=1).values
    pos = p * (flat.shape[1] - 1)
    lo = int(pos)
    hi = min(lo + 1, flat.shape[1] - 1)
    q = flat[:, lo] + (pos - lo) * (flat[:, hi] - flat[:, lo])
    s = q.clamp(min=1.0).view(-1, *([1] * (x.dim() - 1)))
    return (a_x * xc - x0 / s) / a_e
