"""Progressive distillation (fastddpm.distill, fastddpm.training.distill): the
nested grids, the round target against an independent float64 computation
through the samplers' own DDIM tables, the CLI's bad input, a tiny run that
writes one student per round and resumes bit-identically after stops, and
sampling a student on its grid with N network evaluations."""
import os

import numpy as np
import pytest
import torch

from fastddpm import loader as L
from fastddpm.diffusion import GaussianDiffusion
from fastddpm.distill import main
from fastddpm.sampling.tables import ddim_table
from fastddpm.train import main as train_main
from fastddpm.training.distill import DistillTrainer, RoundGrid, grid, round_target
from fastddpm.unet import UNet, UNetConfig
from _util import exit_code, one_error_line as _one_error_line

SMALL = ["--preset", "tiny", "--image-size", "8", "--ch", "8", "--ch-mult", "1", "--attn-resolutions", "",
         "--num-groups", "4", "--T", "32", "--batch-size", "4", "--lr", "1e-3", "--warmup", "1",
         "--workers", "0", "--no-progress", "--sample-n", "0", "--log-every", "1", "--threads", "1"]
# 8-step teacher grid, a conversion round of 2 updates, then 8 -> 4 (3 updates) -> 2 (3 updates);
# fp32 (the tiny preset trains in bf16 where the CPU has it, and a distillation inherits
# the teacher's precision): the torchrun test compares to fp32 rounding
RUN = ["--start-steps", "8", "--final-steps", "2", "--round-iters", "3", "--convert-iters", "2", "--precision", "fp32",
       "--batch-size", "4", "--lr", "1e-3", "--workers", "0", "--no-progress", "--log-every", "1", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny eps teacher trained for 3 steps (fastddpm.train): a run folder."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    assert train_main(SMALL + ["--out", str(out), "--steps", "3"]) == 0
    return out


def _code(args):
    return exit_code(main, args)


@pytest.mark.parametrize("T", [32, 500, 1000, 4000])
def test_every_halving_keeps_every_other_integer_point(T):
    n = 1
    while 2 * n <= T:
        fine, coarse = grid(T, 2 * n), grid(T, n)
        assert coarse == fine[0::2] and fine[0] == T - 1
        assert all(a > b >= 0 for a, b in zip(fine, fine[1:]))
        n *= 2


def _fixed_net(seed=0):
    """A small UNet in float64 whose every weight is seeded noise (no zero output layer)."""
    torch.manual_seed(seed)
    net = UNet(UNetConfig(image_size=8, in_channels=3, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=(4,), dropout=0.0, num_groups=4)).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_round_target_matches_two_teacher_ddim_steps_in_float64(prediction):
    """x~ is the x that makes ONE student DDIM step (the sampler's own ddim_table row
    on the N grid) land where TWO teacher DDIM steps (its rows on the 2N grid, with
    x0_hat clipped) land, computed here independently from the tables."""
    T, N = 32, 4
    d = GaussianDiffusion.linear(T, 1e-3, 0.2, prediction=prediction).double()
    net = _fixed_net()
    abar = d.alphas_cumprod.numpy()
    rg = RoundGrid(abar, N, factor=2)
    g = torch.Generator().manual_seed(1)
    j = torch.tensor([0, 1, 2, 3, 3, 0])
    z = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64) * 1.5
    got = round_target(net, d, z, j, rg.coefs, factor=2, clip=True)

    fine, coarse = grid(T, 2 * N), grid(T, N)
    tf, tc = ddim_table(abar, fine).numpy(), ddim_table(abar, coarse).numpy()

    def x0_of(x, t):
        out = net(x, torch.full((x.shape[0],), t, dtype=torch.long))
        a = float(abar[t])
        if prediction == "eps":
            x0 = (x - (1 - a) ** 0.5 * out) / a ** 0.5
        else:
            x0 = a ** 0.5 * x - (1 - a) ** 0.5 * out
        return x0.clamp(-1, 1)

    for b in range(6):
        k = N - 1 - int(j[b])                    # the student's row: from coarse[k]
        i = 2 * k                                # the teacher's rows i, i + 1: from fine[i] = coarse[k]
        x = z[b:b + 1]
        for row in (i, i + 1):
            x = tf[row, 2] * x + tf[row, 3] * x0_of(x, fine[row])   # c_x x + c_0 x0_hat
        want = (x - tc[k, 2] * z[b:b + 1]) / tc[k, 3]
        err = ((got[b:b + 1] - want).norm() / want.norm()).item()
        assert err < 1e-12, (b, err)
    # not the teacher's one-step x0_hat: the two steps matter
    one = round_target(net, d, z, j, rg.coefs, factor=1, clip=True)
    assert ((got - one).norm() / one.norm()).item() > 1e-3


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--teacher", "--out", "--final-steps", "--round-iters", "--start-steps", "--resume", "--batch-size",
                 "--lr", "--ema-decay", "--device", "--precision", "--seed", "--data", "--no-progress"):
        assert flag in out, flag


