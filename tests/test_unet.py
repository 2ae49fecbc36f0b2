"""The UNet: parameter counts, shapes, config validation, reference behaviour."""
import pytest
import torch

from fastddpm import UNet, UNetConfig


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_cifar10_has_the_papers_parameter_count():
    cfg = UNetConfig.cifar10()
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_resolutions, cfg.dropout, cfg.num_groups,
            cfg.eps) == (128, (1, 2, 2, 2), 2, (16,), 0.1, 32, 1e-6)
    with torch.device("meta"):
        model = UNet(cfg)
    assert n_params(model) == 35_746_307


def test_tiny_is_small_and_is_the_tiny_presets_network():
    from fastddpm.training.config import preset_config

    assert n_params(UNet(UNetConfig.tiny())) < 1_000_000
    assert preset_config("tiny").model_config(3) == UNetConfig.tiny()


@pytest.mark.parametrize("cfg", [
    UNetConfig.tiny(),
    UNetConfig.tiny(image_size=8, ch_mult=(1,), attn_resolutions=(8,)),
    UNetConfig.tiny(in_channels=1, image_size=12, ch_mult=(1, 2), attn_resolutions=(6,), num_heads=2),
    UNetConfig(image_size=16, ch=16, ch_mult=(1, 2, 3), num_res_blocks=2, attn_resolutions=(8, 4),
               num_groups=4, dropout=0.1),
])
def test_output_shape_and_grad(cfg):
    model = UNet(cfg)
    B = 2
    x = torch.randn(B, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.randint(0, 1000, (B,))
    out = model(x, t)
    assert out.shape == x.shape and out.dtype == x.dtype
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_last_convs_start_at_zero_and_timestep_matters():
    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny())
    assert model.conv_out.weight.abs().max() == 0
    assert model.mid[0].conv2.weight.abs().max() == 0
    # make the output depend on the input, then check t changes it
    for p in model.parameters():
        if p.abs().max() == 0 and p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    model.eval()
    x = torch.randn(1, 3, 16, 16)
    a, b = model(x, torch.tensor([1])), model(x, torch.tensor([900]))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("overrides, msg", [
    (dict(ch=30), "not divisible by num_groups"),
    (dict(attn_resolutions=(2,)), "never occur"),
    (dict(image_size=18, ch_mult=(1, 2, 2)), "divisible by 4"),
    (dict(dropout=1.0), "dropout"),
    (dict(ch_mult=()), "ch_mult"),
    (dict(num_res_blocks=-1), "num_res_blocks"),
])
def test_bad_config_is_refused(overrides, msg):
    with pytest.raises(ValueError, match=msg):
        UNetConfig.tiny(**overrides)


def test_bad_input_is_refused():
    model = UNet(UNetConfig.tiny())
    with pytest.raises(ValueError, match=r"shape \(B, 3, 16, 16\)"):
        model(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="int64"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1]))


def test_wrong_dtype_input_is_a_type_error_naming_both():
    """As a user calling d.training_loss(model, x0) with float64 images on a float32 net."""
    from fastddpm import GaussianDiffusion
    model = UNet(UNetConfig.tiny())
    d = GaussianDiffusion.linear(T=10)
    with pytest.raises(TypeError, match="float32.*float64"):
        d.training_loss(model, torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for the convs itself
        assert model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2])).shape == (2, 3, 16, 16)


def test_config_round_trip():
    cfg = UNetConfig.tiny(attn_resolutions=(16, 8))
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown UNetConfig keys"):
        UNetConfig.from_dict({**cfg.to_dict(), "bogus": 1})


@pytest.mark.parametrize("n, k, s, expected", [(32, 3, 2, (0, 1)), (16, 3, 2, (0, 1)), (7, 3, 2, (1, 1)),
                                               (8, 3, 1, (1, 1)), (5, 1, 2, (0, 0)), (6, 4, 2, (1, 1))])
def test_same_padding_is_tfs_rule(n, k, s, expected):
    from fastddpm.nn import same_padding
    assert same_padding(n, k, s) == expected
    before, after = expected
    assert (n + before + after - k) // s + 1 == -(-n // s)  # TF 'SAME': ceil(n / s) outputs


def test_downsample_pads_like_tf_same_not_symmetrically():
    """The paper's code: tf.nn.conv2d(stride 2, padding='SAME') pads only bottom
    and right on even sizes. Checked against an explicit float64 pad + conv."""
    import torch.nn.functional as F
    from fastddpm.nn import Downsample
    torch.manual_seed(0)
    down = Downsample(4).double()
    torch.nn.init.normal_(down.conv.bias)
    for size in (8, 7):
        x = torch.randn(2, 4, size, size, dtype=torch.float64)
        pad = (0, 1, 0, 1) if size % 2 == 0 else (1, 1, 1, 1)
        ref = F.conv2d(F.pad(x, pad), down.conv.weight, down.conv.bias, stride=2)
        out = down(x)
        assert out.shape == ref.shape == (2, 4, (size + 1) // 2, (size + 1) // 2)
        assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    sym = F.conv2d(x := torch.randn(1, 4, 8, 8, dtype=torch.float64), down.conv.weight, down.conv.bias,
                   stride=2, padding=1)
    assert not torch.allclose(down(x), sym)  # the old, symmetric padding is a different network
