"""diffusers interop: random UNet2DModels of the DDPM family saved with
save_pretrained load into fastddpm and give the same outputs in float64;
fastddpm exports load in diffusers (DDPMPipeline.from_pretrained) and agree
there; the schedule, one reverse step and a short sampling loop agree with
DDPMScheduler; what fastddpm cannot express is refused by name."""
import json
import math
import os
import stat

import numpy as np
import pytest
import torch

from fastddpm import GaussianDiffusion, UNet, UNetConfig, interop
from fastddpm import checkpoint as C
from fastddpm import loader as L
from fastddpm import ops
from fastddpm.checkpoint import CheckpointError
from fastddpm.nn import timestep_embedding
from fastddpm.sampling import make_plan
from fastddpm.sampling.step import dynamic_threshold
from tests._util import fresh_seed, rel_err

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

TOL = 1e-10  # float64 on the same (float32-representable) weights

# The DDPM family: the paper's fields, plus what each test varies.
PAPER = dict(downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6)
CIFAR10 = dict(PAPER, sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None)
SMALL = {
    "one-head": dict(PAPER, sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
                     down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "AttnUpBlock2D"), attention_head_dim=None),
    "four-heads": dict(PAPER, sample_size=12, in_channels=1, out_channels=1, block_out_channels=(8, 16, 16),
                       layers_per_block=2, norm_num_groups=4, attention_head_dim=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
}


def _randomise(model):
    """Every parameter random (also those zero-initialised by default), and
    float32-representable, so float32 and float64 copies hold the same values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
            p.copy_(p.float())
    return model


def _paper_sinusoid(unet):
    """diffusers' float32 sinusoid rounds exp(-log(1e4) * i / (h - 1)) where the
    paper's code (and fastddpm) rounds exp(i * -(log(1e4) / (h - 1))): one float32
    ulp apart (tested below). To compare the rest to float64 rounding, give the
    diffusers model the paper's embedding."""
    dim = unet.config.block_out_channels[0]
    unet.time_proj.forward = lambda t: timestep_embedding(t.long(), dim)
    return unet


def _diffusers_unet(cfg, folder):
    model = _randomise(UNet2DModel(**cfg)).eval()
    model.save_pretrained(folder)
    return model


