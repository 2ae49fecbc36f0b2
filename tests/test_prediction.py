"""The parameterisations prediction = eps | x0 | v (issue 25, item 1).

* The closed-form conversions (split_prediction, prediction_target) against an
  independent float64 implementation (schedule in Python floats, numpy
  formulas); for each parameterisation the three predictions (x0, eps, v) agree.
* The training losses: eps is L_simple, bit for bit the code it was before; x0
  and v are the weighted x0 errors of Salimans & Ho (max(SNR, 1), SNR + 1),
  checked against float64 formulas written here.
* Equivalent models (an exact-score eps model, wrapped to output x0 or v): the
  same trajectories through every sampler's table (float64, the fused update's
  reference, and the sampler loop on this machine's backend), the same ancestral
  step and the same VLB terms.
* The trainer: --prediction v trains a tiny model, records it, samples from it;
  a loss that falls; --prediction on resume and bad values refused.
"""
import json
import math
import types

import numpy as np
import pytest
import torch

from fastddpm import GaussianDiffusion, UNet, UNetConfig, checkpoint, loader, reference
from fastddpm.checkpoint import CheckpointError
from fastddpm.sampling import make_plan, sample
from fastddpm.sampling.tables import SAMPLERS, x0_columns
from fastddpm.train import config_from_args, main as train_main

PREDICTIONS = ("eps", "x0", "v")
T, B0, B1 = 50, 1e-3, 0.2


def _schedule():
    """abar (T,) of the linear schedule, in Python floats (independent of numpy's)."""
    abar, prod = [], 1.0
    for i in range(T):
        prod *= 1.0 - (B0 + (B1 - B0) * i / (T - 1))
        abar.append(prod)
    return np.array(abar)


ABAR = _schedule()


def _d(prediction, **kw):
    return GaussianDiffusion.linear(T=T, beta_start=B0, beta_end=B1, prediction=prediction, **kw)


def _ab(t, like):
    """a = sqrt(abar_t), s = sqrt(1 - abar_t) as (B, 1, ..., 1) float64."""
    a = torch.from_numpy(np.sqrt(ABAR[t.numpy()])).view(-1, *[1] * (like.dim() - 1))
    return a, torch.sqrt(1 - a * a)


def _as(prediction, x0, eps, a, s):
    """What a `prediction` network outputs for the pair (x0, eps)."""
    return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[prediction]


