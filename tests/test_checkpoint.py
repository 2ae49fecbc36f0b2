"""Checkpoints: atomic writes, readable errors, keeping the last K, and a real
`python -m fastddpm.train` killed with SIGKILL at random moments (the newest
checkpoint always loads) and stopped with SIGTERM (it checkpoints and says how
to resume)."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastddpm import checkpoint as C
from fastddpm.checkpoint import CheckpointError

TINY = ["--preset", "tiny", "--image-size", "8", "--ch", "16", "--ch-mult", "1", "--attn-resolutions", "",
        "--num-groups", "4", "--T", "20", "--batch-size", "8", "--warmup", "2", "--no-progress",
        "--sample-n", "0", "--log-every", "1", "--threads", "1"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def test_atomic_save_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "ckpt-00000001.pt"
    C.atomic_save({"a": torch.ones(3)}, path)
    with pytest.raises(Exception):
        C.atomic_save({"a": torch.zeros(3), "bad": lambda: 0}, path)  # lambdas do not pickle
    assert torch.equal(torch.load(path)["a"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt-00000001.pt"]  # no temp file left behind


def test_unreadable_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "ckpt-00000005.pt"
    C.atomic_save({"format": C.FORMAT, "version": C.VERSION, "x": torch.randn(1000)}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="ckpt-00000005.pt.*unreadable"):
        C.load(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        C.resolve(tmp_path / "empty")


def test_version_1_checkpoints_are_refused_with_the_reason(tmp_path):
    """Version 1 networks padded Downsample symmetrically: loading their weights
    into the TF-'SAME' network would silently give another model."""
    from fastddpm import UNet, UNetConfig
    cfg = UNetConfig.tiny(image_size=8, ch_mult=(1, 2), attn_resolutions=())
    path = tmp_path / "ckpt-00000003.pt"
    C.atomic_save({"format": C.FORMAT, "version": 1, "step": 3, "config": {"model": cfg.to_dict()},
                   "model": UNet(cfg).state_dict(), "ema": None}, path)
    with pytest.raises(CheckpointError, match=r"ckpt-00000003.pt has format version 1: .*padded the stride-2"):
        C.load_for_sampling(tmp_path)
    from fastddpm.sample import main as sample_main
    with pytest.raises(SystemExit, match="version 1.*retrain"):
        sample_main(["--checkpoint", str(path), "--out", str(tmp_path / "o"), "--device", "cpu"])


def _wait_for(cond, timeout, what, proc=None):
    t0 = time.monotonic()
    while not cond():
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"training exited early ({proc.returncode}) while waiting for {what}:\n{out}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _newest_step(out):
    found = C.list_checkpoints(out)
    return found[-1][0] if found else -1


def test_sigkill_at_random_moments_never_breaks_the_newest_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    base = [sys.executable, "-m", "fastddpm.train"]
    rng = random.Random(1234)
    prev = -1
    for round_ in range(3):
        if round_ == 0:
            cmd = base + TINY + ["--out", out, "--steps", "100000", "--ckpt-every", "1", "--keep", "3",
                                 "--workers", "1"]
        else:
            cmd = base + ["--resume", out, "--no-progress"]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
        try:
            _wait_for(lambda: _newest_step(out) > prev, 120, f"a checkpoint past step {prev}", p)
            time.sleep(rng.uniform(0.0, 0.4))  # a random moment: mid-step or mid-save
            p.kill()
            p.wait(30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()
        assert p.returncode == -signal.SIGKILL
        steps = [s for s, _ in C.list_checkpoints(out)]
        assert steps and steps[-1] > prev
        for _, path in C.list_checkpoints(out):  # the newest, and every other one kept, loads
            ckpt = C.load(path)
            assert ckpt["train_state"]["data"]["global_batch"] == 8
        model, _, _ = C.load_for_sampling(out)
        assert all(torch.isfinite(v).all() for v in model.state_dict().values())
        prev = steps[-1]

    # SIGTERM: the run checkpoints the step it is at and exits 128 + 15
    p = subprocess.Popen(base + ["--resume", out, "--no-progress", "--ckpt-every", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    metrics = os.path.join(out, "metrics.jsonl")
    start = _count_lines(metrics)
    try:
        _wait_for(lambda: _count_lines(metrics) >= start + 3, 120, "3 more logged steps", p)
        p.send_signal(signal.SIGTERM)
        text, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 128 + signal.SIGTERM, text
    assert "SIGTERM" in text and "--resume" in text
    assert _newest_step(out) > prev
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def _count_lines(path):
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0