def _compare(ours, theirs, in_ch, size, timesteps):
    ours, theirs = ours.double().eval(), _paper_sinusoid(theirs.double().eval())
    x = torch.randn(len(timesteps), in_ch, size, size, dtype=torch.float64)
    t = torch.tensor(timesteps)
    with torch.no_grad(), ops.use_backend("reference"):
        a, b = ours(x, t), theirs(x, t).sample
    return rel_err(a, b)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_diffusers_unet_folder_loads_and_matches_in_float64(tmp_path, name):
    seed = fresh_seed()
    cfg = SMALL[name]
    theirs = _diffusers_unet(cfg, tmp_path / "unet")
    model, _, ckpt = L.load_for_sampling(tmp_path / "unet")
    assert model.config.ch_mult == tuple(c // cfg["block_out_channels"][0] for c in cfg["block_out_channels"])
    heads = 1 if cfg["attention_head_dim"] is None else cfg["block_out_channels"][-1] // cfg["attention_head_dim"]
    assert model.config.num_heads == heads
    assert ckpt["config"].get("diffusion") is None  # a lone UNet: build_model uses the paper's schedule
    for ts in ([0, 999], [1, 517]):
        err = _compare(model, theirs, cfg.get("in_channels", 3), cfg["sample_size"], ts)
        assert err < TOL, f"{name} t={ts}: relative error {err:.2e} (seed {seed})"


def test_cifar10_layout_matches_and_is_the_papers_network(tmp_path):
    seed = fresh_seed()
    theirs = _diffusers_unet(CIFAR10, tmp_path / "unet")
    model, _, _ = L.load_for_sampling(tmp_path / "unet")
    assert model.config == UNetConfig.cifar10(dropout=0.0)
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    err = _compare(model, theirs, 3, 32, [617])  # batch 1: the small configs sweep the timesteps
    assert err < TOL, f"relative error {err:.2e} (seed {seed})"


def test_the_only_difference_is_the_float32_sinusoid(tmp_path):
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.arange(1000)
    ours, theirs = timestep_embedding(t, 128), get_timestep_embedding(t, 128, False, 1)
    assert (ours - theirs).abs().max() < 4e-5  # one ulp of arguments up to ~1000 in float32
    # the unpatched networks then agree to float32 rounding
    fresh_seed()
    cfg = SMALL["one-head"]
    theirs = _diffusers_unet(cfg, tmp_path / "u").double()
    model = L.load_for_sampling(tmp_path / "u")[0].double()
    x, t = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([3, 999])
    with torch.no_grad(), ops.use_backend("reference"):
        assert rel_err(model(x, t), theirs(x, t).sample) < 1e-5


def test_bin_weights_with_old_attention_names_load(tmp_path):
    """.bin weights (read with weights_only=True) and the names diffusers used
    before it renamed attention (query / key / value / proj_attn)."""
    fresh_seed()
    cfg = SMALL["one-head"]
    theirs = _diffusers_unet(cfg, tmp_path / "u")
    os.remove(tmp_path / "u" / "diffusion_pytorch_model.safetensors")
    new = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in theirs.state_dict().items():
        for a, b in new.items():
            k = k.replace(f".{a}.", f".{b}.")
        sd[k] = v
    assert any(".query." in k for k in sd)
    torch.save(sd, tmp_path / "u" / "diffusion_pytorch_model.bin")
    model = L.load_for_sampling(tmp_path / "u")[0]
    assert _compare(model, theirs, 3, 8, [5, 950]) < TOL


def _fastddpm_ckpt(cfg, diffusion, ema=True):
    model = _randomise(UNet(cfg))
    sd = model.state_dict()
    return model, {"format": C.FORMAT, "version": C.VERSION, "step": 11,
                   "config": {"model": cfg.to_dict(), "diffusion": diffusion.config},
                   "model": {k: torch.randn_like(v) for k, v in sd.items()} if ema else sd,
                   "ema": sd if ema else None}


EXPORTS = [UNetConfig.tiny(image_size=8, ch_mult=(1, 2), attn_resolutions=(8,), num_groups=4),
           UNetConfig.tiny(image_size=8, ch=8, ch_mult=(1, 2, 2), attn_resolutions=(4, 2), num_groups=4,
                           num_heads=4, num_res_blocks=2)]


@pytest.mark.parametrize("cfg", EXPORTS, ids=["one-head", "four-heads"])
def test_export_loads_in_diffusers_and_matches_in_float64(tmp_path, cfg):
    seed = fresh_seed()
    diffusion = GaussianDiffusion.linear(T=50, variance="fixedsmall")
    model, ckpt = _fastddpm_ckpt(cfg, diffusion)  # the EMA weights are the ones exported
    interop.export_pipeline(ckpt, tmp_path / "pipe")
    pipe = DDPMPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.scheduler.config.variance_type == "fixed_small"
    assert pipe.scheduler.config.num_train_timesteps == 50
    for ts in ([0, 49], [7, 23]):
        err = _compare(model, pipe.unet, cfg.in_channels, cfg.image_size, ts)
        assert err < TOL, f"t={ts}: relative error {err:.2e} (seed {seed})"
    # and back: the same network, bit for bit, and the same diffusion
    back = L.load(tmp_path / "pipe")
    assert back["config"]["model"] == cfg.to_dict() and back["config"]["diffusion"] == diffusion.config
    assert all(torch.equal(back["model"][k], v) for k, v in ckpt["ema"].items())


def test_export_refuses_what_diffusers_cannot_express(tmp_path):
    cfg = UNetConfig.tiny(image_size=8, ch=8, ch_mult=(1, 2), attn_resolutions=(8,), num_groups=4, num_heads=2)
    _, ckpt = _fastddpm_ckpt(cfg, GaussianDiffusion.linear(T=10))
    with pytest.raises(CheckpointError, match="num_heads=2 with attention at"):
        interop.export_pipeline(ckpt, tmp_path / "pipe")
    _, ckpt = _fastddpm_ckpt(UNetConfig.tiny(image_size=8, ch=8, ch_mult=(2, 2), num_groups=4, attn_resolutions=()),
                             GaussianDiffusion.linear(T=10))
    with pytest.raises(CheckpointError, match=r"ch_mult=\(2, 2\) has no UNet2DModel equivalent"):
        interop.export_pipeline(ckpt, tmp_path / "pipe")
    assert not os.path.exists(tmp_path / "pipe")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    _, ckpt = _fastddpm_ckpt(EXPORTS[0], GaussianDiffusion.linear(T=10))
    with pytest.raises(CheckpointError, match="already exists"):
        interop.export_pipeline(ckpt, tmp_path / "full")


# ---- the scheduler ----------------------------------------------------------------

SCHEDULER_CASES = [("linear", dict(beta_schedule="linear")),
                   ("quad", dict(beta_schedule="scaled_linear", beta_start=1e-4, beta_end=0.02)),
                   ("cosine", dict(beta_schedule="squaredcos_cap_v2"))]


def _float64_scheduler(sched):
    """sched with its tables recomputed in float64 from its own (float32) betas:
    diffusers' float32 1 - abar_t / abar_{t-1} loses ~3 digits for small betas,
    which would hide formula errors behind rounding."""
    sched.betas = sched.betas.double()
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, 0)
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    return sched


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("schedule, kw", SCHEDULER_CASES, ids=[c[0] for c in SCHEDULER_CASES])
def test_schedule_tables_and_one_step_match_ddpm_scheduler(schedule, kw, variance):
    sched = DDPMScheduler(num_train_timesteps=1000, variance_type=variance, **kw)
    dcfg, clip = interop.diffusion_config_from_scheduler(dict(sched.config))
    assert dcfg["schedule"] == schedule and dcfg["variance"] == variance.replace("_", "") and clip is True
    d = GaussianDiffusion.from_config(dcfg)
    # the tables: diffusers keeps float32 ones, ours are float64
    assert rel_err(d.betas, sched.betas) < 1e-6
    assert rel_err(d.alphas_cumprod, sched.alphas_cumprod) < 1e-6
    # the formulas, in float64 on the same betas
    sched = _float64_scheduler(sched)
    d = GaussianDiffusion(sched.betas.numpy(), variance.replace("_", ""))
    var = torch.stack([sched._get_variance(t) for t in range(1, 1000)])
    assert rel_err(d.model_log_variance[1:].exp(), var) < 1e-12
    if variance == "fixed_large":  # the one difference: t = 0 (no noise is added there in either)
        assert math.isclose(sched._get_variance(0).item(), d.betas[0].item(), rel_tol=1e-12)
        assert math.isclose(d.model_log_variance[0].exp().item(), d.posterior_variance[1].item(), rel_tol=1e-12)
    # one reverse step with the same noise, t = 0 included
    fresh_seed()
    for t in (0, 1, 2, 500, 999):
        x, eps = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
        seed = int(torch.randint(0, 2**31, ()))
        theirs = sched.step(eps, t, x, generator=torch.Generator().manual_seed(seed)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        ours = d.p_sample_step(x, torch.full((2,), t), eps, noise)
        assert rel_err(ours, theirs) < 1e-12, f"t={t}"


def test_short_sampling_loop_equals_diffusers_pipeline(tmp_path):
    """fastddpm's sampler loop and DDPMPipeline driving DDPMScheduler, T = 12,
    with the same noise stream, on an exported model."""
    fresh_seed()
    T = 12
    diffusion = GaussianDiffusion.linear(T=T, beta_start=1e-3, beta_end=0.2, variance="fixedlarge")
    cfg = EXPORTS[0]
    model, ckpt = _fastddpm_ckpt(cfg, diffusion, ema=False)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.3)  # keep eps_hat moderate so that the x0 clipping is exercised, not saturated
    ckpt["model"] = model.state_dict()
    interop.export_pipeline(ckpt, tmp_path / "pipe")
    pipe = DDPMPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    seed = int(torch.randint(0, 2**31, ()))
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(seed), num_inference_steps=T,
                  output_type="np").images  # (B, H, W, C) in [0, 1]
    # ours: x_T, then for t = T-1 .. 0 one step with the next normal draw (diffusers
    # draws none at t = 0, the last step, so the streams line up)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=g)
    model.eval()
    with torch.no_grad():
        for i in range(T - 1, -1, -1):
            t = torch.full((2,), i)
            noise = torch.randn(x.shape, generator=g) if i > 0 else torch.zeros_like(x)
            x = diffusion.p_sample_step(x, t, model(x, t), noise)
    ours = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - theirs).max() < 1e-4
    assert ours.std() > 0.05  # not a degenerate all-clipped image


