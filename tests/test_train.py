"""fastddpm.train on the CPU: --help, bit-identical resume, the metrics log and
outputs, skipped non-finite steps (fp32 and fp16 with a real GradScaler),
refused resumes. Tiny networks, a few steps each."""
import json
import os

import numpy as np
import pytest
import torch

from fastddpm import checkpoint as C
from fastddpm import loader as L
from fastddpm.checkpoint import CheckpointError
from fastddpm.diffusion import GaussianDiffusion
from fastddpm.train import config_from_args, main
from fastddpm.training.trainer import Trainer
from _util import exit_code, one_error_line as _one_error_line

# --lr-anneal 0: these runs are extended on resume (--steps), which re-plans an anneal
TINY = ["--preset", "tiny", "--image-size", "8", "--ch", "16", "--ch-mult", "1", "--attn-resolutions", "8",
        "--num-groups", "4", "--T", "20", "--batch-size", "8", "--lr", "1e-3", "--warmup", "2", "--lr-anneal", "0",
        "--ema-decay", "0.9", "--workers", "0", "--no-progress", "--sample-n", "0", "--log-every", "2",
        "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _equal_state(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def _equal_optimizer(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        _equal_state(a["state"][i], b["state"][i], f"optimizer state of parameter {i}")


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--data", "--out", "--steps", "--batch-size", "--lr", "--precision", "--device", "--seed",
                 "--ckpt-every", "--sample-every", "--resume", "--max-nonfinite", "--keep", "presets", "tiny:"):
        assert flag in out, flag


def test_resume_is_bit_identical(tmp_path):
    """Stopped at step 3 and resumed to 7 == 7 straight, with dropout, flips and an epoch boundary."""
    args = TINY + ["--dropout", "0.1", "--ckpt-every", "3"]
    # 20 images / batch 8: a new epoch (permutation) every 2 steps
    imgs = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=imgs)
    args += ["--data", str(tmp_path / "d.npz")]
    assert main(args + ["--out", str(tmp_path / "a"), "--steps", "7", "--workers", "1"]) == 0
    assert main(args + ["--out", str(tmp_path / "b"), "--steps", "3"]) == 0
    assert main(["--resume", str(tmp_path / "b"), "--steps", "7", "--no-progress"]) == 0
    a, b = L.load(tmp_path / "a"), L.load(tmp_path / "b")
    assert a["step"] == b["step"] == 7
    _equal_state(a["model"], b["model"], "model")
    _equal_state(a["ema"], b["ema"], "ema")
    _equal_optimizer(a["train_state"]["optimizer"], b["train_state"]["optimizer"])
    assert torch.equal(a["train_state"]["rng"][0]["torch"], b["train_state"]["rng"][0]["torch"])
    assert a["train_state"]["data"] == b["train_state"]["data"]
    assert any(not torch.equal(a["model"][k], L.load(tmp_path / "b" / C.checkpoint_name(3))["model"][k])
               for k in a["model"])  # it did train
    # the metrics log of the resumed run has one record per logged step, in order
    steps = [json.loads(x)["step"] for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 7


def _nhwc(p):
    return p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)


