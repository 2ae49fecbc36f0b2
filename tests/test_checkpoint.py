"""Checkpoints: atomic writes, readable errors, keeping the last K, and a real
`python -m fastddpm.train` killed with SIGKILL at random moments (the newest
checkpoint always loads) and stopped with SIGTERM (it checkpoints and says how
to resume)."""
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastddpm import checkpoint as C
from fastddpm import loader as L
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
        L.load(tmp_path)
    path.write_bytes(os.urandom(3000))
    with pytest.raises(CheckpointError, match="ckpt-00000005.pt is unreadable"):
        L.load(tmp_path)
    # every first byte (pickle opcode): some made torch's unpickler raise a bare IndexError
    rng = torch.Generator().manual_seed(0)
    tail = bytes(torch.randint(0, 256, (2999,), generator=rng, dtype=torch.uint8).tolist())
    for first in range(256):
        path.write_bytes(bytes([first]) + tail)
        with pytest.raises(CheckpointError, match="ckpt-00000005.pt is unreadable"):
            L.load(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        L.resolve(tmp_path / "empty")


def test_an_npz_given_as_checkpoint_says_what_it_is(tmp_path, capsys):
    """sample --checkpoint samples.npz (a zip, but not torch's): no '[enforce fail at ...]'."""
    import numpy as np

    from fastddpm.sample import main as sample_main
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit) as e:
        sample_main(["--checkpoint", str(tmp_path / "samples.npz"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "samples.npz is unreadable" in err and "not one torch.save wrote" in err and "enforce" not in err


def test_version_1_checkpoints_are_refused_with_the_reason(tmp_path, capsys):
    """Version 1 networks padded Downsample symmetrically: loading their weights
    into the TF-'SAME' network would silently give another model."""
    from fastddpm import UNet, UNetConfig
    cfg = UNetConfig.tiny(image_size=8, ch_mult=(1, 2), attn_resolutions=())
    path = tmp_path / "ckpt-00000003.pt"
    C.atomic_save({"format": C.FORMAT, "version": 1, "step": 3, "config": {"model": cfg.to_dict()},
                   "model": UNet(cfg).state_dict(), "ema": None}, path)
    with pytest.raises(CheckpointError, match=r"ckpt-00000003.pt has format version 1: .*padded the stride-2"):
        L.load_for_sampling(tmp_path)
    err = _sample_cli_error(["--checkpoint", str(path), "--out", str(tmp_path / "o"), "--device", "cpu"], capsys)
    assert re.search("version 1.*retrain", err), err


def _sample_cli_error(argv, capsys):
    """Run the sample CLI on bad input: exit 2 and one `error: ...` line on stderr."""
    from fastddpm.sample import main as sample_main
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), (e.value.code, err)
    return err[0]


class _RunsCode:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save", "plain pickle"])
def test_a_checkpoint_that_would_run_code_is_refused_everywhere(tmp_path, capsys, how):
    import pickle
    marker = tmp_path / "pwned"
    path = tmp_path / "run" / "ckpt-00000009.pt"
    path.parent.mkdir()
    payload = {"format": C.FORMAT, "version": C.VERSION, "step": 9, "model": {}, "x": _RunsCode(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    # torch.save's pickle names the callable; a bare pickle is not torch.save's zip archive
    refused = (r"ckpt-00000009.pt holds Python objects other than tensors.*\((posix|os).system\): refused, "
               r"since loading it could run code" if how == "torch.save" else
               r"ckpt-00000009.pt is unreadable: not a zip archive")
    with pytest.raises(CheckpointError, match=refused):
        L.load(path)
    err = _sample_cli_error(["--checkpoint", str(path.parent), "--out", str(tmp_path / "o"), "--device", "cpu"],
                            capsys)
    assert re.search("error: checkpoint .*(could run code|not a zip archive)", err), err
    from fastddpm.train import main as train_main
    assert train_main(["--resume", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("could run code" in err[0] or "not a zip archive" in err[0]), err
    assert not marker.exists()


def _tiny_ckpt(**changes):
    from fastddpm import GaussianDiffusion, UNet, UNetConfig
    cfg = UNetConfig.tiny(image_size=8, ch_mult=(1, 2), attn_resolutions=(4,), num_groups=4)
    sd = UNet(cfg).state_dict()
    ckpt = {"format": C.FORMAT, "version": C.VERSION, "step": 2,
            "config": {"model": cfg.to_dict(), "diffusion": GaussianDiffusion.linear(T=10).config},
            "model": sd, "ema": {k: v.clone() for k, v in sd.items()}}
    ckpt.update(changes)
    return ckpt


def test_nonfinite_weights_are_refused_by_name(tmp_path, capsys):
    ckpt = _tiny_ckpt()
    ckpt["ema"]["down.0.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    ckpt["model"]["mid.1.qkv.bias"][3] = float("inf")
    C.atomic_save(ckpt, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"m.pt: ema weight down.0.0.conv1.weight holds 1 NaN/inf"):
        L.load_for_sampling(tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"m.pt: model weight mid.1.qkv.bias holds 1 NaN/inf"):
        L.load_for_sampling(tmp_path / "m.pt", use_ema=False)
    err = _sample_cli_error(["--checkpoint", str(tmp_path / "m.pt"), "--out", str(tmp_path / "o"), "--device", "cpu"],
                            capsys)
    assert "down.0.0.conv1.weight holds 1 NaN/inf" in err, err
    assert not (tmp_path / "o" / "samples.npz").exists()


def test_a_checkpoint_without_its_model_weights_names_the_key(tmp_path, capsys):
    ckpt = _tiny_ckpt()
    del ckpt["model"]
    C.atomic_save(ckpt, tmp_path / "ckpt-00000002.pt")
    with pytest.raises(CheckpointError, match=r"ckpt-00000002.pt has no model weights \(its key 'model' is missing\)"):
        L.load_for_sampling(tmp_path)
    from fastddpm.train import main as train_main
    assert train_main(["--resume", str(tmp_path), "--no-progress"]) == 2
    assert "its key 'model' is missing" in capsys.readouterr().err
    C.atomic_save(_tiny_ckpt(ema=[1, 2]), tmp_path / "ckpt-00000003.pt")
    with pytest.raises(CheckpointError, match="its 'ema' entry is not a state_dict"):
        L.load(tmp_path)


def _assert_disk_full_is_reported(tmp_path, path):
    with pytest.raises(CheckpointError) as e:
        C.atomic_save({"a": torch.zeros(3)}, path)
    assert str(e.value) == f"cannot write checkpoint {path}: No space left on device"
    assert torch.equal(torch.load(path)["a"], torch.ones(3))  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]  # no temp file left


def test_disk_full_while_checkpointing_says_so(tmp_path, monkeypatch):
    import errno
    path = str(tmp_path / "ckpt-00000001.pt")
    C.atomic_save({"a": torch.ones(3)}, path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(torch, "save", full)
        _assert_disk_full_is_reported(tmp_path, path)
    if os.path.exists("/dev/full"):  # a real ENOSPC from the write, as torch.save wraps it
        from fastddpm import files

        def on_dev_full(name, mode):  # the temp file is made (to be removed); its bytes go to /dev/full
            open(name, mode).close()
            return open("/dev/full", "wb")

        monkeypatch.setattr(files, "open", on_dev_full, raising=False)
        _assert_disk_full_is_reported(tmp_path, path)


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
            ckpt = L.load(path)
            assert ckpt["train_state"]["data"]["global_batch"] == 8
        model, _, _ = L.load_for_sampling(out)
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