# ---- bad input --------------------------------------------------------------------

BAD_UNET = [
    ("down_block_types", ("DownBlock2D", "CrossAttnDownBlock2D"), "down_block_types\\[1\\]='CrossAttnDownBlock2D'"),
    ("up_block_types", ("ResnetUpsampleBlock2D", "UpBlock2D"), "up_block_types\\[0\\]"),
    ("up_block_types", ("AttnUpBlock2D", "UpBlock2D"), "attention on the way up"),
    ("time_embedding_type", "fourier", "time_embedding_type='fourier'"),
    ("class_embed_type", "timestep", "class_embed_type='timestep'"),
    ("num_class_embeds", 10, "num_class_embeds=10"),
    ("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift='scale_shift'"),
    ("flip_sin_to_cos", True, "flip_sin_to_cos=True"),
    ("freq_shift", 0, "freq_shift=0"),
    ("act_fn", "gelu", "act_fn='gelu'"),
    ("center_input_sample", True, "center_input_sample=True"),
    ("add_attention", False, "add_attention=False"),
    ("downsample_padding", 1, "downsample_padding=1"),
    ("downsample_type", "resnet", "downsample_type='resnet'"),
    ("upsample_type", "resnet", "upsample_type='resnet'"),
    ("mid_block_type", None, "mid_block_type=None"),
    ("mid_block_scale_factor", 2, "mid_block_scale_factor=2"),
    ("time_embedding_dim", 32, "time_embedding_dim=32"),
    ("out_channels", 6, "out_channels=6"),
    ("attn_norm_num_groups", 2, "attn_norm_num_groups=2"),
    ("attention_head_dim", 12, "attention_head_dim=12"),
    ("block_out_channels", (16, 24), "multiple of the first"),
    ("sample_size", (8, 16), "square"),
    ("block_out_channels", 16, "block_out_channels=16 .*a list"),
    ("layers_per_block", "2", "num_res_blocks"),
    ("dropout", 1.0, "dropout"),
    ("norm_num_groups", 5, "num_groups"),
    ("_class_name", "UNet2DConditionModel", "UNet2DConditionModel"),
]