@pytest.mark.parametrize("flags, words", [
    (["--final-steps", "3"], ["--final-steps", "halved"]),
    (["--final-steps", "8"], ["--final-steps"]),
    (["--start-steps", "12"], ["--start-steps", "power of two"]),
    (["--start-steps", "64"], ["--start-steps", "T = 32"]),
    (["--round-iters", "0"], ["--round-iters", ">= 1"]),
    (["--prediction", "eps"], ["--prediction", "eps student"]),
    (["--round-iters", "x"], ["--round-iters"]),
])
def test_bad_flags_are_one_line_and_write_nothing(teacher, tmp_path, capsys, flags, words):
    out = tmp_path / "d"
    args = ["--teacher", str(teacher), "--out", str(out)] + RUN
    for f in flags[::2]:  # the flag given now replaces RUN's
        if f in args:
            i = args.index(f)
            del args[i:i + 2]
    assert _code(args + flags) == 2
    _one_error_line(capsys.readouterr().err, *words)
    assert not out.exists()


def test_unreadable_teacher_and_foreign_resume_are_one_line(teacher, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint" * 10)
    out = tmp_path / "d"
    assert _code(["--teacher", str(bad), "--out", str(out)] + RUN) == 2
    _one_error_line(capsys.readouterr().err, "bad.pt")
    assert _code(["--teacher", str(tmp_path / "missing"), "--out", str(out)] + RUN) == 2
    _one_error_line(capsys.readouterr().err, "missing")
    assert not out.exists()
    before = sorted(os.listdir(teacher))
    assert _code(["--resume", str(teacher)]) == 2  # a training run, not a distillation
    _one_error_line(capsys.readouterr().err, "not a distillation")
    assert sorted(os.listdir(teacher)) == before


def _stop_at(monkeypatch, steps):
    """Deliver SIGTERM (as the CLI's handler does) when the trainer reaches any of `steps`."""
    import signal
    orig = DistillTrainer.train_step

    def step(self, *a, **k):
        orig(self, *a, **k)
        if self.step + 1 in steps:
            self.signal = signal.SIGTERM
    monkeypatch.setattr(DistillTrainer, "train_step", step)


def _equal(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def test_tiny_distillation_writes_a_student_per_round_and_resumes_bit_identically(teacher, tmp_path, monkeypatch,
                                                                                   capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["--teacher", str(teacher), "--out", str(a)] + RUN) == 0
    names = sorted(n for n in os.listdir(a) if n.startswith("student-"))
    assert names == ["student-0002.pt", "student-0004.pt", "student-0008.pt"]
    for n, steps in ((2, 2), (4, 4), (8, 8)):
        s = L.load(a / f"student-{n:04d}.pt")
        assert s["config"]["sampling"]["distilled_steps"] == steps
        assert s["config"]["sampling"]["timesteps"] == grid(32, steps)
        assert s["config"]["diffusion"]["prediction"] == "v"
        assert "train_state" not in s
    # stopped mid-round (after update 3) and at a round's last update (5: before the next round's
    # teacher is made), resumed each time: the same bits as the run that never stopped
    _stop_at(monkeypatch, {3, 5})
    assert main(["--teacher", str(teacher), "--out", str(b)] + RUN) == 143
    assert L.load(b)["step"] == 3
    assert main(["--resume", str(b), "--no-progress"]) == 143
    assert L.load(b)["step"] == 5 and L.load(b)["train_state"]["distill"]["round"] == 1
    assert main(["--resume", str(b), "--no-progress"]) == 0
    ca, cb = L.load(a), L.load(b)
    assert ca["step"] == cb["step"] == 8
    for key in ("model", "ema"):
        _equal(ca[key], cb[key], key)
    _equal(ca["train_state"]["distill"]["teacher"], cb["train_state"]["distill"]["teacher"], "teacher")
    for n in (2, 4, 8):
        _equal(L.load(a / f"student-{n:04d}.pt")["ema"], L.load(b / f"student-{n:04d}.pt")["ema"], f"student {n}")
    t0 = L.load(teacher)["ema"]
    assert any(not torch.equal(t0[k], ca["ema"][k]) for k in t0)  # it did train
    # --resume with a flag that would change the run: one line, nothing written
    capsys.readouterr()
    before = sorted(os.listdir(b))
    assert _code(["--resume", str(b), "--round-iters", "5"]) == 2
    _one_error_line(capsys.readouterr().err, "--round-iters")
    assert sorted(os.listdir(b)) == before


def test_sampling_a_student_uses_its_grid_with_n_network_evaluations(teacher, tmp_path, monkeypatch, capsys):
    from fastddpm import sample as sample_cli
    out = tmp_path / "d"
    assert main(["--teacher", str(teacher), "--out", str(out)] + RUN) == 0
    seen = []
    orig = UNet.forward

    def forward(self, x, t):
        seen.append(int(t[0]))
        return orig(self, x, t)
    monkeypatch.setattr(UNet, "forward", forward)
    capsys.readouterr()
    sample_cli.main(["--checkpoint", str(out), "--n", "3", "--batch-size", "3", "--out", str(tmp_path / "s"),
                     "--no-progress", "--device", "cpu"])
    assert seen == grid(32, 2)  # the final student's 2 steps, one network evaluation each
    err = capsys.readouterr().err
    assert "warning" not in err and "ddim, 2 steps" in err
    images = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert images.shape == (3, 8, 8, 3) and images.std() > 0
    seen.clear()
    sample_cli.main(["--checkpoint", str(out / "student-0008.pt"), "--n", "1", "--out", str(tmp_path / "s8"),
                     "--no-progress", "--device", "cpu"])
    assert seen == grid(32, 8)
    seen.clear()
    sample_cli.main(["--checkpoint", str(out), "--n", "1", "--out", str(tmp_path / "s3"), "--no-progress",
                     "--device", "cpu", "--sampler", "dpmpp2m", "--steps", "3"])
    assert len(seen) == 3
    assert "distilled for 2 steps" in capsys.readouterr().err


def test_a_student_distils_further_without_a_data_flag(teacher, tmp_path):
    """A student checkpoint (no training config of its own) as the teacher of a new
    distillation, to fewer steps: its run's data and batch carry over, no --data needed."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["--teacher", str(teacher), "--out", str(first)] + RUN) == 0
    more = ["--start-steps", "4", "--final-steps", "1", "--round-iters", "2", "--convert-iters", "0",
            "--precision", "fp32", "--workers", "0", "--no-progress", "--threads", "1"]
    assert main(["--teacher", str(first / "student-0004.pt"), "--out", str(second)] + more) == 0
    got = L.load(second / "student-0001.pt")["config"]
    assert got["sampling"]["timesteps"] == grid(32, 1)
    was = L.load(first / "student-0004.pt")["config"]["distill"]["train"]
    assert (got["distill"]["train"]["data"], got["distill"]["train"]["batch_size"]) == (was["data"], was["batch_size"])


def test_two_ranks_under_torchrun_match_one_process(teacher, tmp_path):
    """torchrun, 2 CPU processes (gloo): each rank takes half the global batch; the students
    match the single-process run's to float rounding and the ranks hold the same weights."""
    import subprocess
    import sys
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["--teacher", str(teacher), "--out", str(one)] + RUN) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "fastddpm.distill", "--teacher", str(teacher), "--out", str(two)] + RUN,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout
    a, b = L.load(one), L.load(two)
    digests = b["train_state"]["param_digest_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    for n in (2, 4, 8):
        sa, sb = L.load(one / f"student-{n:04d}.pt")["ema"], L.load(two / f"student-{n:04d}.pt")["ema"]
        for k in sa:
            assert torch.allclose(sa[k], sb[k], atol=1e-5, rtol=1e-4), (n, k, (sa[k] - sb[k]).abs().max().item())
