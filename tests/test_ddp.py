"""torchrun with 2 CPU processes (gloo): the ranks hold identical parameters,
equal within float tolerance to one process with the same global batch, and a
run resumes on a different number of ranks (2 -> 1 and 1 -> 2)."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from fastddpm import checkpoint as C
from fastddpm import loader as L
from fastddpm.train import main

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

# --lr-anneal 0: these runs are extended on resume (--steps), which re-plans an anneal
TINY = ["--preset", "tiny", "--image-size", "8", "--ch", "16", "--ch-mult", "1", "--attn-resolutions", "8",
        "--num-groups", "4", "--T", "20", "--batch-size", "8", "--lr", "1e-3", "--warmup", "2", "--lr-anneal", "0",
        "--ema-decay", "0.9", "--dropout", "0", "--workers", "0", "--no-progress", "--sample-n", "0",
        "--log-every", "1", "--threads", "1", "--device", "cpu",
        "--precision", "fp32"]  # the tolerances below are fp32's; the preset may pick bf16 (native-bf16 CPUs)


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _torchrun(args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fastddpm.train", *args]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout
    return r.stdout


def _close(a, b, what, atol=1e-5, rtol=1e-4):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=rtol), \
            f"{what} {k}: max |diff| {(a[k] - b[k]).abs().max().item():.3e}"


def _ranks_identical(ckpt):
    ts = ckpt["train_state"]
    assert ts["world_size"] == 2
    digests = ts["param_digest_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1], "the two ranks hold different parameters"
    assert len(ts["rng"]) == 2 and not torch.equal(ts["rng"][0]["torch"], ts["rng"][1]["torch"])


def test_two_ranks_match_one_process_and_resume_across_rank_counts(tmp_path):
    single, two, mixed = tmp_path / "single", tmp_path / "two", tmp_path / "mixed"
    # one process, global batch 8: the reference trajectory, checkpoints at 3 and 6
    assert main(TINY + ["--out", str(single), "--steps", "6", "--ckpt-every", "3", "--keep", "5"]) == 0
    ref3 = L.load(single / C.checkpoint_name(3))
    ref6 = L.load(single / C.checkpoint_name(6))

    # two ranks x 4 images, from scratch to step 3
    text = _torchrun(TINY + ["--out", str(two), "--steps", "3"])
    assert text.count("done: step 3/3") == 1  # rank 0 alone reports
    got3 = L.load(two)
    assert got3["step"] == 3
    _ranks_identical(got3)
    _close(got3["model"], ref3["model"], "2 ranks vs 1 process, step 3:")
    _close(got3["ema"], ref3["ema"], "EMA, step 3:")

    # 2 -> 1: the two-rank checkpoint continues in one process
    assert main(["--resume", str(two), "--steps", "6", "--no-progress"]) == 0
    _close(L.load(two)["model"], ref6["model"], "2 ranks then 1 process, step 6:")

    # 1 -> 2: the single-process checkpoint at step 3 continues on two ranks
    mixed.mkdir()
    shutil.copy(single / C.checkpoint_name(3), mixed / C.checkpoint_name(3))
    _torchrun(["--resume", str(mixed), "--steps", "6", "--no-progress"])
    got6 = L.load(mixed)
    assert got6["step"] == 6
    _ranks_identical(got6)
    _close(got6["model"], ref6["model"], "1 process then 2 ranks, step 6:")
    _close(got6["ema"], ref6["ema"], "EMA, step 6:")
    _close_opt(got6, ref6)


def _close_opt(a, b):
    sa, sb = a["train_state"]["optimizer"]["state"], b["train_state"]["optimizer"]["state"]
    for i in sa:
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(sa[i][k], sb[i][k], atol=1e-6, rtol=1e-3), f"Adam {k} of parameter {i}"


def test_a_folder_rank_0_cannot_claim_stops_every_rank_with_one_line(tmp_path):
    """Another trainer holds the folder's lock: rank 0 refuses it, and rank 1 exits 2
    too instead of failing with a traceback in a collective rank 0 never joins."""
    import fcntl
    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.lockf(fd, fcntl.LOCK_EX)  # a POSIX lock: the child processes cannot take it
    try:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "fastddpm.train", *TINY, "--out", str(out), "--steps", "3"]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=300)
    finally:
        os.close(fd)
    assert r.returncode != 0
    assert r.stdout.count("is in use by another trainer") == 1, r.stdout
    assert "[rank1]" not in r.stdout and "barrier" not in r.stdout, r.stdout  # no traceback from rank 1
    assert not list(out.glob("*.pt")) and not (out / "config.json").exists()


@pytest.mark.parametrize("fault", ["checkpoint", "metrics"])
def test_a_write_only_rank_0_does_failing_stops_every_rank_with_one_line(tmp_path, fault):
    """Rank 0's checkpoint write fails (disk full) or its metrics.jsonl write does: rank 0
    says so in one line, and rank 1 stops with one line too instead of a traceback from the
    collective rank 0 left. The fault is injected into rank 0 alone by a sitecustomize."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '0':\n"
        "    import fastddpm.checkpoint as C, fastddpm.training.run_folder as R\n"
        f"    if {fault!r} == 'checkpoint':\n"
        "        def full(state, path, *a, **k):\n"
        "            raise C.CheckpointError(f'cannot write checkpoint {path}: No space left on device')\n"
        "        C.atomic_save = full\n"
        "    else:\n"
        "        import json\n"
        "        real = json.dumps\n"
        "        def dumps(obj, *a, **k):\n"
        "            if isinstance(obj, dict) and 'images_per_s' in obj:\n"
        "                raise OSError(28, 'No space left on device', 'metrics.jsonl')\n"
        "            return real(obj, *a, **k)\n"
        "        R.json.dumps = dumps\n")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")]))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastddpm.train", *TINY, "--out", str(out), "--steps", "3", "--ckpt-every", "2"]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=300)
    assert r.returncode != 0
    assert r.stdout.count("No space left on device") >= 1, r.stdout
    assert "rank 1: stopping at step" in r.stdout and "rank 0 failed" in r.stdout, r.stdout
    assert "[rank1]" not in r.stdout and "[rank0]" not in r.stdout, r.stdout  # no traceback from either rank