@pytest.mark.parametrize("field, value, msg", BAD_UNET, ids=[f"{b[0]}={b[1]}" for b in BAD_UNET])
def test_unsupported_unet_config_is_refused_by_name(field, value, msg):
    cfg = {**SMALL["one-head"], field: value}
    with pytest.raises(CheckpointError, match=msg):
        interop.unet_config_from_diffusers(json.loads(json.dumps(cfg)))


def test_head_counts_that_differ_per_level_are_refused():
    cfg = {**PAPER, "sample_size": 8, "block_out_channels": [16, 32], "attention_head_dim": 8,
           "norm_num_groups": 4, "down_block_types": ["AttnDownBlock2D", "DownBlock2D"],
           "up_block_types": ["UpBlock2D", "AttnUpBlock2D"]}
    with pytest.raises(CheckpointError, match=r"attention_head_dim=8 .*\[2, 4\] heads"):
        interop.unet_config_from_diffusers(cfg)


@pytest.mark.parametrize("theirs, ours", [("epsilon", "eps"), ("sample", "x0"), ("v_prediction", "v")])
def test_prediction_type_maps_and_one_step_matches_ddpm_scheduler(theirs, ours):
    """prediction_type is read into the diffusion's parameterisation and written back;
    a reverse step on the same network output and noise equals DDPMScheduler's
    (x0 clipped in both), in float64."""
    sched = DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_large", prediction_type=theirs)
    dcfg, _ = interop.diffusion_config_from_scheduler(dict(sched.config))
    assert dcfg.get("prediction", "eps") == ours
    assert interop.scheduler_config_from_diffusion(dcfg)["prediction_type"] == theirs
    sched = _float64_scheduler(sched)
    d = GaussianDiffusion(sched.betas.numpy(), "fixedlarge", prediction=ours)
    fresh_seed()
    for t in (1, 2, 500, 999):
        x, out = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
        seed = int(torch.randint(0, 2**31, ()))
        step = sched.step(out, t, x, generator=torch.Generator().manual_seed(seed))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        x0, _ = d.split_prediction(out, x, torch.full((2,), t))
        assert rel_err(x0.clamp(-1, 1), step.pred_original_sample) < 1e-12, f"t={t}"
        assert rel_err(d.p_sample_step(x, torch.full((2,), t), out, noise), step.prev_sample) < 1e-12, f"t={t}"