def _rand(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


T_SEL = torch.tensor([0, 1, 17, 33, T - 1])


# ----------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_the_three_predictions_agree_through_the_closed_forms(prediction):
    """A random network output under `prediction` -> (x0_hat, eps_hat); its v, and the
    outputs of the other two parameterisations for the same pair, say the same."""
    d = _d(prediction)
    x_t, out = _rand(5, 3, 4, 4, seed=1), _rand(5, 3, 4, 4, seed=2)
    a, s = _ab(T_SEL, x_t)
    x0, eps = d.split_prediction(out, x_t, T_SEL)
    assert x0.dtype == eps.dtype == torch.float64
    # independent formulas for each case
    ref = {"eps": ((x_t - s * out) / a, out), "x0": (out, (x_t - a * out) / s),
           "v": (a * x_t - s * out, s * x_t + a * out)}[prediction]
    torch.testing.assert_close(x0, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eps, ref[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a * x0 + s * eps, x_t, rtol=1e-12, atol=1e-12)  # on the forward process
    v = a * eps - s * x0
    for other in PREDICTIONS:  # the same pair seen through each parameterisation
        o = _d(other)
        out_o = o.prediction_target(x0, eps, T_SEL)
        torch.testing.assert_close(out_o, {"eps": eps, "x0": x0, "v": v}[other], rtol=1e-12, atol=1e-12)
        x0_o, eps_o = o.split_prediction(out_o, x_t, T_SEL)
        torch.testing.assert_close(x0_o, x0, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(eps_o, eps, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_prediction_target_round_trips_through_split_prediction(prediction):
    d = _d(prediction)
    x0, eps = _rand(5, 2, 3, 3, seed=3), _rand(5, 2, 3, 3, seed=4)
    x_t = d.q_sample(x0, T_SEL, eps)
    x0_hat, eps_hat = d.split_prediction(d.prediction_target(x0, eps, T_SEL), x_t, T_SEL)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-11, atol=1e-11)


def test_config_round_trip_and_old_configs_mean_eps():
    for p in PREDICTIONS:
        d = _d(p, variance="fixedsmall")
        back = GaussianDiffusion.from_config(d.config)
        assert back.prediction == p and back.variance == "fixedsmall" and torch.equal(back.betas, d.betas)
        custom = GaussianDiffusion(d.betas.numpy(), prediction=p)
        assert GaussianDiffusion.from_config(custom.config).prediction == p
    # eps configs are what they were (checkpoints written before keep loading, and
    # a fastddpm without the parameterisations reads the eps ones written now)
    assert _d("eps").config == {"schedule": "linear", "T": T, "beta_start": B0, "beta_end": B1,
                                "variance": "fixedlarge"}
    assert _d("v").config["prediction"] == "v"
    assert GaussianDiffusion.from_config({"schedule": "linear", "T": 10}).prediction == "eps"


def test_unknown_prediction_is_one_line():
    for make in (lambda: _d("score"), lambda: GaussianDiffusion.from_config({"schedule": "linear", "T": 10,
                                                                             "prediction": "epsilon"}),
                 lambda: GaussianDiffusion([0.1, 0.2], prediction=None)):
        with pytest.raises(ValueError, match=r"unknown prediction .*'eps', 'x0', 'v'") as e:
            make()
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown prediction"):
        x0_columns([0.5], "sample")


# ----------------------------------------------------------------------------- losses


def _net(x, t):
    """A stand-in network: a smooth function of x_t and t (float64)."""
    tt = t.to(x.dtype).view(-1, *[1] * (x.dim() - 1)) / T
    return torch.tanh(0.8 * x) * (0.5 + tt) + 0.3 * torch.sin(2 * x + tt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eps_loss_is_l_simple_bit_for_bit(dtype):
    from fastddpm import ops
    d = _d("eps")
    x0, noise = _rand(6, 3, 4, 4, seed=5).to(dtype), _rand(6, 3, 4, 4, seed=6).to(dtype)
    t = torch.tensor([0, 4, 9, 20, 37, 49])
    loss = d.training_loss(_net, x0, t, noise)
    # the code of training_loss before the parameterisations
    x_t = ops.q_sample(x0, t, noise, d.sqrt_alphas_cumprod, d.sqrt_one_minus_alphas_cumprod)
    before = ops.simple_loss(_net(x_t, t).float(), noise.float())
    assert torch.equal(loss, before) and loss.dtype == torch.float32
    # and it is the SNR-weighted x0 error, the weight loss_weight reports
    a, s = _ab(t, x0)
    x0_hat = (x_t.double() - s * _net(x_t, t).double()) / a
    w = torch.from_numpy(ABAR[t.numpy()] / (1 - ABAR[t.numpy()])).view(-1, 1, 1, 1)
    ref = (w * (x0.double() - x0_hat) ** 2).mean()
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5)   # L_simple is float32 even for float64
    torch.testing.assert_close(d.loss_weight(t), w.flatten(), rtol=1e-13, atol=0)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_x0_and_v_losses_are_salimans_ho_weighted_x0_errors(prediction):
    d = _d(prediction)
    x0, noise = _rand(6, 3, 4, 4, seed=7), _rand(6, 3, 4, 4, seed=8)
    t = torch.tensor([0, 4, 9, 20, 37, 49])  # SNR from ~1000 down to ~1e-4: both sides of 1
    a, s = _ab(t, x0)
    x_t = a * x0 + s * noise
    out = _net(x_t, t)
    snr = ABAR[t.numpy()] / (1 - ABAR[t.numpy()])
    assert snr.max() > 1 > snr.min()
    w = torch.from_numpy(np.maximum(snr, 1.0) if prediction == "x0" else snr + 1.0)
    x0_hat = out if prediction == "x0" else a * x_t - s * out
    ref = (w.view(-1, 1, 1, 1) * (x0 - x0_hat) ** 2).mean()
    loss = d.training_loss(_net, x0, t, noise)
    assert loss.dtype == torch.float64
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-11), (loss.item(), ref.item())
    torch.testing.assert_close(d.loss_weight(t), w, rtol=1e-13, atol=0)
    if prediction == "v":  # the plain v MSE
        assert math.isclose(loss.item(), ((a * noise - s * x0 - out) ** 2).mean().item(), rel_tol=1e-11)
    # float32: the same to float32 rounding, and it has a gradient
    p = torch.nn.Parameter(torch.tensor(1.0))
    loss32 = d.training_loss(lambda x, tt: p * _net(x, tt), x0.float(), t, noise.float())
    assert loss32.dtype == torch.float32 and math.isclose(loss32.item(), ref.item(), rel_tol=1e-5)
    loss32.backward()
    assert p.grad is not None and p.grad.abs().item() > 0


# ----------------------------------------------------------------------------- equivalent models

MU, SD = 0.3, 0.5   # data N(MU, SD^2) per element: the exact eps is known in closed form


def _exact(prediction):
    """The optimal network of data N(MU, SD^2 I) under `prediction` (float64 math)."""
    def net(x, t):
        ab = torch.from_numpy(ABAR).to(x.device).index_select(0, t).view(-1, *[1] * (x.dim() - 1))
        a, s = ab.sqrt(), (1 - ab).sqrt()
        xd = x.double()
        eps = s * (xd - a * MU) / (ab * SD ** 2 + 1 - ab)
        x0 = (xd - s * eps) / a
        return _as(prediction, x0, eps, a, s).to(x.dtype)
    return net


def _trajectory(plan, net, x, noises, clip):
    """The plan through the fused update's float64 reference: [x_1 .. x_N]."""
    table = plan.table.double()
    ring = torch.zeros((plan.history + 1, *x.shape), dtype=torch.float64) if plan.history else None
    out = []
    for i, t in enumerate(plan.timesteps):
        tt = torch.full((x.shape[0],), t)
        x, _ = reference.sample_step_ref(x, net(x, tt), table, torch.tensor([i]), ring, noise=noises[i], clip=clip)
        out.append(x)
    return out


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_every_sampler_table_gives_the_eps_trajectory(sampler, prediction):
    """The x0 / v table driven by the wrapped exact model == the eps table driven by the
    eps model, step by step, to float64 rounding (clipping on: the exact x0_hat
    leaves [-1, 1] at high t, so the clip is exercised too)."""
    steps = 8
    plan_e, plan_p = make_plan(_d("eps"), sampler, steps), make_plan(_d(prediction), sampler, steps)
    assert plan_p.prediction == prediction and plan_p.timesteps == plan_e.timesteps
    assert torch.equal(plan_p.table[:, 2:], plan_e.table[:, 2:])  # only a_x, a_e differ
    a = ABAR[list(plan_p.timesteps)]
    ref_cols = {"x0": (np.zeros_like(a), -np.ones_like(a)), "v": (np.sqrt(a), np.sqrt(1 - a))}[prediction]
    torch.testing.assert_close(plan_p.table[:, :2], torch.from_numpy(np.stack(ref_cols, 1)), rtol=1e-14, atol=0)
    x = _rand(4, 2, 3, 3, seed=9)
    noises = [_rand(4, 2, 3, 3, seed=100 + i) for i in range(steps)]
    clipped = False
    for xe, xp in zip(_trajectory(plan_e, _exact("eps"), x, noises, True),
                      _trajectory(plan_p, _exact(prediction), x, noises, True)):
        torch.testing.assert_close(xp, xe, rtol=1e-9, atol=1e-9)
    # the clip mattered somewhere (else the test would not see a wrong clip)
    for i, t in enumerate(plan_e.timesteps):
        tt = torch.full((4,), t)
        xe = x if i == 0 else _trajectory(plan_e, _exact("eps"), x, noises, True)[i - 1]
        _, x0 = reference.sample_step_ref(xe, _exact("eps")(xe, tt), plan_e.table.double(), torch.tensor([i]),
                                          None, clip=False)
        clipped |= bool((x0.abs() > 1).any())
    assert clipped


class _Wrapped(torch.nn.Module):
    """A module around an exact network, as sample() wants one (config, a parameter)."""
    def __init__(self, net):
        super().__init__()
        self.net, self.dummy = net, torch.nn.Parameter(torch.zeros(()))
        self.config = types.SimpleNamespace(in_channels=2, image_size=4)   # what sample() reads

    def forward(self, x, t):
        return self.net(x, t)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp3m", "ipndm"])
def test_the_sampler_loop_on_each_backend_takes_x0_and_v_models(sampler, backend):
    """sample() end to end (float32, each backend's fused op, noise from the Philox
    streams): an x0 / v model gives the eps model's images (measured on the CPU,
    2026-12-07: at most 2.2e-6 apart over the six samplers)."""
    from fastddpm import ops
    from fastddpm._ext import extension_error
    if backend == "cpp" and extension_error():
        pytest.skip(f"fastddpm._C did not load ({extension_error()})")
    kw = dict(n=3, seed=11, progress=False, sampler=sampler, steps=6, cuda_graphs=False)
    with ops.use_backend(backend):
        ref = sample(_Wrapped(_exact("eps")), _d("eps"), **kw)
        for p in ("x0", "v"):
            got = sample(_Wrapped(_exact(p)), _d(p), **kw)
            torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)
    assert (ref - sample(_Wrapped(_exact("eps")), _d("eps"), **{**kw, "seed": 12})).abs().max() > 0.1


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_ancestral_step_and_p_mean_variance_take_the_output_as_predicted(prediction):
    d_e, d_p = _d("eps"), _d(prediction)
    x_t, z = _rand(5, 2, 3, 3, seed=12), _rand(5, 2, 3, 3, seed=13)
    out_e, out_p = _exact("eps")(x_t, T_SEL), _exact(prediction)(x_t, T_SEL)
    for clip in (True, False):
        torch.testing.assert_close(d_p.p_sample_step(x_t, T_SEL, out_p, noise=z, clip=clip),
                                   d_e.p_sample_step(x_t, T_SEL, out_e, noise=z, clip=clip), rtol=1e-10, atol=1e-10)
        for u, v in zip(d_p.p_mean_variance(out_p, x_t, T_SEL, clip), d_e.p_mean_variance(out_e, x_t, T_SEL, clip)):
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_vlb_terms_agree_for_equivalent_models(prediction):
    """Equivalent models, one float64 x0 and the same q_sample noise: the same terms.
    The exact model is not the data's, so the terms are far from zero."""
    x0 = (torch.rand((3, 2, 4, 4), generator=torch.Generator().manual_seed(14), dtype=torch.float64) * 2 - 1)
    x0 = torch.round((x0 + 1) * 127.5) / 127.5 - 1   # on the 256-level grid
    r_e = _d("eps").vlb_terms(_exact("eps"), x0, generator=torch.Generator().manual_seed(15))
    r_p = _d(prediction).vlb_terms(_exact(prediction), x0, generator=torch.Generator().manual_seed(15))
    assert (r_e["terms"][:, 1:] > 1e-4).all()
    torch.testing.assert_close(r_p["terms"], r_e["terms"], rtol=1e-6, atol=1e-9)   # float32 KL
    torch.testing.assert_close(r_p["total"], r_e["total"], rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- training

TINY = ["--preset", "tiny", "--image-size", "8", "--ch", "16", "--ch-mult", "1", "--attn-resolutions", "8",
        "--num-groups", "4", "--T", "20", "--batch-size", "8", "--lr", "1e-3", "--warmup", "2",
        "--ema-decay", "0.9", "--workers", "0", "--no-progress", "--sample-n", "0", "--log-every", "2",
        "--threads", "1"]


@pytest.fixture
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_a_v_model_trains_records_its_prediction_and_samples(tmp_path, capsys, _threads):
    out = tmp_path / "v"
    assert train_main(TINY + ["--out", str(out), "--steps", "4", "--prediction", "v"]) == 0
    ckpt = loader.load(out)
    assert ckpt["config"]["diffusion"]["prediction"] == "v" and ckpt["config"]["train"]["prediction"] == "v"
    assert json.load(open(out / "config.json"))["diffusion"]["prediction"] == "v"
    model, diffusion, _ = loader.load_for_sampling(out)
    assert diffusion.prediction == "v"
    # with the tiny preset's recorded dynamic threshold, which the CLI below takes by default
    x = sample(model, diffusion, 2, seed=3, progress=False, sampler="ddim", steps=4, threshold=0.995)
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all() and x.abs().max() <= 1
    from fastddpm.sample import main as sample_main   # the CLI reads it from the checkpoint
    sample_main(["--checkpoint", str(out), "--n", "2", "--out", str(tmp_path / "s"), "--device", "cpu",
                 "--sampler", "ddim", "--steps", "4", "--seed", "3", "--no-progress"])
    cli = np.load(tmp_path / "s" / "samples.npz")["arr_0"].astype(int)
    ours = torch.round((x + 1) * 127.5).clamp(0, 255).permute(0, 2, 3, 1).numpy().astype(int)
    assert cli.shape == ours.shape and np.abs(cli - ours).max() <= 1, np.abs(cli - ours).max()
    # the run identity: resuming as another parameterisation is another run
    with pytest.raises(CheckpointError, match=r"prediction: checkpoint 'v', now 'eps'"):
        config_from_args(["--resume", str(out), "--prediction", "eps"])
    assert train_main(["--resume", str(out), "--steps", "5", "--no-progress"]) == 0
    assert loader.load(out)["config"]["diffusion"]["prediction"] == "v"
    # the default run stays eps, its checkpoint config as before
    assert train_main(TINY + ["--out", str(tmp_path / "e"), "--steps", "2"]) == 0
    assert "prediction" not in loader.load(tmp_path / "e")["config"]["diffusion"]
    # a run written before the parameterisations (no "prediction" anywhere) resumes as eps
    path = loader.resolve(tmp_path / "e")
    old = loader.load(path)
    del old["config"]["train"]["prediction"]
    checkpoint.atomic_save(old, path)
    cfg, _, _ = config_from_args(["--resume", str(tmp_path / "e"), "--steps", "3"])
    assert cfg.prediction == "eps"
    capsys.readouterr()
    assert train_main(TINY + ["--out", str(tmp_path / "bad"), "--steps", "2", "--prediction", "epsilon"]) == 2
    err = capsys.readouterr().err
    assert "--prediction must be one of" in err and "epsilon" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
    # the diffusers export records the parameterisation, and reading it back gives the same model
    from fastddpm.convert import main as convert_main
    assert convert_main([str(out), str(tmp_path / "pipe")]) in (0, None)
    sched = json.loads((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    back = loader.load(tmp_path / "pipe")
    assert back["config"]["diffusion"]["prediction"] == "v"


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_the_x0_and_v_losses_fall_on_a_fixed_batch(prediction, _threads):
    """A tiny UNet, one fixed batch, t and noise: 40 Adam steps lower the loss."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = UNetConfig.tiny(image_size=8, ch=16, ch_mult=(1,), attn_resolutions=(), num_groups=4)
    net, d = UNet(cfg), _d(prediction)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(16)
    x0 = torch.rand((8, 3, 8, 8), generator=g) * 2 - 1
    t, noise = torch.randint(0, T, (8,), generator=g), torch.randn((8, 3, 8, 8), generator=g)
    losses = []
    for _ in range(40):
        loss = d.training_loss(net, x0, t, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses
