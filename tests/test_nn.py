"""nn drop-ins: state_dict compatibility, swapping into a foreign model, the attention block."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastddpm.nn import AttentionBlock, GroupNorm, GroupNormSiLU, swap_group_norm, timestep_embedding
from _util import assert_close_rel


def test_group_norm_silu_keeps_nn_group_norm_keys_and_values():
    ref = nn.GroupNorm(4, 12, eps=1e-5)
    nn.init.normal_(ref.weight)
    nn.init.normal_(ref.bias)
    ours = GroupNormSiLU(4, 12, eps=1e-5)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 12, 5, 5, dtype=torch.float64)
    assert_close_rel(ours.double()(x), F.silu(ref.double()(x)), torch.float64)
    plain = GroupNorm(4, 12, affine=False).double()
    assert_close_rel(plain(x), F.group_norm(x, 4, eps=1e-5), torch.float64)


class ForeignBlock(nn.Module):
    """A diffusers-style block: norms in a Sequential and one called by hand."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1),
                                  nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 1))
        self.norm_out = nn.GroupNorm(8, 8, eps=1e-6)

    def forward(self, x):
        return F.silu(self.norm_out(self.body(x)))


def test_swap_group_norm_in_a_foreign_model():
    torch.manual_seed(0)
    model = ForeignBlock().double()
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    expect = model(x)
    assert swap_group_norm(model) == 3
    assert isinstance(model.body[0], GroupNormSiLU) and isinstance(model.body[1], nn.Identity)
    assert type(model.body[3]) is GroupNorm and type(model.norm_out) is GroupNorm
    assert model.norm_out.eps == 1e-6
    sd = model.state_dict()
    assert list(sd) == list(before_sd) and all(torch.equal(sd[k], before_sd[k]) for k in sd)
    assert_close_rel(model(x), expect, torch.float64)
    assert swap_group_norm(model) == 0  # idempotent
    model.load_state_dict(before_sd)  # loads across


def test_attention_block_matches_plain_pytorch():
    torch.manual_seed(0)
    blk = AttentionBlock(16, num_groups=4).double()
    nn.init.normal_(blk.proj.weight, std=0.1)
    x = torch.randn(2, 16, 5, 3, dtype=torch.float64)
    # independent: loops over the batch, explicit softmax
    h = F.group_norm(x, 4, blk.norm.weight, blk.norm.bias, 1e-6)
    qkv = F.conv2d(h, blk.qkv.weight, blk.qkv.bias).flatten(2)
    out = []
    for b in range(2):
        q, k, v = qkv[b, :16].T, qkv[b, 16:32].T, qkv[b, 32:].T
        w = torch.exp(q @ k.T / math.sqrt(16))
        out.append(((w / w.sum(1, keepdim=True)) @ v).T.reshape(16, 5, 3))
    expect = x + F.conv2d(torch.stack(out), blk.proj.weight, blk.proj.bias)
    assert_close_rel(blk(x), expect, torch.float64)


def test_attention_block_heads_split_channels():
    torch.manual_seed(0)
    blk = AttentionBlock(8, num_groups=2, num_heads=2).double()
    nn.init.normal_(blk.proj.weight)
    x = torch.randn(1, 8, 4, 4, dtype=torch.float64)
    h = F.group_norm(x, 2, blk.norm.weight, blk.norm.bias, 1e-6)
    q, k, v = F.conv2d(h, blk.qkv.weight, blk.qkv.bias).flatten(2).chunk(3, dim=1)
    heads = []
    for s in (slice(0, 4), slice(4, 8)):
        w = torch.softmax(q[0, s].T @ k[0, s] / 2.0, dim=-1)
        heads.append((w @ v[0, s].T).T)
    expect = x + F.conv2d(torch.cat(heads).reshape(1, 8, 4, 4), blk.proj.weight, blk.proj.bias)
    assert_close_rel(blk(x), expect, torch.float64)


def test_timestep_embedding_is_the_papers_sinusoid():
    t = torch.tensor([0, 1, 999])
    e = timestep_embedding(t, 8)
    w = [10000 ** (-i / 3) for i in range(4)]
    for r, ti in enumerate(t.tolist()):
        expect = [math.sin(ti * wi) for wi in w] + [math.cos(ti * wi) for wi in w]
        assert torch.allclose(e[r], torch.tensor(expect), atol=1e-5)