@pytest.mark.parametrize("theirs, ours", [("epsilon", "eps"), ("sample", "x0"), ("v_prediction", "v")])
def test_dynamic_threshold_step_matches_ddpm_scheduler_thresholding(theirs, ours):
    """fastddpm's dynamic thresholding (a rescaled network output fed to the one fused
    update: sampling.step.dynamic_threshold) equals DDPMScheduler's thresholding=True
    (Imagen's, with no upper bound on s: sample_max_value huge) on one ancestral step,
    for each parameterisation, in float64. Inputs are scaled so that about half the
    samples have s > 1 (the rescaling does something) and half s = 1 (plain clipping)."""
    p = 0.9
    sched = DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_small", prediction_type=theirs,
                          thresholding=True, dynamic_thresholding_ratio=p, sample_max_value=1e9)
    sched = _float64_scheduler(sched)
    d = GaussianDiffusion(sched.betas.numpy(), "fixedsmall", prediction=ours)
    plan = make_plan(d, "ddpm", threshold=p)
    table = plan.table
    fresh_seed()
    for t in (1, 2, 500, 999):
        x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
        out = torch.randn(6, 3, 4, 4, dtype=torch.float64)
        x0, _ = d.split_prediction(out, x, torch.full((6,), t))
        # scale out so that x0_hat's 0.9-quantile of |.| spreads around 1 over the batch
        q = torch.quantile(x0.abs().flatten(1), p, dim=1).view(-1, 1, 1, 1)
        target = torch.linspace(0.5, 2.0, 6, dtype=torch.float64).view(-1, 1, 1, 1)
        x0 = x0 * target / q
        out = d.prediction_target(x0, (x - d.sqrt_alphas_cumprod[t] * x0) / d.sqrt_one_minus_alphas_cumprod[t],
                                  torch.full((6,), t))
        seed = int(torch.randint(0, 2**31, ()))
        theirs_step = sched.step(out, t, x, generator=torch.Generator().manual_seed(seed))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        row = torch.tensor([plan.timesteps.index(t)])
        out2 = dynamic_threshold(x, out, table, row, p)
        x_next, x0_ours = ops.sample_step(x, out2, table, row, noise=noise if t > 0 else None, clip=True,
                                          return_x0=True)
        assert rel_err(x0_ours, theirs_step.pred_original_sample) < 1e-10, f"t={t}"
        assert rel_err(x_next, theirs_step.prev_sample) < 1e-10, f"t={t}"
        assert x0_ours.abs().max() <= 1.0
        assert rel_err(x0_ours, x0.clamp(-1, 1)) > 1e-2, f"t={t}: no different from plain clipping"


BAD_SCHEDULER = [("prediction_type", "flow_prediction"), ("prediction_type", 7), ("thresholding", True),
                 ("variance_type", "learned_range"), ("beta_schedule", "sigmoid"), ("clip_sample_range", 2.0),
                 ("rescale_betas_zero_snr", True), ("_class_name", "DDIMScheduler"), ("num_train_timesteps", 0)]


@pytest.mark.parametrize("field, value", BAD_SCHEDULER, ids=[f"{f}={v}" for f, v in BAD_SCHEDULER])
def test_unsupported_scheduler_config_is_refused_by_name(field, value):
    with pytest.raises(CheckpointError, match=f"{field}={value!r}"):
        interop.diffusion_config_from_scheduler({"variance_type": "fixed_large", field: value})


