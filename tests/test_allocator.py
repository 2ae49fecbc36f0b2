"""fastddpm.allocator: the CLIs' glibc settings for CPU runs (keep freed memory)."""
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from fastddpm import allocator

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                           reason="mallopt is glibc's")
CODE = "from fastddpm.allocator import keep_freed_memory; print(keep_freed_memory())"


def _run(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | (extra or {})
    r = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@glibc
def test_applies_on_glibc_and_leaves_a_users_malloc_settings_alone():
    assert _run() == "True"
    for var in allocator._USER_VARS:
        assert _run({var: "1000000"}) == "False", var


def test_train_and_sample_clis_apply_it_on_the_cpu(tmp_path, monkeypatch):
    import fastddpm.sample as sample_mod
    import fastddpm.train as train_mod
    import fastddpm.training.cli as run_mod  # train's (and distill's) run applies it
    calls = []
    for mod in (run_mod, sample_mod):
        monkeypatch.setattr(mod, "keep_freed_memory", lambda mod=mod: calls.append(mod.__name__) or True)
    imgs = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=imgs)
    run = tmp_path / "run"
    tiny = ["--preset", "tiny", "--image-size", "8", "--ch", "16", "--ch-mult", "1", "--attn-resolutions", "8",
            "--num-groups", "4", "--T", "20", "--batch-size", "8", "--workers", "0", "--no-progress",
            "--sample-n", "0", "--threads", "1", "--device", "cpu"]
    assert train_mod.main(tiny + ["--data", str(tmp_path / "d.npz"), "--steps", "1", "--out", str(run)]) == 0
    sample_mod.main(["--checkpoint", str(run), "--n", "2", "--out", str(tmp_path / "out"), "--device", "cpu",
                     "--no-progress"])
    assert calls == ["fastddpm.training.cli", "fastddpm.sample"]
