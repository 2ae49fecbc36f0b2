"""Ancestral sampling and the sample CLI on a tiny model."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastddpm import GaussianDiffusion, UNet, UNetConfig, checkpoint
from fastddpm.sample import main as sample_main
from fastddpm.sampling import sample

CFG = UNetConfig.tiny(image_size=8, ch=16, ch_mult=(1,), attn_resolutions=(8,), num_groups=4)


def _model(seed=0):
    torch.manual_seed(seed)
    m = UNet(CFG)
    for p in m.parameters():  # leave the zero init so the output depends on x and t
        torch.nn.init.normal_(p, std=0.05)
    return m


def _write_ckpt(path, model, diffusion, ema=True):
    sd = model.state_dict()
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "step": 7,
                            "config": {"model": CFG.to_dict(), "diffusion": diffusion.config},
                            "model": {k: torch.zeros_like(v) for k, v in sd.items()} if ema else sd,
                            "ema": sd if ema else None}, path)


def test_sampler_is_deterministic_and_in_range():
    model, d = _model(), GaussianDiffusion.linear(T=20)
    a = sample(model, d, 5, batch_size=2, seed=3, progress=False)
    b = sample(model, d, 5, batch_size=2, seed=3, progress=False)
    c = sample(model, d, 5, batch_size=2, seed=4, progress=False)
    assert a.shape == (5, 3, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # the last step adds no noise and its mean is a convex mix of a clipped x0_hat
    # and x_1 scaled by coef2[0] == 0: the result lies in [-1, 1]
    assert a.abs().max() <= 1.0 + 1e-6
    assert a.std() > 0.05


def test_sampler_runs_algorithm_2():
    # Check the loop against a hand-written Algorithm 2 with the same noise draws.
    model, d = _model(), GaussianDiffusion.linear(T=6)
    out = sample(model, d, 2, batch_size=2, seed=11, progress=False)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        for i in reversed(range(6)):
            t = torch.full((2,), i)
            eps = model.eval()(x, t)
            z = torch.randn(2, 3, 8, 8, generator=g)
            x0 = (x / d.alphas_cumprod[i].sqrt() - (1 / d.alphas_cumprod[i] - 1).sqrt() * eps).clamp(-1, 1)
            mean = d.posterior_mean_coef1[i] * x0 + d.posterior_mean_coef2[i] * x
            x = (mean + (i > 0) * (0.5 * d.model_log_variance[i]).exp() * z).float()
    assert torch.allclose(out, x, atol=1e-5)


def test_sample_cli_end_to_end(tmp_path, capsys):
    model, d = _model(), GaussianDiffusion.linear(T=10)
    run = tmp_path / "run"
    _write_ckpt(run / checkpoint.checkpoint_name(7), model, d)
    out = tmp_path / "out"
    sample_main(["--checkpoint", str(run), "--n", "5", "--out", str(out), "--batch-size", "2",
                 "--seed", "1", "--device", "cpu", "--no-progress"])
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape == (5, 8, 8, 3) and arr.dtype == np.uint8
    img = Image.open(out / "samples.png")
    assert img.mode == "RGB" and img.width >= 8 * 3
    expect = sample(model, d, 5, batch_size=2, seed=1, progress=False)  # EMA weights are `model`
    assert np.array_equal(arr, ((expect + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy())
    assert "EMA weights" in capsys.readouterr().err


def test_bare_state_dict_with_config_json(tmp_path):
    model, d = _model(), GaussianDiffusion.linear(T=4)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps({"model": CFG.to_dict(), "diffusion": d.config}))
    loaded, d2, _ = checkpoint.load_for_sampling(tmp_path / "model.pt")
    assert d2.num_timesteps == 4
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_bad_checkpoints_are_refused(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load_for_sampling(tmp_path / "nope.pt")
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.load_for_sampling(tmp_path)
    model, d = _model(), GaussianDiffusion.linear(T=4)
    good = tmp_path / "good.pt"
    _write_ckpt(good, model, d)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="trunc.pt is unreadable"):
        checkpoint.load_for_sampling(trunc)
    other = UNet(UNetConfig.tiny(image_size=8, ch=32, ch_mult=(1,), attn_resolutions=(8,), num_groups=4))
    ck = torch.load(good, weights_only=False)
    ck["ema"] = other.state_dict()
    torch.save(ck, tmp_path / "other.pt")
    with pytest.raises(checkpoint.CheckpointError, match="do not fit the model config"):
        checkpoint.load_for_sampling(tmp_path / "other.pt")
    os.makedirs(tmp_path / "sub")
    torch.save({"x": torch.ones(1)}, tmp_path / "sub" / "m.pt")
    with pytest.raises(checkpoint.CheckpointError, match="config.json is missing"):
        checkpoint.load_for_sampling(tmp_path / "sub" / "m.pt")
    with pytest.raises(SystemExit, match="does not exist"):
        sample_main(["--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")])


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.atomic_save({"a": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        checkpoint.atomic_save({"a": Boom()}, path)
    assert torch.load(path, weights_only=False) == {"a": 1}
    assert os.listdir(tmp_path) == ["c.pt"]  # no temp file left behind