def test_memory_format_is_a_runtime_choice_with_contiguous_checkpoints(tmp_path, capsys):
    """--memory-format channels_last: checkpoints hold contiguous tensors (model, EMA,
    Adam moments); a resume is bit-identical to the straight run (the fused Adam moments
    loaded from a contiguous checkpoint take the channels_last parameters' layout: with
    mismatched strides fused Adam updates the wrong elements, silently); and a resume
    with another --memory-format loads the same numbers."""
    from fastddpm.training.trainer import params_digest

    args = TINY + ["--memory-format", "channels_last", "--ch-mult", "1,2", "--attn-resolutions", "4"]
    assert main(args + ["--out", str(tmp_path / "a"), "--steps", "4"]) == 0
    assert main(args + ["--out", str(tmp_path / "b"), "--steps", "2"]) == 0
    ckpt2 = L.load(tmp_path / "b")
    tensors = [*ckpt2["model"].values(), *ckpt2["ema"].values(),
               *(v for st in ckpt2["train_state"]["optimizer"]["state"].values() for v in st.values())]
    assert all(t.is_contiguous() for t in tensors) and any(t.dim() == 4 and t.shape[1] > 1 for t in tensors)
    assert main(["--resume", str(tmp_path / "b"), "--steps", "4", "--no-progress"]) == 0
    a, b = L.load(tmp_path / "a"), L.load(tmp_path / "b")
    _equal_state(a["model"], b["model"], "model")
    _equal_state(a["ema"], b["ema"], "ema")
    _equal_optimizer(a["train_state"]["optimizer"], b["train_state"]["optimizer"])
    assert json.load(open(tmp_path / "b" / "config.json"))["runtime"]["memory_format"] == "channels_last"
    # the same checkpoint resumed in either layout: the same state, the moments in p's layout
    path = tmp_path / "b" / C.checkpoint_name(2)
    for fmt in ("contiguous", "channels_last"):
        cfg, ckpt, rpath = config_from_args(["--resume", str(path), "--out", str(tmp_path / fmt),
                                             "--memory-format", fmt])
        tr = Trainer(cfg, resume=ckpt, resume_path=rpath, log=lambda *a: None)
        assert any(_nhwc(p) for p in tr.model.parameters()) == (fmt == "channels_last")
        assert any(_nhwc(p) for p in tr.ema.parameters()) == (fmt == "channels_last")
        for p in tr.params:
            assert all(v.stride() == p.stride() for v in tr.opt.state[p].values() if v.dim()), fmt
        st = tr.state_dict()
        _equal_state(st["model"], ckpt2["model"], fmt)
        _equal_state(st["ema"], ckpt2["ema"], fmt)
        _equal_optimizer(st["train_state"]["optimizer"], ckpt2["train_state"]["optimizer"])
        assert params_digest(tr.model) == ckpt2["train_state"]["param_digest_per_rank"][0]
    assert main(TINY + ["--out", str(tmp_path / "bad"), "--memory-format", "nhwc"]) == 2
    assert "--memory-format must be one of" in capsys.readouterr().err


def test_metrics_config_samples_and_sampling_cli_reads_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(TINY + ["--out", str(out), "--steps", "4", "--sample-every", "2", "--sample-n", "4",
                        "--ckpt-every", "2", "--keep", "1"]) == 0
    assert "done: step 4/4" in capsys.readouterr().out
    recs = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [2, 4]
    for r in recs:
        for k in ("step", "loss", "lr", "grad_norm", "images_per_s", "loss_scale", "skipped_steps"):
            assert k in r, k
        assert r["loss"] > 0 and r["images_per_s"] > 0 and r["skipped_steps"] == 0 and r["loss_scale"] == 1.0
    assert recs[0]["lr"] == pytest.approx(1e-3 * 1 / 2)  # step index 1 of a 2-step warm-up
    assert (out / "samples-00000002.png").exists() and (out / "samples-00000004.png").exists()
    cfg = json.load(open(out / "config.json"))
    assert cfg["model"]["ch"] == 16 and cfg["diffusion"]["T"] == 20 and cfg["train"]["steps"] == 4
    assert [s for s, _ in C.list_checkpoints(out)] == [4]  # --keep 1
    model, diffusion, ckpt = L.load_for_sampling(out)
    assert not model.training and diffusion.num_timesteps == 20
    _equal_state(model.state_dict(), ckpt["ema"], "sampling model vs EMA")  # EMA by default
    raw, _, _ = L.load_for_sampling(out, use_ema=False)
    _equal_state(raw.state_dict(), ckpt["model"], "use_ema=False")


def test_every_run_draws_its_curves_at_each_grid_and_at_the_end(tmp_path, monkeypatch):
    from fastddpm.training import curves

    drawn = []
    real = curves.write_run_curves
    monkeypatch.setattr(curves, "write_run_curves",
                        lambda run: drawn.append([r["step"] for r in curves.read_metrics(run)]) or real(run))
    out = tmp_path / "run"
    assert main(TINY + ["--out", str(out), "--steps", "5", "--sample-every", "2", "--sample-n", "4"]) == 0
    # grids at steps 2 and 4 (after that step's log record), then the end (a grid at 5 too)
    assert drawn == [[2], [2, 4], [2, 4, 5]]
    assert (out / "curves.png").stat().st_size > 0
    drawn.clear()
    assert main(TINY + ["--out", str(tmp_path / "nogrid"), "--steps", "2"]) == 0  # --sample-n 0: at the end
    assert drawn == [[2]] and (tmp_path / "nogrid" / "curves.png").exists()


