"""Files a user hands fastddpm are untrusted (issue 21): every probe of the issue,
done as the user did it (crafted .pt files, bare state_dicts with config.json,
diffusers folders, statistics files, flags), through the CLIs' main() in one
child process whose address space is capped (RLIMIT_AS), so that a regression
fails here instead of exhausting the machine. Each must exit 2 with one line on
stderr, no traceback, and write nothing. Sample folders are owned like run
folders: earlier samples are never replaced silently, two runs on one --out
give one winner and one refusal."""
import json
import os
import resource
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from fastddpm import checkpoint as C
from fastddpm import interop, limits
from fastddpm.diffusion import GaussianDiffusion
from fastddpm.unet import UNet, UNetConfig

AS_LIMIT = 4 << 30  # torch's import reserves ~0.8 GiB of address space; a 4096-channel network needs ~6
RSS_LIMIT = 1 << 30
CFG = UNetConfig.tiny(image_size=8, ch_mult=(1, 2), attn_resolutions=(4,), num_groups=4)

# One child runs the probes in turn: main(argv) of each CLI as `python -m` would,
# stderr captured per probe, an escaping exception printed as Python prints it.
_CHILD = r"""
import contextlib, importlib, io, json, resource, sys, traceback
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
results = []
for module, argv in json.load(open(sys.argv[2])):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = importlib.import_module(module).main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = 1
    # VmHWM: this process image's peak RSS (ru_maxrss would keep the forking pytest's across exec)
    hwm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
    results.append({"code": code if isinstance(code, int) else 0 if code is None else 1, "err": err.getvalue(),
                    "rss": hwm * 1024})
json.dump(results, open(sys.argv[3], "w"))
"""


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _run_probes(tmp_path, probes):
    """[(code, stderr, peak RSS so far)] of each (module, argv), run in turn in one address-space-capped child."""
    (tmp_path / "probes.json").write_text(json.dumps(probes))
    r = subprocess.run([sys.executable, "-c", _CHILD, str(AS_LIMIT), str(tmp_path / "probes.json"),
                        str(tmp_path / "results.json")], env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [(x["code"], x["err"], x["rss"]) for x in json.loads((tmp_path / "results.json").read_text())]


def _assert_refused(code, err, match, what):
    assert "Traceback" not in err, (what, err)
    assert code == 2 and err.count("\n") == 1 and "error:" in err, (what, code, err)
    assert match in err, (what, match, err)


def _ckpt(model_cfg=None, weights_cfg=CFG, diffusion=None, train=None, dtype=torch.float32, fill=None):
    torch.manual_seed(0)
    sd = {k: v.to(dtype) for k, v in UNet(weights_cfg).state_dict().items()}
    if fill is not None:
        for v in sd.values():
            v.fill_(fill)
    config = {"model": model_cfg if model_cfg is not None else CFG.to_dict(),
              "diffusion": diffusion or GaussianDiffusion.linear(T=10).config}
    if train is not None:
        config["train"] = train
    return {"format": C.FORMAT, "version": C.VERSION, "step": 1, "config": config, "model": sd, "ema": None}


def _pipeline(root, unet=None, scheduler=None):
    """A DDPMPipeline folder of the tiny network, its configs then edited as a user could."""
    interop.export_pipeline(_ckpt(), root)
    for rel, changes in (("unet/config.json", unet), ("scheduler/scheduler_config.json", scheduler)):
        if changes:
            cfg = json.loads((root / rel).read_text())
            cfg.update(changes)
            (root / rel).write_text(json.dumps(cfg))
    return root


def _legacy_pt_with_a_huge_storage(path):
    """torch.save's pre-zip format, its one storage declaring 2^31 - 1 floats (8 GiB) in 16 bytes."""
    import io
    buf = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buf, _use_new_zipfile_serialization=False)
    n = struct.pack("<i", 2**31 - 1)
    raw = buf.getvalue().replace(b"cpuq\x06K\x04N", b"cpuq\x06J" + n + b"N")
    assert raw != buf.getvalue()
    path.write_bytes(raw)


def _stats(path, mu, sigma, **more):
    np.savez(path, mu=mu, sigma=sigma, **more)
    return str(path)


def _npz_declaring(path, name, shape):
    """An .npz whose array `name` has a .npy header declaring `shape` (float64) over 8 bytes of data."""
    header = np.lib.format.header_data_from_array_1_0(np.zeros(1))
    header["shape"] = shape
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(name + ".npy", buf.getvalue() + bytes(8))
        z.writestr("sigma.npy", buf.getvalue() + bytes(8))
    return str(path)


