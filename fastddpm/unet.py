"""The DDPM UNet (Ho et al. 2020, the CIFAR-10 network), built from fastddpm.nn
only, so fast backends plug in below it without changes here."""
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastddpm.limits import check_unet_fields
from fastddpm.nn import AttentionBlock, Downsample, GroupNormSiLU, ResBlock, TimestepEmbedding, Upsample, _conv


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (16,)
    dropout: float = 0.1
    num_groups: int = 32
    eps: float = 1e-6
    num_heads: int = 1

    @classmethod
    def cifar10(cls, **overrides):
        """The paper's CIFAR-10 network: 35,746,307 parameters."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides):
        """The tiny preset's network: a CPU demo at 16x16 (687,347 parameters)."""
        base = dict(image_size=16, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(4,),
                    dropout=0.0, num_groups=8)
        base.update(overrides)
        return cls(**base)

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        self.validate()

    @property
    def resolutions(self):
        return [self.image_size // 2 ** i for i in range(len(self.ch_mult))]

    def validate(self):
        # the bounds first: a crafted config must not make even these checks loop or allocate
        check_unet_fields("UNetConfig", self.image_size, self.in_channels, self.ch, self.ch_mult,
                          self.num_res_blocks, self.attn_resolutions, self.num_heads)
        for name in ("image_size", "in_channels", "ch", "num_res_blocks", "num_groups", "num_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "num_res_blocks" else 1):
                raise ValueError(f"UNetConfig.{name} must be a positive int, got {v!r}")
        if not self.ch_mult or any(not isinstance(m, int) or m < 1 for m in self.ch_mult):
            raise ValueError(f"UNetConfig.ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult!r}")
        down = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % down:
            raise ValueError(f"UNetConfig.image_size {self.image_size} must be divisible by {down} "
                             f"({len(self.ch_mult) - 1} downsamplings for ch_mult={self.ch_mult})")
        for m in set(self.ch_mult):
            c = self.ch * m
            if c % self.num_groups:
                raise ValueError(f"UNetConfig: {c} channels (ch {self.ch} x mult {m}) are not divisible "
                                 f"by num_groups {self.num_groups}")
            if c % self.num_heads:
                raise ValueError(f"UNetConfig: {c} channels not divisible by num_heads {self.num_heads}")
        bad = [r for r in self.attn_resolutions if r not in self.resolutions]
        if bad:
            raise ValueError(f"UNetConfig.attn_resolutions {bad} never occur; resolutions are {self.resolutions}")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.eps > 0:
            raise ValueError(f"UNetConfig.eps must be > 0, got {self.eps}")

    def to_dict(self):
        d = asdict(self)
        d["ch_mult"], d["attn_resolutions"] = list(self.ch_mult), list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UNetConfig keys {sorted(unknown)}")
        return cls(**d)


class UNet(nn.Module):
    """unet(x, t) -> eps_hat: x (B, C, S, S) in [-1, 1], t int64 (B,). Runs in the
    memory format of its conv weights (unet.to(memory_format=torch.channels_last)
    for NHWC activations end to end); x may be in any layout and eps_hat is always
    a contiguous NCHW tensor."""

    def __init__(self, config: UNetConfig = None):
        super().__init__()
        self.config = cfg = config if config is not None else UNetConfig.cifar10()
        ch, G, eps, emb_ch = cfg.ch, cfg.num_groups, cfg.eps, 4 * cfg.ch
        attn = lambda c: AttentionBlock(c, G, eps, cfg.num_heads)  # noqa: E731
        res = lambda i, o: ResBlock(i, o, emb_ch, cfg.dropout, G, eps)  # noqa: E731
        self.temb = TimestepEmbedding(ch, emb_ch)
        self.conv_in = _conv(cfg.in_channels, ch, 3)

        self.down = nn.ModuleList()
        skips, cur, res_now = [ch], ch, cfg.image_size
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                blocks = [res(cur, ch * mult)]
                cur = ch * mult
                if res_now in cfg.attn_resolutions:
                    blocks.append(attn(cur))
                self.down.append(nn.ModuleList(blocks))
                skips.append(cur)
            if level != len(cfg.ch_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(cur)]))
                skips.append(cur)
                res_now //= 2

        self.mid = nn.ModuleList([res(cur, cur), attn(cur), res(cur, cur)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks = [res(cur + skips.pop(), ch * mult)]
                cur = ch * mult
                if res_now in cfg.attn_resolutions:
                    blocks.append(attn(cur))
                self.up.append(nn.ModuleList(blocks))
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(cur)]))
                res_now *= 2

        self.norm_out = GroupNormSiLU(G, cur, eps)
        self.conv_out = _conv(cur, cfg.in_channels, 3, scale=0.0)

    @property
    def memory_format(self):
        """torch.channels_last when the conv weights are (the model was moved with
        .to(memory_format=torch.channels_last)), else torch.contiguous_format."""
        w = self.conv_in.weight
        nhwc = not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)
        return torch.channels_last if nhwc else torch.contiguous_format

    @staticmethod
    def _run(blocks, h, emb):
        for b in blocks:
            h = b(h, emb) if isinstance(b, ResBlock) else b(h)
        return h

    def forward(self, x, t):
        cfg = self.config
        if x.dim() != 4 or x.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"UNet expects x of shape (B, {cfg.in_channels}, {cfg.image_size}, "
                             f"{cfg.image_size}), got {tuple(x.shape)}")
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != (x.shape[0],):
            raise ValueError(f"UNet expects t as an int64 tensor of shape ({x.shape[0]},), got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        w = self.conv_in.weight  # else conv's RuntimeError ("Input type (double) and bias type ...")
        if x.device != w.device or t.device != w.device:
            raise ValueError(f"UNet is on {w.device}, got x on {x.device} and t on {t.device}")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"UNet weights are {w.dtype}, got x of dtype {x.dtype} (cast x, or the model "
                            "with .to(dtype), or run under torch.autocast)")
        # The net runs in its conv weights' layout (model.to(memory_format=torch.channels_last)
        # makes every activation NHWC end to end); callers always get a contiguous NCHW eps_hat.
        x = x.contiguous(memory_format=self.memory_format)
        emb = F.silu(self.temb(t))  # every ResBlock applies swish before its dense
        hs = [self.conv_in(x)]
        for blocks in self.down:
            hs.append(self._run(blocks, hs[-1], emb))
        h = self._run(self.mid, hs[-1], emb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(blocks, h, emb)
        return self.conv_out(self.norm_out(h)).contiguous()