def test_grids_and_fid_take_any_sampler(tmp_path, monkeypatch, capsys):
    from fastddpm.training import trainer as trainer_mod

    calls = []
    real = trainer_mod.sample
    monkeypatch.setattr(trainer_mod, "sample", lambda *a, **k: calls.append((k["sampler"], k["steps"])) or real(*a, **k))
    out = tmp_path / "run"
    assert main(TINY + ["--out", str(out), "--steps", "2", "--sample-n", "4", "--sample-sampler", "unipc",
                        "--sample-steps", "3"]) == 0
    assert calls == [("unipc", 3)] and (out / "samples-00000002.png").exists()
    cfg, _, _ = config_from_args(TINY + ["--out", str(tmp_path / "x"), "--sample-sampler", "ipndm"])
    assert trainer_mod.grid_steps(cfg) == 20 and trainer_mod.fid_steps(cfg) == 20   # T = 20 caps both
    capsys.readouterr()
    for flags, words in ((["--sample-sampler", "euler"], "--sample-sampler/--sample-steps: unknown sampler"),
                         (["--fid-sampler", "dpmpp3m", "--fid-steps", "2"], "--fid-sampler/--fid-steps:"),
                         (["--sample-steps", "21"], "--sample-sampler/--sample-steps: steps must be")):
        assert main(TINY + ["--out", str(tmp_path / "bad"), "--steps", "2"] + flags) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "bad").exists()


def test_grids_sample_with_the_runs_restart_and_threshold_and_record_them(tmp_path, monkeypatch, capsys):
    """The tiny preset's grids use Restart 0,9,16 and dynamic thresholding 0.995
    (flags change or drop them), the checkpoints record them for fastddpm.sample,
    and bad values are one line before anything is written."""
    from fastddpm.training import trainer as trainer_mod

    calls = []
    real = trainer_mod.sample
    monkeypatch.setattr(trainer_mod, "sample",
                        lambda *a, **k: calls.append((k["restart"], k["threshold"])) or real(*a, **k))
    cases = [([], ((0, 9, 16), 0.995), ([0, 9, 16], 0.995)),
             (["--sample-restart", "none", "--sample-threshold", "0"], (None, 0.0), (None, 0.0)),
             (["--sample-restart", "2,5,1"], ((2, 5, 1), 0.995), ([2, 5, 1], 0.995)),
             (["--sample-sampler", "ddim"], (None, 0.995), ([0, 9, 16], 0.995))]   # restart: ddpm only
    for i, (flags, used, recorded) in enumerate(cases):
        calls.clear()
        out = tmp_path / f"run{i}"
        assert main(TINY + ["--out", str(out), "--steps", "2", "--sample-n", "2"] + flags) == 0
        assert calls == [used], flags
        train = L.load(out)["config"]["train"]
        assert (train["sample_restart"], train["sample_threshold"]) == recorded, flags
    # a preset's restart that the run's grid has no room for is dropped, a given one refused
    calls.clear()
    assert main(TINY + ["--out", str(tmp_path / "short"), "--steps", "2", "--sample-n", "2", "--T", "8"]) == 0
    assert calls == [(None, 0.995)] and L.load(tmp_path / "short")["config"]["train"]["sample_restart"] is None
    capsys.readouterr()
    for flags, words in ((["--sample-restart", "9,2,1"], "--sample-restart"), (["--sample-restart", "0,9"], "LO,HI,K"),
                         (["--sample-threshold", "2"], "--sample-threshold"),
                         (["--sample-restart", "0,30,1"], "--sample-restart/--sample-threshold: restart's lo and hi")):
        assert _code(TINY + ["--out", str(tmp_path / "bad"), "--steps", "2"] + flags) == 2
        _one_error_line(capsys.readouterr().err, words)
    assert not (tmp_path / "bad").exists()


