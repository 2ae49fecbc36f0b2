"""DDIM and DPM-Solver++(2M) trajectories against diffusers' DDIMScheduler and
DPMSolverMultistepScheduler (an implementation we did not write) on the same
timesteps, from the same x_T, with the exact eps of a Gaussian data law as the
network: every intermediate x through ops.sample_step and the plan's table, and
the final sample of fastddpm.sampling.sample_batch."""
import types

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastddpm import GaussianDiffusion, ops, reference  # noqa: E402
from fastddpm.sampling import make_plan, sample_batch  # noqa: E402
from _util import rel_err  # noqa: E402

SHAPE = (3, 4, 4)
S = 0.5


class GaussianEps(torch.nn.Module):
    """E[eps | x_t] for data N(mu, S^2 I): sqrt(1 - abar) (x - sqrt(abar) mu) / (abar S^2 + 1 - abar)."""

    def __init__(self, abar, mu):
        super().__init__()
        self.abar, self.mu = abar, mu
        self.config = types.SimpleNamespace(in_channels=SHAPE[0], image_size=SHAPE[1])
        self.anchor = torch.nn.Parameter(torch.zeros(()))    # gives the sampler a device

    def forward(self, x, t):
        a = self.abar[t].view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x.double() - a.sqrt() * self.mu) / (a * S ** 2 + 1 - a)
        return eps.to(x.dtype)


def _scheduler(sampler, d, plan):
    betas = d.betas.numpy()
    if sampler == "ddim":
        sch = diffusers.DDIMScheduler(num_train_timesteps=d.num_timesteps, trained_betas=betas, clip_sample=True,
                                      set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
        sch.set_timesteps(len(plan.timesteps))
    else:
        # first order in the first step, second order after, first order into sigma = 0 (final_sigmas_type
        # "zero"): lower_order_final=False keeps diffusers from also dropping the next-to-last step to
        # first order below 15 steps (our plan is second order there)
        sch = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=d.num_timesteps, trained_betas=betas,
                                                    algorithm_type="dpmsolver++", solver_order=2,
                                                    solver_type="midpoint", lower_order_final=False,
                                                    final_sigmas_type="zero", thresholding=False)
        sch.set_timesteps(timesteps=list(plan.timesteps))
    assert [int(t) for t in sch.timesteps] == list(plan.timesteps)
    return sch


def _diffusers_step(sampler, sch, eps, t, x):
    if sampler == "ddim":
        return sch.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    return sch.step(eps, t, x).prev_sample


@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("dpmpp2m", 8)])
def test_trajectory_matches_diffusers(sampler, steps):
    d = GaussianDiffusion.linear(T=1000)
    # DDIM: diffusers steps t -> t - T / N (uniform spacing); DPM-Solver++ takes our timesteps
    plan = make_plan(d, sampler, steps=steps, spacing="uniform" if sampler == "ddim" else None)
    mu = (0.9 * torch.randn(1, *SHAPE, dtype=torch.float64)).clamp(-1.5, 1.5)   # some x0_hat beyond [-1, 1]
    net = GaussianEps(d.alphas_cumprod, mu)
    sch = _scheduler(sampler, d, plan)
    clip = sampler == "ddim"      # DDIM's clip_sample; DPM-Solver++ without thresholding does not clip
    x_T = reference.philox_normal_ref(torch.tensor([11, 0, 0]), (4, *SHAPE))
    ours, theirs = x_T.clone(), x_T.double()
    ring = torch.zeros((plan.history + 1, *ours.shape)) if plan.history else None  # past predictions
    for i, t in enumerate(plan.timesteps):
        tt = torch.full((4,), t)
        ours, _ = ops.sample_step(ours, net(ours, tt), plan.table, torch.tensor([i]), ring, clip=clip)
        theirs = _diffusers_step(sampler, sch, net(theirs, tt), t, theirs)
        # float32 x against diffusers' float32 alphas in float64 arithmetic
        assert rel_err(ours, theirs) < 1e-5, f"{sampler} step {i} (t={t}): {rel_err(ours, theirs):.2e}"
    assert rel_err(ours, x_T) > 0.1
    # the public sampler draws the same x_T (seed 11, samples 0..3) and runs the same plan
    final = sample_batch(net, d, 4, seed=11, plan=plan, clip=clip, progress=False)
    assert rel_err(final, theirs) < 1e-5