def test_trained_betas_and_unknown_fields(tmp_path):
    betas = np.linspace(1e-3, 0.1, 7).tolist()
    dcfg, _ = interop.diffusion_config_from_scheduler({"trained_betas": betas, "num_train_timesteps": 7})
    assert GaussianDiffusion.from_config(dcfg).betas.tolist() == betas
    with pytest.raises(CheckpointError, match="trained_betas='a list of 7'"):
        interop.diffusion_config_from_scheduler({"trained_betas": betas, "num_train_timesteps": 8})
    with pytest.raises(CheckpointError, match="trained_betas"):
        interop.diffusion_config_from_scheduler({"trained_betas": ["x"], "num_train_timesteps": 1})
    with pytest.raises(CheckpointError, match="beta_end='0.02'"):
        interop.diffusion_config_from_scheduler({"beta_end": "0.02"})
    with pytest.raises(CheckpointError, match="betas must lie in"):
        interop.diffusion_config_from_scheduler({"beta_end": 1.5})
    with pytest.warns(UserWarning, match="ignoring .*'some_future_field'"):
        interop.unet_config_from_diffusers({**SMALL["one-head"], "some_future_field": 1})


def _pipeline_folder(tmp_path, T=8, **sched):
    fresh_seed()
    unet = _randomise(UNet2DModel(**SMALL["one-head"]))
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_start=1e-3, beta_end=0.2,
                              **{"variance_type": "fixed_large", **sched})
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


def test_flat_layout_of_the_google_repositories(tmp_path):
    """google/ddpm-cifar10-32 keeps config.json, scheduler_config.json, the
    weights and model_index.json side by side; a UNet folder with a
    scheduler_config.json beside it uses that schedule too."""
    fresh_seed()
    root = tmp_path / "flat"
    theirs = _diffusers_unet(SMALL["one-head"], root)
    sched = DDPMScheduler(num_train_timesteps=9, beta_start=1e-3, beta_end=0.2, variance_type="fixed_large")
    sched.save_pretrained(root)
    ckpt = L.load(root)
    assert ckpt["config"]["diffusion"] == {"schedule": "linear", "T": 9, "beta_start": 1e-3, "beta_end": 0.2,
                                           "variance": "fixedlarge"}
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "scheduler": [
        "diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}))
    model, diffusion, ckpt = L.load_for_sampling(root)
    assert ckpt["config"]["source"]["format"] == "diffusers DDPMPipeline" and diffusion.num_timesteps == 9
    assert _compare(model, theirs, 3, 8, [0, 8]) < TOL
    os.remove(root / "scheduler_config.json")
    with pytest.raises(CheckpointError, match="scheduler_config.json is missing"):
        L.load(root)


def test_bad_weight_files_are_refused(tmp_path):
    folder = _pipeline_folder(tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors is unreadable"):
        L.load(folder)
    weights.unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        L.load(folder)
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not a zip, not a pickle")
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.bin is unreadable"):
        L.load(folder)
    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"conv_in.weight": RunsCode()}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.bin holds Python objects .*could run code"):
        L.load(folder)
    assert not (tmp_path / "pwned").exists()
    (folder / "unet" / "diffusion_pytorch_model.bin").unlink()
    os.remove(folder / "scheduler" / "scheduler_config.json")
    with pytest.raises(CheckpointError, match="scheduler_config.json is missing"):
        L.load(folder)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    folder = _pipeline_folder(tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    good = dict(sd)
    sd["conv_in.weight"] = torch.randn(16, 3, 5, 5)
    save_file(sd, weights)
    with pytest.raises(CheckpointError, match=r"conv_in.weight has shape \(16, 3, 5, 5\), the config needs "
                                              r"\(16, 3, 3, 3\)"):
        L.load(folder)
    sd = dict(good)
    del sd["mid_block.attentions.0.to_k.weight"]
    save_file(sd, weights)
    with pytest.raises(CheckpointError, match="mid_block.attentions.0.to_k.weight is missing"):
        L.load(folder)
    save_file({**good, "class_embedding.weight": torch.randn(10, 64)}, weights)
    with pytest.raises(CheckpointError, match="class_embedding.weight.*do not belong"):
        L.load(folder)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**cfg, "block_out_channels": [16, 48]}))
    save_file(good, weights)
    with pytest.raises(CheckpointError, match="do not belong|has shape"):
        L.load(folder)