def test_a_failed_curves_drawing_costs_a_warning_not_the_run(tmp_path, monkeypatch, capsys):
    from fastddpm.training import curves

    def broken(run):
        raise RuntimeError("no fonts")
    monkeypatch.setattr(curves, "write_run_curves", broken)
    assert main(TINY + ["--out", str(tmp_path / "r"), "--steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "curves.png not drawn: RuntimeError: no fonts" in err
    assert C.list_checkpoints(tmp_path / "r")


def test_tensorboard_flag_writes_metrics_and_grids_or_says_how_to_install(tmp_path, monkeypatch, capsys):
    from fastddpm.training import tensorboard as tb

    if tb.available() is None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        out = tmp_path / "tb"
        assert main(TINY + ["--out", str(out), "--steps", "4", "--sample-every", "2", "--sample-n", "4",
                            "--tensorboard"]) == 0
        acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
        recs = [json.loads(x) for x in open(out / "metrics.jsonl")]
        assert [e.step for e in acc.Scalars("loss")] == [2, 4]
        assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in recs], rel=1e-6)
        assert [e.step for e in acc.Images("samples")] == [2, 4]
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)  # as if not installed
    capsys.readouterr()
    assert main(TINY + ["--out", str(tmp_path / "no"), "--steps", "2", "--tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install tensorboard" in err and not (tmp_path / "no").exists()


def _poison(monkeypatch, bad_steps, value=float("nan")):
    """Make training_loss non-finite on the given (0-based) steps of each Trainer call."""
    orig = GaussianDiffusion.training_loss
    calls = {"n": 0}

    def loss(self, model, x0, t=None, noise=None, generator=None, **kw):
        i = calls["n"]
        calls["n"] += 1
        out = orig(self, model, x0, t, noise, generator, **kw)
        return out * value if bad_steps(i) else out
    monkeypatch.setattr(GaussianDiffusion, "training_loss", loss)
    return calls


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch, precision):
    cfg, _, _ = config_from_args(TINY + ["--out", str(tmp_path / "r"), "--steps", "6", "--precision", precision])
    tr = Trainer(cfg)
    batch = torch.from_numpy(tr.dataset.images[:8])
    _poison(monkeypatch, lambda i: i in (2, 3), float("inf") if precision == "fp16" else float("nan"))
    snaps = []
    for s in range(5):
        t, noise, flip = tr.draw(s)
        tr.train_step(batch, t, noise, flip, 1e-3)
        snaps.append(([p.clone() for p in tr.params], [p.clone() for p in tr.ema_params]))
    for k in (2, 3):  # skipped: weights and EMA untouched
        assert all(torch.equal(a, b) for a, b in zip(snaps[k][0], snaps[1][0]))
        assert all(torch.equal(a, b) for a, b in zip(snaps[k][1], snaps[1][1]))
    assert not all(torch.equal(a, b) for a, b in zip(snaps[4][0], snaps[3][0]))
    assert all(torch.isfinite(p).all() for p in tr.params)
    steps = {int(v["step"]) for v in tr.opt.state.values()}
    assert steps == {3}  # Adam counted only the 3 good steps
    stats = tr.read_window()
    assert stats["skipped"] == 2 and stats["max_streak"] == 2 and stats["streak"] == 0
    if precision == "fp16":
        assert tr.scaler.get_scale() == 65536.0 / 4  # halved on each skipped step


def test_too_many_nonfinite_steps_stop_with_last_checkpoint_intact(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    _poison(monkeypatch, lambda i: i >= 4)
    code = main(TINY + ["--out", str(out), "--steps", "20", "--ckpt-every", "2", "--log-every", "1",
                        "--max-nonfinite", "3"])
    assert code == 3
    err = capsys.readouterr().err
    assert "3 consecutive steps" in err and "non-finite" in err and "checkpoint is intact" in err
    ckpt = L.load(out)
    assert ckpt["step"] <= 6
    good = L.load(out / C.checkpoint_name(4))
    _equal_state(ckpt["model"], good["model"], "weights after skipped steps")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    recs = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert recs[-1]["skipped_steps"] == 3 and recs[-1]["step"] == 7


def test_resume_with_another_config_is_refused(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(TINY + ["--out", out, "--steps", "2"]) == 0
    with pytest.raises(CheckpointError, match=r"ch: checkpoint 16, now 32"):
        config_from_args(["--resume", out, "--ch", "32"])
    with pytest.raises(CheckpointError, match=r"schedule: checkpoint 'cosine', now 'linear'"):
        config_from_args(["--resume", out, "--schedule", "linear"])  # the tiny preset's is cosine
    assert main(["--resume", out, "--steps", "4", "--batch-size", "4"]) == 2
    assert "batch_size: checkpoint 8, now 4" in capsys.readouterr().err
    np.savez(tmp_path / "other.npz", images=np.zeros((16, 8, 8, 3), np.uint8))
    assert main(["--resume", out, "--steps", "4", "--data", str(tmp_path / "other.npz")]) == 2
    assert "other data" in capsys.readouterr().err
    # a fresh run into a folder that holds a run is refused too
    assert main(TINY + ["--out", out, "--steps", "2"]) == 2
    assert "--resume" in capsys.readouterr().err
    # allowed overrides: more steps, another lr, log interval
    assert main(["--resume", out, "--steps", "3", "--lr", "5e-4", "--log-every", "1", "--no-progress"]) == 0
    assert L.load(out)["config"]["train"]["lr"] == 5e-4


def test_compile_trains_the_same_network_and_samples(tmp_path, monkeypatch, capsys):
    """--compile wraps the network in torch.compile (here with the aot_eager backend:
    dynamo + AOT autograd through the custom ops, without inductor's slow C++
    build): same parameters as eager, checkpoints keep plain keys, the sample CLI
    compiles too."""
    real_compile = torch.compile
    modes = []

    def compile_aot_eager(model, mode=None):
        modes.append(mode)
        return real_compile(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    args = TINY + ["--steps", "3", "--dropout", "0"]
    assert main(args + ["--out", str(tmp_path / "eager")]) == 0
    assert main(args + ["--out", str(tmp_path / "compiled"), "--compile", "default"]) == 0
    assert modes == ["default"]
    a, b = L.load(tmp_path / "eager"), L.load(tmp_path / "compiled")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        ref = a["model"][k].double()
        assert (b["model"][k].double() - ref).norm() <= 1e-5 * ref.norm() + 1e-7, k
    assert json.load(open(tmp_path / "compiled" / "config.json"))["train"]["compile"] == "default"
    from fastddpm.sample import main as sample_main
    out = {}
    for mode in ("none", "default"):
        sample_main(["--checkpoint", str(tmp_path / "compiled"), "--n", "2", "--out", str(tmp_path / mode),
                     "--device", "cpu", "--compile", mode, "--no-progress"])
        out[mode] = np.load(tmp_path / mode / "samples.npz")["arr_0"].astype(int)
    assert modes == ["default", "default"]
    assert np.abs(out["none"] - out["default"]).max() <= 1   # uint8 rounding at most
    assert main(args + ["--out", str(tmp_path / "bad"), "--compile", "fast"]) == 2
    assert "--compile must be one of" in capsys.readouterr().err


def test_schedule_flag_builds_that_diffusion(tmp_path, capsys):
    cfg, _, _ = config_from_args(TINY + ["--out", str(tmp_path / "c"), "--schedule", "cosine"])
    trainer = Trainer(cfg, log=lambda *a: None)
    ref = GaussianDiffusion.cosine(T=20)
    assert trainer.diffusion.config["schedule"] == "cosine"
    assert torch.equal(trainer.diffusion.betas, ref.betas)
    assert main(TINY + ["--out", str(tmp_path / "bad"), "--schedule", "sigmoid"]) == 2
    assert "--schedule must be one of" in capsys.readouterr().err


# ---- issue 10: what a careful user and an operator do -------------------------------

def _code(args):
    return exit_code(main, args)


def _image_folder(folder, n=8, bad=None):
    """n small PNGs of assorted sizes and kinds (RGB, 16-bit grey, RGBA); `bad`: the index
    of one saved instead as a JPEG cut in half (its header still passes verify())."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        if i == bad:
            Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"{i:02d}.jpg")
            raw = (folder / f"{i:02d}.jpg").read_bytes()
            (folder / f"{i:02d}.jpg").write_bytes(raw[:len(raw) // 2])
        elif i % 4 == 1:
            Image.fromarray(rng.integers(0, 65536, (9, 11), dtype=np.uint16)).save(folder / f"{i:02d}.png")
        elif i % 4 == 2:
            Image.fromarray(rng.integers(0, 256, (10, 10, 4), dtype=np.uint8), "RGBA").save(folder / f"{i:02d}.png")
        else:
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def test_trains_on_an_image_folder_and_resumes(tmp_path, capsys):
    folder = _image_folder(tmp_path / "imgs")
    out = tmp_path / "r"
    args = TINY + ["--data", str(folder), "--batch-size", "4", "--workers", "1"]
    assert main(args + ["--out", str(out), "--steps", "2"]) == 0
    stdout = capsys.readouterr().out
    assert f"images:{folder}" in stdout and "2 of 8 images have transparency" in stdout
    assert L.load(out)["train_state"]["data"]["source"] == f"images:{folder}"
    assert main(["--resume", str(out), "--steps", "3"]) == 0
    assert L.load(out)["step"] == 3


def test_unreadable_image_mid_training_is_one_line_after_a_checkpoint(tmp_path, capsys):
    from fastddpm.data import epoch_permutation

    bad = int(epoch_permutation(8, 0, 0)[4])  # first image of step 1's batch (batch 4, seed 0)
    folder = _image_folder(tmp_path / "imgs", bad=bad)
    out = tmp_path / "r"
    code = main(TINY + ["--data", str(folder), "--batch-size", "4", "--workers", "1", "--out", str(out),
                        "--steps", "4"])
    assert code == 2
    _one_error_line(capsys.readouterr().err, f"{bad:02d}.jpg", "truncated", "step 1",
                    C.checkpoint_name(1), "--resume")
    assert L.load(out)["step"] == 1


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_resume_never_touches_another_run_or_newer_checkpoints(tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(TINY + ["--out", str(b), "--steps", "4", "--ckpt-every", "2", "--log-every", "1"]) == 0
    assert main(TINY + ["--out", str(a), "--steps", "2"]) == 0
    capsys.readouterr()
    before = _snapshot(b)
    # another run's folder as --out: refused, nothing written
    assert main(["--resume", str(a), "--out", str(b), "--steps", "6"]) == 2
    _one_error_line(capsys.readouterr().err, str(b), "another run")
    # an older checkpoint inside its own folder: refused (the newer one would be lost or resumed by mistake)
    assert main(["--resume", str(b / C.checkpoint_name(2)), "--steps", "6"]) == 2
    _one_error_line(capsys.readouterr().err, C.checkpoint_name(4), "--out")
    assert _snapshot(b) == before
    # branching into a new folder works and leaves the source alone; keep-N prunes only there
    assert main(["--resume", str(b / C.checkpoint_name(2)), "--out", str(c), "--steps", "4",
                 "--ckpt-every", "1", "--keep", "1"]) == 0
    assert _snapshot(b) == before
    assert [s for s, _ in C.list_checkpoints(c)] == [4]
    final = capsys.readouterr().out.rsplit("checkpoint ", 1)[1].split()[0].rstrip(";")
    assert os.path.exists(final) and os.path.samefile(final, c / C.checkpoint_name(4))
    assert [json.loads(x)["step"] for x in open(c / "metrics.jsonl")] == [3, 4]  # (log-every 1 from b)
    assert json.load(open(c / "config.json"))["train"]["out"] == str(c)


def test_one_trainer_per_run_folder(tmp_path, capsys):
    import subprocess
    import sys

    out = tmp_path / "r"
    assert main(TINY + ["--out", str(out), "--steps", "2"]) == 0
    capsys.readouterr()
    # another process holds the lock a running trainer holds (POSIX locks are per process)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.lockf(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()", str(out / ".lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["--resume", str(out), "--steps", "3"]) == 2
        _one_error_line(capsys.readouterr().err, str(out), "in use by another trainer")
        assert L.load(out)["step"] == 2
    finally:
        holder.communicate("", timeout=30)
    assert main(["--resume", str(out), "--steps", "3"]) == 0  # released: free again


def test_bad_out_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("a file")
    for out in (tmp_path / "f", tmp_path / "f" / "run"):
        assert _code(TINY + ["--out", str(out), "--steps", "1"]) == 2
        _one_error_line(capsys.readouterr().err, str(tmp_path / "f"), "is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_folder_is_one_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert _code(TINY + ["--out", str(ro / "run"), "--steps", "1"]) == 2
        _one_error_line(capsys.readouterr().err, str(ro), "not writable")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("flags, words", [
    (["--device", "foo"], ["foo", "not a device"]),
    (["--device", "mps"], ["mps", "cpu or cuda"]),
    (["--device", "meta"], ["meta", "cpu or cuda"]),
    (["--seed", "-1"], ["--seed", "2**63"]),
    (["--seed", str(2 ** 63)], ["--seed", "2**63"]),  # trained, then the final sample grid raised
    (["--lr", "inf"], ["--lr", "finite number", "inf"]),
    (["--lr", "nan"], ["--lr", "finite number"]),
    (["--dropout", "nan"], ["--dropout", "finite number"]),
    (["--steps", "abc"], ["--steps", "expected an integer", "abc"]),  # not "invalid parse value"
    (["--warmup", "1.5"], ["--warmup", "expected an integer", "1.5"]),
    (["--lr-anneal", "1.5"], ["--lr-anneal", "[0, 1]", "1.5"]),
    (["--ch-mult", "1,x"], ["--ch-mult", "comma-separated integers", "1,x"]),
])
def test_bad_flags_are_one_line_before_anything_is_written(tmp_path, capsys, flags, words):
    out = tmp_path / "r"
    assert _code(TINY + ["--out", str(out), "--steps", "2"] + flags) == 2
    _one_error_line(capsys.readouterr().err, *words)
    assert not out.exists()


def test_disk_full_while_checkpointing_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    def full(obj, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(C, "atomic_save", full)
    out = tmp_path / "r"
    assert main(TINY + ["--out", str(out), "--steps", "2"]) == 1
    _one_error_line(capsys.readouterr().err, "No space left on device", str(out / C.checkpoint_name(2)))


def test_torn_metrics_line_is_cut_and_records_say_their_window(tmp_path):
    out = tmp_path / "r"
    assert main(TINY + ["--out", str(out), "--steps", "3", "--log-every", "2"]) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.1')  # a kill in the middle of a write
    assert main(["--resume", str(out), "--steps", "6"]) == 0
    recs = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [(r["step"], r["window_steps"]) for r in recs] == [(2, 2), (3, 1), (4, 1), (6, 2)]


def test_slow_settings_warn(tmp_path, capsys):
    from fastddpm.training.config import usable_cpus

    for flags, words in ((["--threads", str(usable_cpus() + 1)], ["--threads", "cores", "slower"]),
                         (["--precision", "fp16", "--device", "cpu"], ["fp16", "CPU", "fp32"])):
        cfg, _, _ = config_from_args(TINY + ["--out", str(tmp_path / "r")] + flags)
        Trainer(cfg, log=lambda *a: None)
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "warning" in err, err
        for w in words:
            assert w in err, (w, err)
    cfg, _, _ = config_from_args(TINY + ["--out", str(tmp_path / "r")])
    Trainer(cfg, log=lambda *a: None)
    assert capsys.readouterr().err == ""


def test_variance_may_change_on_resume_as_the_help_says(tmp_path, capsys):
    from fastddpm.train import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "--variance, which only affects sampling, is allowed" in text
    assert "may change on --resume" in text
    out = tmp_path / "r"
    assert main(TINY + ["--out", str(out), "--steps", "2"]) == 0  # the tiny preset samples with fixedsmall
    assert main(["--resume", str(out), "--steps", "3", "--variance", "fixedlarge"]) == 0
    assert "sampling variance fixedsmall -> fixedlarge" in capsys.readouterr().out
    ckpt = L.load(out)
    assert ckpt["config"]["diffusion"]["variance"] == ckpt["config"]["train"]["variance"] == "fixedlarge"
    assert json.load(open(out / "config.json"))["diffusion"]["variance"] == "fixedlarge"
    assert L.load(out / C.checkpoint_name(2))["config"]["diffusion"]["variance"] == "fixedsmall"


# ---- SIGTERM to the whole process group (Slurm's scancel, systemd) --------------------

SMALL = ["--preset", "tiny", "--image-size", "8", "--ch", "8", "--ch-mult", "1", "--attn-resolutions", "",
         "--num-groups", "4", "--batch-size", "4", "--no-progress", "--log-every", "1", "--threads", "1"]


def _start(out, args):
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.Popen([sys.executable, "-m", "fastddpm.train", "--out", str(out)] + SMALL + args,
                            start_new_session=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(proc, ready, timeout=120):
    import time

    t = time.monotonic()
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t < timeout, "timed out"
        time.sleep(0.05)


def _kill_group_and_wait(proc, timeout=120):
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def test_sigterm_to_the_process_group_saves_and_exits_143(tmp_path):
    """The signal reaches the data-loader workers too (two of them): they leave it to the
    trainer, which saves and exits 128 + 15."""
    out = tmp_path / "r"
    proc = _start(out, ["--steps", "1000000", "--T", "20", "--ckpt-every", "0", "--sample-n", "0",
                        "--workers", "2"])
    metrics = out / "metrics.jsonl"
    _wait_for(proc, lambda: metrics.exists() and metrics.stat().st_size > 0)  # training, workers up
    stdout, stderr = _kill_group_and_wait(proc)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "SIGTERM at step" in stdout
    step = L.load(out)["step"]
    assert step >= 1 and C.checkpoint_name(step) in stdout


def test_sigterm_during_the_final_sample_grid_stops_promptly(tmp_path):
    out = tmp_path / "r"
    # 4000 sampling steps: far longer than the test waits once the checkpoint is there
    proc = _start(out, ["--steps", "1", "--T", "4000", "--sample-n", "2", "--sample-batch", "2",
                        "--workers", "1"])
    _wait_for(proc, lambda: (out / C.checkpoint_name(1)).exists())  # saved: now sampling
    stdout, stderr = _kill_group_and_wait(proc, timeout=60)
    assert proc.returncode == 143, (stdout, stderr)
    assert "Traceback" not in stderr and "SIGTERM at step 1" in stdout
    assert not list(out.glob("samples-*.png"))
    assert L.load(out)["step"] == 1


@pytest.mark.parametrize("hook", ["sample_grid", "fid"])
def test_an_error_after_a_step_saves_the_steps_done(tmp_path, monkeypatch, hook):
    """A sample grid or in-training FID that fails after step 3 (no --ckpt-every
    checkpoint yet) leaves a checkpoint at step 3 and re-raises the error."""
    import fastddpm.training.config as training_config

    def boom(*a, **k):
        raise RuntimeError("hook failed")

    out = tmp_path / "r"
    args = TINY + ["--out", str(out), "--steps", "6", "--ckpt-every", "0", "--log-every", "1"]
    if hook == "sample_grid":
        monkeypatch.setattr(Trainer, "write_samples", boom)
        args += ["--sample-every", "3", "--sample-n", "2"]
    else:
        monkeypatch.setattr(training_config, "check_training_fid", lambda cfg: None)
        monkeypatch.setattr(Trainer, "record_fid", boom)
        args += ["--fid-every", "3", "--fid-ref", str(tmp_path / "ref.npz")]
    with pytest.raises(RuntimeError, match="hook failed") as e:
        main(args)
    assert C.list_checkpoints(out) == [(3, str(out / C.checkpoint_name(3)))]
    assert any(C.checkpoint_name(3) in n and "--resume" in n for n in e.value.__notes__)
    assert L.load(out)["step"] == 3
    # and the run continues from it (the hook working again)
    monkeypatch.setattr(Trainer, "write_samples", lambda self: None)
    monkeypatch.setattr(Trainer, "record_fid", lambda *a, **k: None)
    assert main(["--resume", str(out), "--steps", "4", "--no-progress"]) == 0
    assert L.load(out)["step"] == 4


def test_a_folder_with_metrics_but_no_checkpoint_does_not_point_to_resume(tmp_path, capsys):
    """A run killed before its first checkpoint leaves metrics.jsonl only: the refusal
    must not advise --resume (which finds no checkpoint there)."""
    out = tmp_path / "r"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 0.5}) + "\n")
    assert main(TINY + ["--out", str(out), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "--resume" not in err and "metrics.jsonl" in err
    assert main(["--resume", str(out), "--steps", "2"]) == 2  # indeed nothing to resume
    assert (out / "metrics.jsonl").read_text().count("\n") == 1  # and nothing was touched


@pytest.mark.parametrize("probes, want", [({"_is_avx512_bf16_supported": True}, True),
                                          ({"_is_amx_tile_supported": True}, True),
                                          ({"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": False},
                                           False),
                                          ({}, False)])  # a torch without the probes: fp32
def test_native_bf16_probe(monkeypatch, probes, want):
    from fastddpm import runtime
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        if name in probes:
            monkeypatch.setattr(torch.cpu, name, lambda v=probes[name]: v, raising=False)
        else:
            monkeypatch.delattr(torch.cpu, name, raising=False)
    assert runtime.cpu_has_native_bf16() is want


def test_tiny_preset_spends_bf16_speed_on_steps_and_cifar10_stays_the_paper():
    """bf16 autocast only where the CPU computes it natively (else fp32), and the step
    count that keeps the run's time; cifar10 keeps every TrainConfig default."""
    from fastddpm.runtime import cpu_has_native_bf16
    from fastddpm.training.config import TrainConfig, preset_config

    tiny = preset_config("tiny")
    native = cpu_has_native_bf16()
    assert (tiny.precision, tiny.steps) == (("bf16", 2500) if native else (None, 1850))
    assert (tiny.schedule, tiny.T, tiny.variance) == ("cosine", 100, "fixedsmall")
    assert (tiny.lr, tiny.lr_anneal) == (4e-3, 0.5)
    assert (tiny.sample_restart, tiny.sample_threshold) == ((0, 9, 16), 0.995)
    assert preset_config("cifar10") == TrainConfig(preset="cifar10")
    paper = TrainConfig()
    assert (paper.schedule, paper.T, paper.beta_start, paper.beta_end, paper.variance, paper.lr, paper.batch_size,
            paper.ema_decay, paper.precision, paper.lr_anneal, paper.sample_restart, paper.sample_threshold) == (
        "linear", 1000, 1e-4, 0.02, "fixedlarge", 2e-4, 128, 0.9999, None, 0.0, None, 0.0)