def test_every_probe_of_the_issue_is_refused_in_bounded_memory(tmp_path):
    t = tmp_path
    # ~8 GB of float32 weights if it were built (the issue's ch = 4096 built 5.35 GB)
    wide = dict(CFG.to_dict(), ch=4096, ch_mult=[1], attn_resolutions=[], num_groups=32)
    heads = dict(CFG.to_dict(), ch=128, ch_mult=[1], attn_resolutions=[8], num_heads=128)  # 1-channel heads
    files = {
        "ch4096.pt": _ckpt(wide),
        "ch2e20.pt": _ckpt(dict(CFG.to_dict(), ch=2**20)),
        "T1e8.pt": _ckpt(diffusion={"schedule": "linear", "T": 10**8, "beta_start": 1e-4, "beta_end": 0.02,
                                    "variance": "fixedlarge"}),
        "T1e11.pt": _ckpt(diffusion={"schedule": "linear", "T": 10**11, "beta_start": 1e-4, "beta_end": 0.02,
                                     "variance": "fixedlarge"}),
        "size16384.pt": _ckpt(dict(CFG.to_dict(), image_size=16384, attn_resolutions=[])),
        "heads.pt": _ckpt(heads, UNetConfig.from_dict(dict(heads, num_heads=1))),
        "overflow.pt": _ckpt(dtype=torch.float64, fill=1e300),
        "train-T.pt": dict(_ckpt(train=dict(CFG.to_dict(), T=10**9)), train_state={}),
    }
    for name, obj in files.items():
        torch.save(obj, t / name)
    (t / "bare").mkdir()
    torch.save(_ckpt()["model"], t / "bare" / "model.pt")
    (t / "bare" / "config.json").write_text(json.dumps({"model": wide}))
    _legacy_pt_with_a_huge_storage(t / "legacy.pt")
    folders = {
        "T-folder": _pipeline(t / "T-folder", scheduler={"num_train_timesteps": 10**8}),
        "T11-folder": _pipeline(t / "T11-folder", scheduler={"num_train_timesteps": 10**11}),
        "size-folder": _pipeline(t / "size-folder", unet={"sample_size": 1048576}),
        "size16k-folder": _pipeline(t / "size16k-folder", unet={"sample_size": 16384}),
        "wide-folder": _pipeline(t / "wide-folder", unet={"block_out_channels": [4096, 8192]}),
        "levels-folder": _pipeline(t / "levels-folder", unet={"block_out_channels": [16] * 10**6}),
    }
    good = str(t / "good.pt")
    torch.save(_ckpt(), good)
    rng = np.random.default_rng(0)
    np.savez(t / "imgs.npz", arr_0=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    np.savez(t / "empty.npz")
    cov = np.cov(rng.normal(size=(40, 64)), rowvar=False)  # load_stats checks sigma before the 2048-d check
    (t / "afile").write_text("x")
    stats = {
        "not-psd": _stats(t / "not-psd.npz", np.zeros(64), cov - 1e6 * np.eye(64)),
        "asym": _stats(t / "asym.npz", np.zeros(64), cov + np.triu(np.ones((64, 64)), 1)),
        "mu-inf": _stats(t / "mu-inf.npz", np.full(64, np.inf), cov),
        "huge-mu": _npz_declaring(t / "huge-mu.npz", "mu", (2**40,)),
        "huge-feats": _stats(t / "huge-feats.npz", np.zeros(4), np.eye(4)),
    }
    with zipfile.ZipFile(t / "huge-feats.npz", "a") as z:  # features declaring 2^40 rows
        header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 4)))
        header["shape"] = (2**40, 4)
        import io
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, header)
        z.writestr("features.npy", buf.getvalue() + bytes(32))

    S, V, E, T = "fastddpm.sample", "fastddpm.convert", "fastddpm.evaluate", "fastddpm.train"
    out = str(t / "out")
    sample = lambda src, *extra: (S, ["--checkpoint", str(src), "--out", out, "--device", "cpu",  # noqa: E731
                                      "--no-progress", *extra])
    fid = lambda ref: (E, ["fid", "--samples", str(t / "imgs.npz"), "--ref", ref, "--no-progress",  # noqa: E731
                           "--inception-weights", str(t / "none.pth")])
    probes = [  # (what, (module, argv), a part of the one error line)
        ("sample a .pt with ch=4096", sample(t / "ch4096.pt"), "do not fit the model config"),
        ("convert a .pt with ch=4096", (V, [str(t / "ch4096.pt"), str(t / "dst")]), "do not fit the model config"),
        ("nll of a .pt with ch=4096", (E, ["nll", "--checkpoint", str(t / "ch4096.pt"), "--data",
                                          str(t / "imgs.npz"), "--no-progress"]), "do not fit the model config"),
        ("sample a .pt with ch=2^20", sample(t / "ch2e20.pt"), "above fastddpm's bound 4096"),
        ("sample a bare state_dict with ch=4096", sample(t / "bare" / "model.pt"), "do not fit the model config"),
        ("convert a bare state_dict with ch=4096", (V, [str(t / "bare" / "model.pt"), str(t / "dst")]),
         "do not fit the model config"),
        ("sample a .pt with T=1e8", sample(t / "T1e8.pt"), "T=100000000 is above fastddpm's bound 100000"),
        ("sample a .pt with T=1e11", sample(t / "T1e11.pt"), "is above fastddpm's bound 100000"),
        ("sample a .pt with image_size 16384", sample(t / "size16384.pt"), "image_size=16384 is above"),
        ("sample a .pt with 128 heads", sample(t / "heads.pt"), "num_heads=128 is above fastddpm's bound 64"),
        ("train --resume a .pt with T=1e9", (T, ["--resume", str(t / "train-T.pt"), "--no-progress"]),
         "train config: T=1000000000 is above"),
        ("sample a pre-zip .pt declaring 8 GiB", sample(t / "legacy.pt"), "not a zip archive"),
        ("sample num_train_timesteps 1e8", sample(folders["T-folder"]), "num_train_timesteps=100000000"),
        ("sample num_train_timesteps 1e11", sample(folders["T11-folder"]), "num_train_timesteps=100000000000"),
        ("convert num_train_timesteps 1e8", (V, [str(folders["T-folder"]), str(t / "dst.pt")]),
         "fastddpm's bound on the schedule length is 100000"),
        ("sample sample_size 1048576", sample(folders["size-folder"]), "sample_size=1048576 is above"),
        ("sample sample_size 16384", sample(folders["size16k-folder"]), "sample_size=16384 is above"),
        ("convert sample_size 16384", (V, [str(folders["size16k-folder"]), str(t / "dst.pt")]),
         "sample_size=16384 is above"),
        ("sample block_out_channels 8192", sample(folders["wide-folder"]), "max(block_out_channels)=8192"),
        ("sample 10^6 levels", sample(folders["levels-folder"]), "len(block_out_channels)=1000000"),
        ("sample --n 10**12", sample(good, "--n", str(10**12)), "--n must lie in [1, 1,000,000]"),
        ("sample --n 2**32", sample(good, "--n", str(2**32)), "--n must lie in [1, 1,000,000]"),
        ("fid against a sigma that is not PSD", fid(stats["not-psd"]), "not positive semi-definite"),
        ("fid against an asymmetric sigma", fid(stats["asym"]), "sigma is not symmetric"),
        ("fid against an infinite mu", fid(stats["mu-inf"]), "mu or sigma holds NaN or inf"),
        ("fid against a header declaring 2^40 features", fid(stats["huge-mu"]),
         "mu must be (D,) and sigma (D, D)"),
        ("fid against features declaring 2^40 rows", fid(stats["huge-feats"]), "above fastddpm's bound 100000"),
        ("weights finite in float64 that overflow float32", sample(t / "overflow.pt"), "overflows torch.float32"),
        ("an .npz with no arrays", (E, ["fid", "--samples", str(t / "empty.npz"), "--ref", stats["not-psd"]]),
         "holds no arrays"),
        ("convert a good .pt under a regular file", (V, [good, str(t / "afile" / "sub")]),
         "afile is a file, not a folder"),
    ]
    # the folder that converts cleanly, into a path under a regular file
    _pipeline(t / "ok-folder")
    probes.append(("convert a folder under a regular file", (V, [str(t / "ok-folder"), str(t / "afile" / "c.pt")]),
                   "afile is a file, not a folder"))
    before = sorted(os.listdir(t))
    results = _run_probes(t, [p[1] for p in probes])
    for (what, _, match), (code, err, rss) in zip(probes, results):
        _assert_refused(code, err, match, what)
        assert rss < RSS_LIMIT, f"{what}: peak RSS {rss / 2**20:.0f} MiB"
    assert sorted(os.listdir(t)) == sorted(before + ["probes.json", "results.json"])  # no --out, no dst


