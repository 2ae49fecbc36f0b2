"""The trainer's arithmetic against formulas written out here: the EMA after k steps,
gradient clipping at the configured norm (and only above it), the warm-up learning
rate of each step and its anneal. A tiny network on the embedded data, a few steps each."""
import math

import pytest
import torch

from fastddpm.train import config_from_args
from fastddpm.training.trainer import Trainer
from _util import rel_err

TINY = ["--preset", "tiny", "--image-size", "8", "--ch", "16", "--ch-mult", "1", "--attn-resolutions", "8",
        "--num-groups", "4", "--T", "20", "--batch-size", "8", "--dropout", "0", "--workers", "0",
        "--no-progress", "--sample-n", "0", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _trainer(tmp_path, *flags):
    cfg, _, _ = config_from_args(TINY + ["--out", str(tmp_path / "run"), *flags])
    return Trainer(cfg, log=lambda *a: None)


def _flat(tensors):
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def _step(tr, s, lr):
    """One train_step on the first 8 images with step s's timesteps and noise."""
    t, noise, flip = tr.draw(s)
    tr.train_step(torch.from_numpy(tr.dataset.images[:8]), t, noise, flip, lr)


def test_ema_after_k_steps_is_the_decay_weighted_average(tmp_path):
    """ema_k = d^k w_0 + sum_i (1 - d) d^(k - i) w_i over the weights w_i after step i
    (the EMA starts as a copy of w_0). Compared on what the EMA moved, ema_k - w_0,
    so that a decay off by 1% is a 1% error, not one diluted by |w_0|."""
    d, k = 0.7, 4
    tr = _trainer(tmp_path, "--ema-decay", str(d), "--warmup", "0", "--lr", "1e-2")
    w = [_flat(tr.params)]
    assert torch.equal(_flat(tr.ema_params), w[0])
    for s in range(k):
        _step(tr, s, 1e-2)
        w.append(_flat(tr.params))
    want = d ** k * w[0] + sum((1 - d) * d ** (k - i) * w[i] for i in range(1, k + 1))
    moved = _flat(tr.ema_params) - w[0]
    assert (want - w[0]).norm() > 1e-3 * w[0].norm()          # the weights did move
    assert rel_err(moved, want - w[0]) < 1e-4, f"EMA after {k} steps: {rel_err(moved, want - w[0]):.2e}"
    # the sampling network is the EMA, buffers included
    assert rel_err(_flat(tr.ema.parameters()), w[0] + moved) == 0.0


def _raw_gradient(tmp_path):
    """The unclipped gradient of step 0 (a clip far above it), from a fresh trainer."""
    tr = _trainer(tmp_path, "--grad-clip", "1e30", "--seed", "3")
    _step(tr, 0, 0.0)
    return _flat(p.grad for p in tr.params), tr.read_window()["grad_norm"]


@pytest.mark.parametrize("ratio", [0.25, 0.999, 1.5], ids=["clips", "just-below", "above"])
def test_gradient_clipping_at_the_configured_norm_and_only_above_it(tmp_path, ratio):
    """--grad-clip c: the gradient Adam sees is g * min(1, c / ||g||), ||g|| the global
    norm over every parameter; the logged grad_norm is ||g|| before clipping."""
    g, logged = _raw_gradient(tmp_path / "raw")
    norm = g.norm().item()
    assert abs(logged - norm) < 1e-5 * norm
    c = ratio * norm
    tr = _trainer(tmp_path / "clipped", "--grad-clip", repr(c), "--seed", "3")
    _step(tr, 0, 0.0)
    got = _flat(p.grad for p in tr.params)
    want = g * min(1.0, c / norm)
    assert rel_err(got, want) < 1e-5, f"clip at {ratio} x the norm: {rel_err(got, want):.2e}"
    assert abs(got.norm().item() - min(c, norm)) < 1e-5 * norm


def test_warmup_learning_rate_of_each_step(tmp_path, monkeypatch):
    """--lr L --warmup W: step s (0-based, s updates done before it) runs at
    L * min(s / W, 1), in the optimizer itself; a step at lr 0 leaves the weights."""
    L, W, steps = 3e-3, 4, 6
    seen = []
    original = Trainer.train_step

    def spy(self, batch, t, noise, flip, lr):
        before = _flat(self.params)
        original(self, batch, t, noise, flip, lr)
        seen.append((lr, [g["lr"] for g in self.opt.param_groups], torch.equal(before, _flat(self.params))))

    monkeypatch.setattr(Trainer, "train_step", spy)
    tr = _trainer(tmp_path, "--lr", repr(L), "--warmup", str(W), "--steps", str(steps), "--log-every", "3",
                  "--lr-anneal", "0")
    tr.train()
    assert len(seen) == steps
    for s, (lr, group_lrs, unchanged) in enumerate(seen):
        want = L * s / W if s < W else L
        assert abs(lr - want) <= 1e-12 * L and all(abs(x - want) <= 1e-12 * L for x in group_lrs), (s, lr, want)
        assert unchanged == (s == 0), s


@pytest.mark.parametrize("steps, frac", [(10, 0.5), (8, 0.25), (6, 1.0)])
def test_lr_anneal_is_a_half_cosine_to_zero_over_the_last_fraction(tmp_path, monkeypatch, steps, frac):
    """--lr-anneal F: after the warm-up, step s runs at L * (1 + cos(pi (s - S0) / (steps - S0))) / 2
    for s > S0 = (1 - F) steps (else L), written out here, in the optimizer itself."""
    L, W = 3e-3, 2
    seen = []
    original = Trainer.train_step

    def spy(self, batch, t, noise, flip, lr):
        original(self, batch, t, noise, flip, lr)
        seen.append((lr, [g["lr"] for g in self.opt.param_groups]))

    monkeypatch.setattr(Trainer, "train_step", spy)
    tr = _trainer(tmp_path, "--lr", repr(L), "--warmup", str(W), "--steps", str(steps), "--lr-anneal", repr(frac))
    tr.train()
    S0 = (1 - frac) * steps
    assert len(seen) == steps
    for s, (lr, group_lrs) in enumerate(seen):
        want = L * min(s / W, 1.0)
        if s > S0:
            want *= (1 + math.cos(math.pi * (s - S0) / (steps - S0))) / 2
        assert abs(lr - want) <= 1e-12 * L and all(abs(x - want) <= 1e-12 * L for x in group_lrs), (s, lr, want)
    assert 0 < seen[-1][0] <= L / 2  # annealed, not yet zero at the last step
