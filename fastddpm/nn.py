"""nn.Module drop-ins built on fastddpm.ops, and the DDPM UNet's blocks.

GroupNorm / GroupNormSiLU take nn.GroupNorm's arguments and keep its
state_dict keys (weight, bias), so weights load across; `swap_group_norm`
puts them into an existing model. AttentionBlock is the paper's block.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastddpm import ops


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm computed by ops.group_norm (fp32 statistics, fused kernels)."""

    act = None

    def forward(self, x, add=None, dropout=0.0):
        """add: optional (N, C) term added to x before normalising; dropout: the
        probability applied after the activation (the caller passes 0 in eval)."""
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.act,
                              add=add, dropout=dropout)


class GroupNormSiLU(GroupNorm):
    """SiLU(GroupNorm(x)) in one op; same arguments and state_dict as nn.GroupNorm."""

    act = "silu"


def swap_group_norm(model: nn.Module) -> int:
    """Replace every nn.GroupNorm in `model` (in place) by fastddpm's. Where a
    GroupNorm is directly followed by an nn.SiLU inside an nn.Sequential, the
    pair becomes GroupNormSiLU + nn.Identity. Parameters (and so state_dict keys
    and values) are kept. Returns the number of GroupNorms replaced."""
    count = 0
    for parent in list(model.modules()):
        names = list(parent._modules.keys())
        for i, name in enumerate(names):
            child = parent._modules[name]
            if type(child) is not nn.GroupNorm:  # ours subclass it: skip them
                continue
            nxt = parent._modules[names[i + 1]] if i + 1 < len(names) else None
            fuse = isinstance(parent, nn.Sequential) and isinstance(nxt, nn.SiLU)
            new = (GroupNormSiLU if fuse else GroupNorm)(child.num_groups, child.num_channels,
                                                         child.eps, child.affine)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            new.train(child.training)
            parent._modules[name] = new
            if fuse:
                parent._modules[names[i + 1]] = nn.Identity()
            count += 1
    return count


def timestep_embedding(t, dim):
    """Sinusoidal embedding of int timesteps t (B,) -> (B, dim) float32, as in
    the paper's code: [sin(t w_i), cos(t w_i)], w_i = 10000^(-i / (dim/2 - 1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32)
                      * (-math.log(10000.0) / (half - 1)))
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def variance_scaling_(w, scale=1.0):
    """The paper's default_init: uniform variance scaling, fan_avg mode.
    scale == 0 gives zeros (the paper's 1e-10 'zero' init of the last convs)."""
    if scale == 0:
        return nn.init.zeros_(w)
    receptive = w[0][0].numel() if w.dim() > 2 else 1
    fan_in, fan_out = w.shape[1] * receptive, w.shape[0] * receptive
    bound = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2.0))
    return nn.init.uniform_(w, -bound, bound)


def _conv(cin, cout, k, stride=1, scale=1.0):
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)
    variance_scaling_(conv.weight, scale)
    nn.init.zeros_(conv.bias)
    return conv


def _linear(cin, cout, scale=1.0):
    lin = nn.Linear(cin, cout)
    variance_scaling_(lin.weight, scale)
    nn.init.zeros_(lin.bias)
    return lin


class TimestepEmbedding(nn.Module):
    """t (B,) -> sinusoid(ch) -> dense(4ch) -> swish -> dense(4ch)."""

    def __init__(self, ch, emb_ch):
        super().__init__()
        self.ch = ch
        self.dense0 = _linear(ch, emb_ch)
        self.dense1 = _linear(emb_ch, emb_ch)

    def forward(self, t):
        emb = timestep_embedding(t, self.ch).to(self.dense0.weight.dtype)
        return self.dense1(F.silu(self.dense0(emb)))


class ResBlock(nn.Module):
    """x + conv(dropout(act(norm(conv(act(norm(x))) + dense(act(temb)))))),
    with a 1x1 shortcut when channels change. Takes act(temb) precomputed."""

    def __init__(self, in_ch, out_ch, emb_ch, dropout, num_groups, eps):
        super().__init__()
        self.norm1 = GroupNormSiLU(num_groups, in_ch, eps)
        self.conv1 = _conv(in_ch, out_ch, 3)
        self.temb_proj = _linear(emb_ch, out_ch)
        self.norm2 = GroupNormSiLU(num_groups, out_ch, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv(out_ch, out_ch, 3, scale=0.0)
        self.skip = _conv(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(self.norm1(x))
        # the timestep term, norm2, SiLU and dropout are one fused op
        p = self.dropout.p if self.training else 0.0
        h = self.conv2(self.norm2(h, add=self.temb_proj(emb), dropout=p))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """The paper's self-attention block: x + proj(attn(q, k, v)) with q, k, v
    1x1 projections of GroupNorm(x) and softmax(q k^T / sqrt(d)) over the H*W
    positions; `num_heads` splits the channels (the paper uses one head)."""

    # Ablation of issue 5: True computes norm + q/k/v projection and proj +
    # residual with ops.conv1x1 (the GroupNorm applied on load, the residual added
    # before the store: two fewer passes over (B, C, H, W)). Same parameters and
    # state_dict; off until measured on a GPU. Set it on the class or on one block.
    fused_proj = False

    def __init__(self, channels, num_groups=32, eps=1e-6, num_heads=1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"AttentionBlock: channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = GroupNorm(num_groups, channels, eps)
        self.qkv = _conv(channels, 3 * channels, 1)
        self.proj = _conv(channels, channels, 1, scale=0.0)

    def forward(self, x):
        B, C, H, W = x.shape
        if self.fused_proj:
            n = self.norm
            qkv = ops.conv1x1(x, self.qkv.weight, self.qkv.bias, norm=(n.num_groups, n.weight, n.bias, n.eps))
        else:
            qkv = self.qkv(self.norm(x))
        # the packed op views q, k, v (B, heads, L, d) out of the (B, 3C, L) conv
        # output (no copies) and its backward writes one (B, 3C, L) gradient
        h = ops.attention_packed(qkv.reshape(B, 3 * C, H * W), self.num_heads).reshape(B, C, H, W)
        if self.fused_proj:
            return ops.conv1x1(h, self.proj.weight, self.proj.bias, residual=x)
        return x + self.proj(h)


def same_padding(n, k, s):
    """TF padding='SAME' along one axis of size n for kernel k, stride s: (before, after).
    The paper's code pads this way; for even n, k = 3, s = 2 that is (0, 1)."""
    total = max((-(-n // s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


class Downsample(nn.Module):
    """The stride-2 3x3 conv with TF 'SAME' padding, as the paper's code: for
    even sizes the pad is bottom/right only, (0, 1, 0, 1), not nn.Conv2d's
    symmetric padding=1 (which is a different network)."""

    def __init__(self, ch):
        super().__init__()
        self.conv = _conv(ch, ch, 3, stride=2)
        self.conv.padding = (0, 0)

    def forward(self, x):
        k, s = self.conv.kernel_size[0], self.conv.stride[0]
        top, bottom = same_padding(x.shape[-2], k, s)
        left, right = same_padding(x.shape[-1], k, s)
        return self.conv(F.pad(x, (left, right, top, bottom)))


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = _conv(ch, ch, 3)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