def test_sample_into_a_folder_that_holds_samples_is_refused_unless_overwrite(tmp_path, capsys):
    from fastddpm.sample import main as sample_main
    torch.save(_ckpt(), tmp_path / "m.pt")
    out = tmp_path / "out"
    argv = ["--checkpoint", str(tmp_path / "m.pt"), "--out", str(out), "--n", "2", "--steps", "2",
            "--device", "cpu", "--no-progress"]
    sample_main(argv + ["--seed", "1"])
    first = {n: (out / n).read_bytes() for n in ("samples.npz", "samples.png")}
    assert sorted(os.listdir(out)) == ["samples.npz", "samples.png"]  # the lock file is gone
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample_main(argv + ["--seed", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "already holds samples.npz, samples.png of an earlier sampling" in err and "--overwrite" in err
    assert {n: (out / n).read_bytes() for n in first} == first
    sample_main(argv + ["--seed", "2", "--overwrite"])
    assert (out / "samples.npz").read_bytes() != first["samples.npz"]
    assert sorted(os.listdir(out)) == ["samples.npz", "samples.png"]


def test_a_failed_write_never_replaces_complete_samples(tmp_path, capsys, monkeypatch):
    import fastddpm.sample as S
    torch.save(_ckpt(), tmp_path / "m.pt")
    out = tmp_path / "out"
    argv = ["--checkpoint", str(tmp_path / "m.pt"), "--out", str(out), "--n", "2", "--steps", "2",
            "--device", "cpu", "--no-progress"]
    S.main(argv)
    first = {n: (out / n).read_bytes() for n in ("samples.npz", "samples.png")}

    def disk_full(images, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(S, "save_grid", disk_full)  # the .npz is written, the grid fails
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        S.main(argv + ["--seed", "5", "--overwrite"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "No space left on device" in err, err
    assert {n: (out / n).read_bytes() for n in first} == first
    assert sorted(os.listdir(out)) == ["samples.npz", "samples.png"]  # no temp file, no lock


def test_a_failed_or_stopped_sampling_leaves_no_out_folder(tmp_path, capsys, monkeypatch):
    import signal

    import fastddpm.sample as S
    torch.save(_ckpt(), tmp_path / "m.pt")
    argv = ["--checkpoint", str(tmp_path / "m.pt"), "--n", "2", "--steps", "2", "--device", "cpu", "--no-progress"]

    def killed(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("the SIGTERM handler did not stop sampling")

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    for fake, code, match in ((killed, 128 + signal.SIGTERM, "stopped by SIGTERM: no samples written"),
                              (oom, 1, "out of memory sampling batches of 2 images of 3x8x8")):
        monkeypatch.setattr(S, "sample", fake)
        out = tmp_path / f"out-{code}"
        with pytest.raises(SystemExit) as e:
            S.main(argv + ["--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == code and err.count("\n") == 1 and match in err, err
        assert not out.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_lock_the_file_system_refuses_is_one_line_and_leaves_no_out_folder(tmp_path, capsys, monkeypatch):
    """A lock file that opens but cannot be locked (ENOLCK: some network file systems)."""
    import errno

    from fastddpm import files
    import fastddpm.sample as S
    torch.save(_ckpt(), tmp_path / "m.pt")
    out = tmp_path / "out"

    def no_locks(path):
        raise files.LockError(errno.ENOLCK, os.strerror(errno.ENOLCK), path)

    monkeypatch.setattr(files, "try_lock", no_locks)
    with pytest.raises(SystemExit) as e:
        S.main(["--checkpoint", str(tmp_path / "m.pt"), "--n", "2", "--steps", "2", "--device", "cpu",
                "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "cannot lock" in err and S.LOCK in err, err
    assert "Traceback" not in err and not out.exists()


def test_two_concurrent_samplings_on_one_folder_one_wins(tmp_path):
    """Two real `python -m fastddpm.sample` on one --out: one writes its samples, the
    other is refused in one line (in use, or already holding the winner's samples)."""
    from fastddpm.sampling import sample
    model = UNet(CFG)
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ckpt = _ckpt()
    ckpt["model"] = model.state_dict()
    ckpt["config"]["diffusion"] = GaussianDiffusion.linear(T=20).config
    torch.save(ckpt, tmp_path / "m.pt")
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "fastddpm.sample", "--checkpoint", str(tmp_path / "m.pt"),
                               "--out", str(out), "--n", "3", "--seed", str(seed), "--device", "cpu",
                               "--no-progress"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for seed in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    winner = 1 + [code for code, _ in results].index(0)
    loser_err = next(err for code, err in results if code == 2)
    assert "Traceback" not in loser_err and loser_err.count("\n") == 1, loser_err
    assert "in use by another sampling" in loser_err or "already holds samples.npz" in loser_err, loser_err
    assert sorted(os.listdir(out)) == ["samples.npz", "samples.png"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: more threads on a loaded CI machine only contend
    try:
        want = sample(model, GaussianDiffusion.linear(T=20), 3, seed=winner, progress=False)
    finally:
        torch.set_num_threads(threads)
    got = np.load(out / "samples.npz")["arr_0"]
    assert np.array_equal(got, ((want + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy())


def test_sampling_into_a_closed_pipe_still_writes_the_samples(tmp_path):
    """`python -m fastddpm.sample ... | head` whose reader has gone: the progress lines
    are dropped, the samples written, exit 0, no traceback."""
    model = UNet(CFG)
    ckpt = _ckpt()
    ckpt["model"] = model.state_dict()
    ckpt["config"]["diffusion"] = GaussianDiffusion.linear(T=4).config
    torch.save(ckpt, tmp_path / "m.pt")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line: every write is EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "fastddpm.sample", "--checkpoint", str(tmp_path / "m.pt"),
                               "--out", str(tmp_path / "out"), "--n", "2", "--device", "cpu", "--no-progress"],
                              env=_env(), stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert np.load(tmp_path / "out" / "samples.npz")["arr_0"].shape == (2, CFG.image_size, CFG.image_size, 3)


def test_bounds_are_generous_for_real_models():
    """The paper's networks (CIFAR-10 at 32, LSUN/CelebA-HQ at 256) and schedule sit inside every bound."""
    UNetConfig.cifar10().validate()
    UNetConfig(image_size=256, ch=128, ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16,)).validate()
    limits.check_diffusion_config("x", {"T": 4000})
    with pytest.raises(ValueError, match="in_channels=4 is not supported"):
        UNetConfig.tiny(in_channels=4)
    assert resource.RLIMIT_AS  # the probes' cap exists on this platform


def test_an_n_whose_samples_cannot_fit_in_memory_is_refused_first(tmp_path, capsys, monkeypatch):
    import fastddpm.sample as S
    torch.save(_ckpt(), tmp_path / "m.pt")
    monkeypatch.setattr(S, "sample", lambda *a, **k: pytest.fail("sampling started"))
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": (64 << 20) // 4096}  # a 64 MiB machine
    monkeypatch.setattr(S.os, "sysconf", lambda name: pages[name])
    with pytest.raises(SystemExit) as e:  # 100,000 x 3x8x8 x 9 bytes = 165 MiB
        S.main(["--checkpoint", str(tmp_path / "m.pt"), "--out", str(tmp_path / "o"), "--n", "100000"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "--n 100000 images of 3x8x8 need ~0.2 GiB to hold, more than this machine's 0.1 GiB" in err
    assert not (tmp_path / "o").exists()


def test_evaluate_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    from fastddpm import evaluate as ev

    def oom(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(ev, "_run", oom)
    assert ev.main(["nll", "--checkpoint", "c.pt", "--data", "d.npz"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of memory (RuntimeError): lower --batch-size" in err, err


def test_real_covariances_pass_the_checks_in_float64_and_float32(tmp_path):
    """A singular sample covariance (n < D) and the same rounded to float32 are PSD
    within the rounding of their dtype; one eigenvalue of -1e-4 of the largest is not."""
    from fastddpm import metrics
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(150, 256)) @ rng.normal(size=(256, 256)) / 16  # 256-d keeps it quick
    mu, cov = feats.mean(0), np.cov(feats, rowvar=False)
    for dtype in (np.float64, np.float32):
        s = metrics.load_stats(_stats(tmp_path / f"{np.dtype(dtype).name}.npz", mu.astype(dtype), cov.astype(dtype)))
        assert np.array_equal(s.sigma, cov.astype(dtype).astype(np.float64))
    w, v = np.linalg.eigh(cov)
    w[0] = -1e-4 * w[-1]
    with pytest.raises(metrics.EvaluateError, match="not positive semi-definite"):
        metrics.load_stats(_stats(tmp_path / "neg.npz", mu, (v * w) @ v.T))
    np.savez(tmp_path / "f16.npz", mu=mu.astype(np.float16), sigma=cov.astype(np.float16))
    with pytest.raises(metrics.EvaluateError, match="float32 or float64"):
        metrics.load_stats(tmp_path / "f16.npz")