def test_cli_help_says_checkpoint_takes_diffusers_folders(capsys):
    from fastddpm.evaluate import build_parser
    from fastddpm.sample import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["nll", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.count("diffusers UNet2DModel / DDPMPipeline folder") == 2


def test_sample_cli_samples_a_diffusers_pipeline_folder(tmp_path, capsys):
    from fastddpm.sample import main as sample_main
    folder = _pipeline_folder(tmp_path)
    sample_main(["--checkpoint", str(folder), "--n", "2", "--batch-size", "2", "--out", str(tmp_path / "s"),
                 "--device", "cpu", "--no-progress"])
    images = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8
    # a diffusers folder has one set of weights (the paper's EMA ones, for google/ddpm-cifar10-32)
    # and no step: the summary says neither "raw weights" nor "step None"
    err = capsys.readouterr().err
    assert "2 samples (" in err and "None" not in err and "raw" not in err, err


def test_convert_cli_both_ways(tmp_path, capsys):
    from fastddpm.convert import main as convert_main
    folder = _pipeline_folder(tmp_path, variance_type="fixed_small")
    assert convert_main([str(folder), str(tmp_path / "m.pt")]) == 0
    ckpt = L.load(tmp_path / "m.pt")
    assert ckpt["config"]["diffusion"] == {"schedule": "linear", "T": 8, "beta_start": 1e-3, "beta_end": 0.2,
                                           "variance": "fixedsmall"}
    assert convert_main([str(tmp_path / "m.pt"), str(tmp_path / "back")]) == 0
    pipe = DDPMPipeline.from_pretrained(tmp_path / "back")
    from safetensors.torch import load_file
    orig = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(orig[k], v) for k, v in pipe.unet.state_dict().items())
    capsys.readouterr()
    for argv, msg in [([str(tmp_path / "nope"), str(tmp_path / "x")], "does not exist"),
                      ([str(folder), str(tmp_path / "m.pt")], "already exists"),
                      ([str(tmp_path / "m.pt"), str(tmp_path / "back")], "already exists"),
                      ([str(tmp_path / "m.pt"), str(tmp_path / "copy.pt")], "diffusers pipeline folder")]:
        with pytest.raises(SystemExit) as e:
            convert_main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and msg in err and "\n" not in err, err
    assert not (tmp_path / "copy.pt").exists()  # not a pipeline folder named like a file


def test_converted_files_get_the_umask_permissions(tmp_path):
    """Both outputs are readable as any file the user writes (mkstemp and safetensors make 0600)."""
    from fastddpm.convert import main as convert_main
    folder = _pipeline_folder(tmp_path)
    old = os.umask(0o022)
    try:
        assert convert_main([str(folder), str(tmp_path / "m.pt")]) == 0
        assert convert_main([str(tmp_path / "m.pt"), str(tmp_path / "back")]) == 0
    finally:
        os.umask(old)
    for path in (tmp_path / "m.pt", tmp_path / "back" / "unet" / "diffusion_pytorch_model.safetensors",
                 tmp_path / "back" / "unet" / "config.json"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path


def test_clip_sample_false_is_recorded_and_followed_by_the_sample_cli(tmp_path, monkeypatch, capsys):
    folder = _pipeline_folder(tmp_path, clip_sample=False)
    assert L.load(folder)["config"]["sampling"] == {"clip": False}
    other = _pipeline_folder(tmp_path / "b")
    assert L.load(other)["config"]["sampling"] == {"clip": True}
    import fastddpm.sample as S
    seen = []
    real = S.sample
    monkeypatch.setattr(S, "sample", lambda *a, **k: seen.append(k["clip"]) or real(*a, **k))
    for src, extra in ((folder, []), (other, []), (other, ["--no-clip"])):
        S.main(["--checkpoint", str(src), "--n", "1", "--steps", "2", "--out", str(tmp_path / "s"),
                "--device", "cpu", "--no-progress", "--overwrite"] + extra)
    assert seen == [False, True, False]
    assert "clip_sample=false" in capsys.readouterr().err


def test_clip_sample_false_survives_a_round_trip_through_convert(tmp_path):
    from fastddpm.convert import main as convert_main
    folder = _pipeline_folder(tmp_path, clip_sample=False)
    assert convert_main([str(folder), str(tmp_path / "m.pt")]) == 0
    assert convert_main([str(tmp_path / "m.pt"), str(tmp_path / "back")]) == 0
    assert DDPMPipeline.from_pretrained(tmp_path / "back").scheduler.config.clip_sample is False
    assert L.load(tmp_path / "back")["config"]["sampling"] == {"clip": False}
