"""The C++ CPU backend ("cpp", fastddpm._C + fastddpm/ops/_cpp.py) against the
float64 reference: GroupNorm(+add)(+SiLU)(+dropout) forward and backward, the
diffusion ops, opcheck of every op and dtype, layouts, the large-mean case,
the whole tiny UNet, torch.compile, bad input and the extension's loader."""
import pytest
import torch

import fastddpm.ops as ops
from fastddpm import _ext, reference
from fastddpm.ops import _backend, _cpp
from _util import REL_TOL, assert_close_rel, expect_ran, fresh_seed, rel_err, spread_groups

pytestmark = pytest.mark.skipif(not _ext.has_extension(), reason=f"fastddpm._C not loaded: {_ext.extension_error()}")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPP = torch.ops.fastddpm_cpp
# the C++ GroupNorm forward and backward: a test of the cpp backend asserts they ran
GN_OPS = ("fastddpm_cpp::group_norm", "fastddpm_cpp::group_norm_backward")

# (shape, groups, layout): odd channels, groups == channels, C not a multiple of the
# vector width, 1x1 / 7x7 / odd spatial, batch 1, (N, C, L), (N, C), channels_last,
# non-contiguous (a transposed view)
CASES = [
    ((2, 8, 4, 4), 4, "nchw"),
    ((1, 6, 7, 7), 3, "nchw"),
    ((2, 5, 3, 3), 5, "nchw"),
    ((2, 20, 1, 1), 4, "nchw"),
    ((2, 6, 5, 3), 3, "cl"),
    ((3, 20, 7, 5), 5, "cl"),
    ((2, 6, 9), 2, "nchw"),
    ((3, 12), 4, "nchw"),
    ((2, 6, 5, 4), 2, "transposed"),
    # C a multiple of 16 (every UNet width): the NHWC kernels' 16-channel chunks
    ((2, 16, 4, 4), 8, "cl"),
    ((3, 48, 5, 3), 8, "cl"),
    ((2, 64, 3, 7), 16, "cl"),
    ((2, 32, 6, 7), 4, "nchw"),
]
IDS = [f"{'x'.join(map(str, s))}-g{g}-{lay}" for s, g, lay in CASES]


@pytest.fixture
def poisoned():
    """Every tensor torch.empty hands out (our outputs included) is NaN-filled first."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was)


def _layout(x, layout):
    if layout == "cl":
        return x.to(memory_format=torch.channels_last)
    if layout == "transposed":  # same values, strides of a (N, C, W, H) tensor transposed
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return x


def _gn_case(shape, g, dtype, layout, affine=True, add=False, shift=0.0):
    C = shape[1]
    x = _layout(spread_groups(shape, g, 1.5, shift).to(dtype), layout)
    w = (torch.randn(C) * 0.5 + 1).to(dtype) if affine else None
    b = (torch.randn(C) * 0.5).to(dtype) if affine else None
    a = torch.randn(shape[:2]).to(dtype) if add else None
    return x, w, b, a


def _grads(fn, tensors, dy):
    leaves = [t.detach().clone().requires_grad_() for t in tensors if t is not None]
    it = iter(leaves)
    args = [None if t is None else next(it) for t in tensors]
    y = fn(*args)
    return y, torch.autograd.grad(y, leaves, dy)


def _check_gn(x, w, b, a, g, act, p=0.0):
    dy = torch.randn(x.shape).to(x.dtype)
    torch.manual_seed(1234)
    with ops.use_backend("cpp"), expect_ran(*GN_OPS):
        y, grads = _grads(lambda x_, w_, b_, a_: ops.group_norm(x_, g, w_, b_, 1e-6, act, add=a_, dropout=p),
                          (x, w, b, a), dy)
    mask = None
    if p > 0:  # the mask the kernel used: same seed, same draw
        torch.manual_seed(1234)
        mask = _cpp.dropout_keep_mask(_cpp.new_seed(), x.shape, p).double() / (1 - p)
    def ref(x_, w_, b_, a_):
        w_ = torch.ones(x.shape[1], dtype=torch.float64) if w_ is None and b_ is not None else w_
        y_ = reference.group_norm_ref(x_, g, w_, b_, 1e-6, act, a_)
        return y_ if mask is None else y_ * mask
    y_ref, grads_ref = _grads(ref, [None if t is None else t.double() for t in (x, w, b, a)], dy.double())
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close_rel(y, y_ref, x.dtype, "y")
    names = [n for n, t in zip(("dx", "dweight", "dbias", "dadd"), (x, w, b, a)) if t is not None]
    for name, gr, gr_ref in zip(names, grads, grads_ref):
        assert gr.dtype == x.dtype and torch.isfinite(gr).all(), name
        assert_close_rel(gr, gr_ref, x.dtype, name)
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,g,layout", CASES, ids=IDS)
def test_group_norm_silu_matches_float64(poisoned, shape, g, layout, dtype):
    y = _check_gn(*_gn_case(shape, g, dtype, layout), g, "silu")
    if layout == "cl":
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape,g,layout", CASES[:6], ids=IDS[:6])
@pytest.mark.parametrize("act,affine", [(None, True), ("silu", False), (None, False)])
def test_group_norm_variants_match_float64(poisoned, shape, g, layout, act, affine):
    _check_gn(*_gn_case(shape, g, torch.float32, layout, affine=affine), g, act)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape,g", [((3, 12, 6, 5), 4), ((2, 32, 5, 3), 8)], ids=["c12", "c32"])
def test_group_norm_add_and_dropout_match_float64(poisoned, dtype, layout, shape, g):
    _check_gn(*_gn_case(shape, g, dtype, layout, add=True), g, "silu", p=0.3)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape,g", [((4, 32, 8, 8), 4), ((3, 48, 5, 7), 6)])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_bf16_io_is_the_float32_path_rounded(poisoned, layout, shape, g, p):
    """bfloat16 x and dy are read and written as bfloat16 (each task converts its slice):
    bit for bit the float32 kernels on the same values, rounded to nearest even."""
    x, dy = (_layout(torch.randn(shape).to(torch.bfloat16), layout) for _ in range(2))
    w, b, a = torch.randn(shape[1]), torch.randn(shape[1]), torch.randn(shape[:2])
    seed = torch.tensor([fresh_seed()]) if p else None
    op = torch.ops.fastddpm_cpp
    y, mean, rstd = op.group_norm(x, g, w, b, 1e-6, True, a, p, seed)
    y32, mean32, rstd32 = op.group_norm(x.float(), g, w, b, 1e-6, True, a, p, seed)
    assert y.dtype == torch.bfloat16 and y.stride() == x.stride()
    assert torch.equal(y, y32.to(torch.bfloat16)) and torch.equal(mean, mean32) and torch.equal(rstd, rstd32)
    got = op.group_norm_backward(dy, x, w, b, a, mean, rstd, g, True, p, seed, True, True, True)
    want = op.group_norm_backward(dy.float(), x.float(), w, b, a, mean, rstd, g, True, p, seed, True, True, True)
    assert got[0].dtype == torch.bfloat16 and got[0].stride() == x.stride()
    assert torch.equal(got[0], want[0].to(torch.bfloat16))
    assert all(torch.equal(u, v) for u, v in zip(got[1:], want[1:]))


def test_dropout_mask_distribution_layout_and_seed():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 32, 32)
    with ops.use_backend("cpp"), expect_ran("fastddpm_cpp::group_norm"):
        torch.manual_seed(7)
        y1 = ops.group_norm(x, 4, act="silu", dropout=0.25)
        torch.manual_seed(7)
        y2 = ops.group_norm(x.to(memory_format=torch.channels_last), 4, act="silu", dropout=0.25)
        y3 = ops.group_norm(x, 4, act="silu", dropout=0.25)
        y0 = ops.group_norm(x, 4, act="silu")
    # the mask follows the logical index, not the layout (the statistics round differently)
    assert torch.equal(y1 == 0, y2 == 0)
    torch.testing.assert_close(y1, y2.contiguous())
    assert not torch.equal(y1, y3)           # a fresh seed per call
    keep = y1 != 0
    assert abs(keep.double().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(y1[keep], y0[keep] / 0.75)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_group_norm_silu_saturates_like_float64(poisoned, layout):
    # |z| up to ~1000: the SIMD sigmoid clamps its exp argument; SiLU -> z and -> 0
    x, w, b, _ = _gn_case((2, 32, 5, 4), 8, torch.float32, layout)
    _check_gn(x, w * 300.0, b * 50.0, None, 8, "silu")


def test_nan_input_gives_nan_not_a_number():
    x = torch.randn(2, 16, 4, 4)
    x[0, 3, 1, 2] = float("nan")
    for layout_x in (x, x.to(memory_format=torch.channels_last)):
        with ops.use_backend("cpp"), expect_ran("fastddpm_cpp::group_norm"):
            y = ops.group_norm(layout_x, 8, act="silu")
        # channel 3 is in group 1 (channels 2, 3): that group is NaN, nothing else
        nan = torch.zeros_like(y, dtype=torch.bool)
        nan[0, 2:4] = True
        assert torch.equal(torch.isnan(y), nan)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_group_norm_is_the_same_on_one_and_two_threads(layout):
    """The kernels run in parallel (built with OpenMP) and stay deterministic:
    bit-identical forward and gradients whatever the thread count."""
    x, w, b, a = _gn_case((6, 32, 9, 8), 8, torch.float32, layout, add=True)
    dy = torch.randn_like(x)
    out = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            xs, ws, bs, as_ = (t.detach().clone(memory_format=torch.preserve_format).requires_grad_()
                               for t in (x, w, b, a))
            with ops.use_backend("cpp"), expect_ran(*GN_OPS):
                y = ops.group_norm(xs, 8, ws, bs, 1e-6, "silu", add=as_)
                y.backward(dy)
            out.append([y] + [t.grad for t in (xs, ws, bs, as_)])
    finally:
        torch.set_num_threads(before)
    for u, v in zip(*out):
        assert torch.equal(u, v)


@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_every_instruction_set_copy_matches_float64(isa):
    """The AVX2 and baseline kernel copies (the machine runs the best one): the
    GroupNorm float32 tests again in a process capped by FASTDDPM_CPU_ISA."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, FASTDDPM_CPU_ISA=isa)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
           "(silu_matches_float64 and float32) or (add_and_dropout and float32) or variants or saturates "
           "or large_mean or bf16_io"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


def test_bad_isa_cap_is_refused():
    import os
    import subprocess
    import sys
    code = "import torch, fastddpm.ops as o\nwith o.use_backend('cpp'): o.group_norm(torch.randn(1, 4, 2, 2), 2)"
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, FASTDDPM_CPU_ISA="sse9"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "FASTDDPM_CPU_ISA must be avx512, avx2 or base, got 'sse9'" in r.stderr


def test_large_mean_channels_last_is_accurate():
    # torch's own CPU GroupNorm loses the variance for channels_last fp32 with mean 3000
    x = (torch.randn(2, 32, 16, 16) + 3000.0).to(memory_format=torch.channels_last)
    w, b = torch.randn(32), torch.randn(32)
    for layout_x in (x, x.contiguous()):
        _check_gn(layout_x, w, b, None, 8, "silu")


def _sample_inputs(dtype):
    x, w, b, a = _gn_case((2, 6, 5, 3), 3, dtype, "nchw", add=True)
    xc = x.to(memory_format=torch.channels_last)
    seed = torch.tensor([42], dtype=torch.int64)
    return [
        (x.requires_grad_(), 3, w.requires_grad_(), b.requires_grad_(), 1e-6, True, a.requires_grad_(), 0.2, seed),
        (xc.detach().requires_grad_(), 3, None, None, 1e-5, False, None, 0.0, None),
        (x.detach().reshape(2, 6, 15).requires_grad_(), 2, w.detach(), None, 1e-6, True, None, 0.0, None),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_group_norm(dtype):
    samples = _sample_inputs(dtype)
    for args in samples:
        torch.library.opcheck(CPP.group_norm, args)
        y, mean, rstd = CPP.group_norm(*args)
        x, g, w, b, _, silu, a, p, seed = args
        det = [None if v is None else v.detach() for v in (w, b, a)]  # the backward has no autograd
        bargs = (torch.randn_like(y).detach(), x.detach(), *det, mean, rstd, g, silu, p, seed,
                 w is not None, b is not None, a is not None)
        torch.library.opcheck(CPP.group_norm_backward, bargs)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
def test_opcheck_diffusion_ops(dtype):
    T = 20
    tabs = [torch.rand(T, dtype=torch.float64) + 0.1 for _ in range(5)]
    x, e, z = (torch.randn(3, 2, 4, 4).to(dtype) for _ in range(3))
    t = torch.tensor([0, 7, 19])
    torch.library.opcheck(CPP.q_sample, (x.requires_grad_(), t, z.requires_grad_(), tabs[0], tabs[1]))
    torch.library.opcheck(CPP.simple_loss, (e.detach().requires_grad_(), z.detach(), True))
    torch.library.opcheck(CPP.simple_loss, (e.detach(), z.detach(), False))
    torch.library.opcheck(CPP.p_sample_step, (x.detach(), t, e.detach(), *tabs, z.detach(), True))


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
def test_diffusion_ops_match_float64(poisoned, dtype):
    from fastddpm import GaussianDiffusion
    d = GaussianDiffusion.linear(T=100)
    x0, eps, noise = (torch.randn(4, 3, 5, 7).to(dtype) for _ in range(3))
    t = torch.tensor([0, 1, 50, 99])
    tol = REL_TOL[dtype] if dtype != torch.float32 else 2e-6
    # q_sample and its gradients
    dy = torch.randn(x0.shape).to(dtype)
    with ops.use_backend("cpp"), expect_ran("fastddpm_cpp::q_sample") as ran:
        q, (gx, gn) = _grads(lambda a, n: ops.q_sample(a, t, n, d.sqrt_alphas_cumprod, d.sqrt_one_minus_alphas_cumprod),
                             (x0, noise), dy)
    q_ref, (gx_ref, gn_ref) = _grads(
        lambda a, n: reference.q_sample_ref(a, t, n, d.sqrt_alphas_cumprod, d.sqrt_one_minus_alphas_cumprod),
        (x0.double(), noise.double()), dy.double())
    assert ran["fastddpm_cpp::q_sample"] == 3     # forward, and the backward's two calls
    for name, out, ref in (("q", q, q_ref), ("dx0", gx, gx_ref), ("dnoise", gn, gn_ref)):
        assert out.dtype == dtype, name
        assert_close_rel(out, ref, dtype, name, tol)
    # L_simple and its gradients
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    with ops.use_backend("cpp"), expect_ran("fastddpm_cpp::simple_loss"):
        loss, (ge, gz) = _grads(lambda a, n: ops.simple_loss(a, n), (eps, noise), torch.tensor(1.7, dtype=loss_dtype))
    loss_ref, (ge_ref, gz_ref) = _grads(reference.simple_loss_ref, (eps.double(), noise.double()),
                                        torch.tensor(1.7, dtype=loss_dtype).double())
    assert loss.dtype == loss_dtype
    assert_close_rel(loss, loss_ref, loss_dtype, "loss", 1e-6 if dtype != torch.float64 else None)
    assert_close_rel(ge, ge_ref, dtype, "d eps_hat", tol)
    assert_close_rel(gz, gz_ref, dtype, "d noise", tol)
    # the ancestral step, given noise (no noise at t == 0)
    tabs = (d.sqrt_recip_alphas_cumprod, d.sqrt_recipm1_alphas_cumprod, d.posterior_mean_coef1,
            d.posterior_mean_coef2, d.model_log_variance)
    for clip in (True, False):
        with ops.use_backend("cpp"), expect_ran("fastddpm_cpp::p_sample_step"):
            out = ops.p_sample_step(x0, t, eps, *tabs, noise=noise, clip=clip)
        ref = reference.p_sample_step_ref(x0.double(), t, eps.double(), *tabs, noise.double(), clip)
        assert out.dtype == dtype
        assert_close_rel(out, ref, dtype, f"p_sample_step clip={clip}", tol)


def test_seeded_step_uses_reference_noise():
    from fastddpm import GaussianDiffusion
    d = GaussianDiffusion.linear(T=50)
    x, e = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([3, 40])
    tabs = (d.sqrt_recip_alphas_cumprod, d.sqrt_recipm1_alphas_cumprod, d.posterior_mean_coef1,
            d.posterior_mean_coef2, d.model_log_variance)
    outs = []
    for backend in ("reference", "cpp"):
        with ops.use_backend(backend), expect_ran(*(["fastddpm_cpp::p_sample_step"] if backend == "cpp" else [])):
            outs.append(ops.p_sample_step(x, t, e, *tabs, seed=5, offset=2))
    assert rel_err(outs[1], outs[0]) < 1e-6


def _step_case(dtype, eps_dtype, noise_mode, k, B=3, shape=(3, 5, 7)):
    """A random step: table rows with every column nonzero, a history ring of k past
    predictions (k = 0: none), the noise source."""
    x = torch.randn(B, *shape).to(dtype)
    eps = torch.randn(B, *shape).to(eps_dtype)
    ring = (torch.randn(k + 1, B, *shape) * 0.7).to(dtype) if k else None
    table = torch.rand(4, len(reference.SAMPLER_COEFS), dtype=torch.float64) * 1.5 - 0.25
    kw = {}
    if noise_mode == "noise":
        kw["noise"] = torch.randn(B, *shape).to(eps_dtype)
    elif noise_mode == "rng":
        kw["rng"] = torch.tensor([(1 << 62) + 12345, (1 << 33) + 9, 6])
    return x, eps, table, torch.tensor([2]), ring, kw


@pytest.mark.parametrize("noise_mode", ("noise", "rng", "none"))
@pytest.mark.parametrize("dtype,eps_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                             (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)],
                         ids=str)
def test_sample_step_matches_float64(poisoned, dtype, eps_dtype, noise_mode):
    for k, clip in ((0, True), (1, False), (4, True), (2, True)):
        x, eps, table, step, ring, kw = _step_case(dtype, eps_dtype, noise_mode, k)
        ring_ref = None if ring is None else ring.double()
        ring2 = None if ring is None else ring.clone()
        with ops.use_backend("cpp"), expect_ran("fastddpm_cpp::sample_step"):
            out, x0 = ops.sample_step(x, eps, table, step, ring, clip=clip, return_x0=True, **kw)
        ref_kw = {n: v.double() if n == "noise" else v for n, v in kw.items()}
        ref, ref_x0 = reference.sample_step_ref(x.double(), eps.double(), table, step, ring_ref, clip=clip,
                                                **ref_kw)
        assert out.dtype == dtype and x0.dtype == dtype and out.shape == x.shape
        tol = 2e-6 if dtype == torch.float32 else REL_TOL[dtype]
        assert_close_rel(out, ref, dtype, f"x_next K={k} clip={clip}", tol)
        assert_close_rel(x0, ref_x0, dtype, f"x0_hat K={k} clip={clip}", tol)
        if ring is not None:
            assert_close_rel(ring, ring_ref, dtype, f"history K={k} clip={clip}", tol)
        with ops.use_backend("cpp"):
            out2, none = ops.sample_step(x, eps, table, step, ring2, clip=clip, **kw)
        assert none is None and torch.equal(out2, out)
        if ring is not None:
            assert torch.equal(ring2, ring)


def test_sample_step_noise_is_the_reference_philox_stream():
    # sigma = 1, everything else 0: x_next is the drawn noise itself
    table = torch.zeros(3, len(reference.SAMPLER_COEFS), dtype=torch.float64)
    table[1, -1] = 1.0
    x = torch.randn(4, 3, 9, 11)
    for rng in (torch.tensor([7, 0, 0]), torch.tensor([-(1 << 40) - 3, (1 << 35) + 2, 2**32 - 2])):
        with ops.use_backend("cpp"), expect_ran("fastddpm_cpp::sample_step"):
            z, _ = ops.sample_step(x, x, table, torch.tensor([1]), rng=rng)
        z_ref = reference.philox_normal_ref(rng, x.shape)
        assert (z - z_ref).abs().max().item() < 1e-5
        assert rel_err(z, z_ref) < 1e-6
    # image b's noise depends on first_sample + b only, not on the batch it is drawn in
    with ops.use_backend("cpp"):
        part, _ = ops.sample_step(x[2:], x[2:], table, torch.tensor([1]), rng=torch.tensor([7, 0, 2]))
        whole, _ = ops.sample_step(x, x, table, torch.tensor([1]), rng=torch.tensor([7, 0, 0]))
    assert torch.equal(part, whole[2:])


def test_sample_step_falls_back_where_the_kernel_cannot():
    x, eps, table, step, _, kw = _step_case(torch.float64, torch.float64, "noise", 0)
    with ops.use_backend("cpp"):
        out, _ = ops.sample_step(x, eps, table, step, **kw)
        empty, _ = ops.sample_step(x[:0], eps[:0], table, step, noise=kw["noise"][:0])
    assert out.dtype == torch.float64 and empty.shape == (0, 3, 5, 7)
    assert rel_err(out, reference.sample_step_ref(x, eps, table, step, None, kw["noise"])[0]) < 1e-12


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_sample_step(dtype):
    for mode, k in (("noise", 1), ("rng", 0), ("none", 3)):
        x, eps, table, step, ring, kw = _step_case(dtype, torch.float32, mode, k)
        for write_x0 in (True, False):
            torch.library.opcheck(CPP.sample_step, (x, eps, table, step, ring, kw.get("noise"), kw.get("rng"),
                                                    True, write_x0))


def test_sample_step_bad_input_clear_errors():
    x = torch.randn(2, 3, 4)
    tab, step = torch.rand(5, 11), torch.tensor([1])
    ring = torch.randn(3, 2, 3, 4)
    with pytest.raises(RuntimeError, match=r"step 5 is outside \[0, 4\]"):
        CPP.sample_step(x, x, tab, torch.tensor([5]), None, None, None, True, False)
    with pytest.raises(RuntimeError, match=r"table must be a \(S, 11\)"):
        CPP.sample_step(x, x, torch.rand(5, 6), step, None, None, None, True, False)
    with pytest.raises(RuntimeError, match="eps shape"):
        CPP.sample_step(x, x[:1], tab, step, None, None, None, True, False)
    with pytest.raises(RuntimeError, match="history must be a contiguous"):
        CPP.sample_step(x, x, tab, step, ring.half(), None, None, True, False)
    with pytest.raises(RuntimeError, match="history must be a contiguous"):
        CPP.sample_step(x, x, tab, step, torch.randn(6, 2, 3, 4), None, None, True, False)
    with pytest.raises(RuntimeError, match="history"):
        CPP.sample_step(x, x, tab, step, ring[:, :1], None, None, True, False)
    with pytest.raises(RuntimeError, match="give noise or rng, not both"):
        CPP.sample_step(x, x, tab, step, None, x, torch.tensor([1, 2, 3]), True, False)
    with pytest.raises(RuntimeError, match=r"rng must be a \(3,\) int64"):
        CPP.sample_step(x, x, tab, step, None, None, torch.tensor([1, 2]), True, False)
    with pytest.raises(RuntimeError, match="x_t must be float32, float16 or bfloat16"):
        CPP.sample_step(x.double(), x, tab, step, None, None, None, True, False)
    # the public boundary answers first, with ValueError/TypeError
    with ops.use_backend("cpp"):
        with pytest.raises(ValueError, match=r"step must lie in \[0, 4\]"):
            ops.sample_step(x, x, tab, torch.tensor([5]))
        with pytest.raises(ValueError, match="give noise or rng, not both"):
            ops.sample_step(x, x, tab, step, noise=x, rng=torch.tensor([1, 2, 3]))
        with pytest.raises(TypeError, match="history has dtype"):
            ops.sample_step(x, x, tab, step, ring.half())


def test_auto_picks_cpp_only_for_the_measured_ops():
    x = torch.randn(2, 4, 3, 3)
    for op, impls in _backend._impls.items():
        chosen = _backend.pick(op, x.device)
        if op in _backend.CPU_AUTO_CPP and "cpp" in impls:
            assert chosen is impls["cpp"], op
        else:
            assert chosen is not impls.get("cpp"), op
    # GroupNorm: C++ under auto for channels_last, dropout or NCHW with >= 64
    # positions per channel (the measured wins)
    y, big = torch.randn(2, 8, 4, 4), torch.randn(1, 8, 8, 8)
    for inp, p, expect in ((y, 0.0, False), (y.to(memory_format=torch.channels_last), 0.0, True), (y, 0.2, True),
                           (big, 0.0, True), (big[:, :, :7], 0.0, False)):
        assert _backend.auto_wants_cpp("group_norm", inp, dropout=p) == expect
    assert ops.available_backends("cpu")["cpp"] is None
    assert "CPU kernels only" in ops.available_backends("meta")["cpp"]


def test_bad_input_clear_errors():
    x = torch.randn(2, 6, 3, 3)
    with pytest.raises(RuntimeError, match="not divisible by num_groups 4"):
        CPP.group_norm(x, 4, None, None, 1e-6, True, None, 0.0, None)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        CPP.group_norm(x.double(), 3, None, None, 1e-6, True, None, 0.0, None)
    with pytest.raises(RuntimeError, match="add must be"):
        CPP.group_norm(x, 3, None, None, 1e-6, True, torch.randn(2, 5), 0.0, None)
    with pytest.raises(RuntimeError, match="needs a one-element int64 CPU seed"):
        CPP.group_norm(x, 3, None, None, 1e-6, True, None, 0.5, None)
    with pytest.raises(RuntimeError, match=r"dropout p must be in \[0, 1\)"):
        CPP.group_norm(x, 3, None, None, 1e-6, True, None, 1.0, torch.tensor([1]))
    y, m, r = CPP.group_norm(x, 3, None, None, 1e-6, True, None, 0.0, None)
    with pytest.raises(RuntimeError, match="mean and rstd must be float64"):
        CPP.group_norm_backward(y, x, None, None, None, m.float(), r, 3, True, 0.0, None, False, False, False)
    with pytest.raises(RuntimeError, match=r"t\[1\] = 7 is outside \[0, 4\]"):
        CPP.q_sample(x, torch.tensor([0, 7]), x, torch.ones(5), torch.ones(5))
    with pytest.raises(RuntimeError, match="noise shape"):
        CPP.p_sample_step(x, torch.tensor([0, 1]), x, *[torch.ones(5)] * 5, x[:1], True)
    # the public boundary answers first, with ValueError/TypeError
    with ops.use_backend("cpp"):
        with pytest.raises(ValueError, match="divisible"):
            ops.group_norm(x, 4)
        with pytest.raises(ValueError, match="num_groups"):
            ops.group_norm(x, True)


def test_extension_built_for_another_torch_is_refused(monkeypatch):
    monkeypatch.setattr(_ext, "_built_for", lambda: "0.0.1")
    why = _ext._load()
    assert "built for torch 0.0.1" in why and "rebuild" in why
    monkeypatch.setattr(_ext, "_built_for", lambda: None)
    assert "rebuild" in _ext._load()


def test_extension_built_from_older_sources_is_refused(monkeypatch):
    """A _C built (for this torch) before an op was added lacks its schema: it is
    refused with a rebuild message instead of `import fastddpm` raising when the
    fake kernels register. _ext.OPS lists exactly csrc/ops.cpp's schemas."""
    import os
    import re
    src = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "ops.cpp")).read()
    assert sorted(_ext.OPS) == sorted(re.findall(r'm\.def\("(\w+)\(', src))
    assert _ext._load() is None
    monkeypatch.setattr(_ext, "OPS", _ext.OPS + ("op_added_after_this_build",))
    why = _ext._load()
    assert "out of date" in why and "op_added_after_this_build" in why and "rebuild" in why


# ----------------------------------------------------------------------------- output cache

CACHE = torch.ops.fastddpm_cpp if _ext.has_extension() else None


def _cached_outputs(shape):
    """Every op whose outputs come from the cache, at x-shape `shape`: {name: (fn giving
    its cached outputs as a tuple, their float64 references)}."""
    from fastddpm import GaussianDiffusion
    torch.manual_seed(fresh_seed())
    x, dy, noise = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    w, b = torch.randn(shape[1]), torch.randn(shape[1])
    d = GaussianDiffusion.linear(T=10)
    t = torch.randint(0, 10, (shape[0],))
    _, mean, rstd = CACHE.group_norm(x, 4, w, b, 1e-6, True, None, 0.0, None)
    xd = x.double().requires_grad_()
    want_y = reference.group_norm_ref(xd, 4, w.double(), b.double(), 1e-6, "silu")
    want_y.backward(dy.double())
    tabs = (d.sqrt_recip_alphas_cumprod, d.sqrt_recipm1_alphas_cumprod, d.posterior_mean_coef1,
            d.posterior_mean_coef2, d.model_log_variance)
    table, step = torch.rand(3, len(reference.SAMPLER_COEFS), dtype=torch.float64), torch.tensor([1])
    return {
        "group_norm": (lambda: CACHE.group_norm(x, 4, w, b, 1e-6, True, None, 0.0, None)[:1], (want_y,)),
        "group_norm_backward": (lambda: CACHE.group_norm_backward(dy, x, w, b, None, mean, rstd, 4, True, 0.0, None,
                                                                  False, False, False)[:1], (xd.grad,)),
        "q_sample": (lambda: (CACHE.q_sample(x, t, noise, d.sqrt_alphas_cumprod, d.sqrt_one_minus_alphas_cumprod),),
                     (reference.q_sample_ref(x.double(), t, noise.double(), d.sqrt_alphas_cumprod,
                                             d.sqrt_one_minus_alphas_cumprod),)),
        "simple_loss": (lambda: CACHE.simple_loss(x, noise, True)[1:], (2 * (x.double() - noise.double()) / x.numel(),)),
        "p_sample_step": (lambda: (CACHE.p_sample_step(x, t, dy, *tabs, noise, False),),
                          (reference.p_sample_step_ref(x.double(), t, dy.double(), *tabs, noise.double(), clip=False),)),
        "sample_step": (lambda: CACHE.sample_step(x, dy, table, step, None, noise, None, False, True),
                        reference.sample_step_ref(x.double(), dy.double(), table, step, noise=noise.double(),
                                                  clip=False)),
    }


def test_cached_outputs_reuse_freed_blocks_and_overwrite_them_whole():
    """Each op's output blocks, freed and poisoned with NaN, are handed to its next
    outputs of that size, which must still equal the float64 reference."""
    for name, (fn, want) in _cached_outputs((4, 16, 32, 32)).items():  # 256 KiB each: cached
        first = fn()
        ptrs, hits = {o.data_ptr() for o in first}, CACHE.cpu_cache_stats()[1]
        for o in first:
            o.fill_(float("nan"))
        del first, o
        again = fn()
        assert {o.data_ptr() for o in again} == ptrs and CACHE.cpu_cache_stats()[1] == hits + len(ptrs), name
        for o, r in zip(again, want):
            assert rel_err(o, r) < 1e-5, name


def test_cache_holds_blocks_until_emptied_and_frees_across_threads():
    import threading
    shape = (4, 16, 32, 32)
    x = torch.randn(shape)
    y = CACHE.group_norm(x, 4, None, None, 1e-6, False, None, 0.0, None)[0]
    CACHE.cpu_empty_cache()
    assert CACHE.cpu_cache_stats()[0] == 0
    box = [y]
    del y
    th = threading.Thread(target=box.clear)  # the last reference dies on another thread
    th.start()
    th.join()
    assert CACHE.cpu_cache_stats()[0] >= x.numel() * 4
    y = CACHE.group_norm(x, 4, None, None, 1e-6, False, None, 0.0, None)[0]
    y.resize_(8, 16, 32, 32)  # a cached output stays an ordinary, resizable tensor
    y.fill_(1.0)
    assert y.shape == (8, 16, 32, 32) and bool((y == 1).all())
    CACHE.cpu_empty_cache()
    assert CACHE.cpu_cache_stats()[0] == 0


@pytest.mark.parametrize("env,held,error", [("0", False, None), ("1", False, None), ("64", True, None),
                                            ("lots", False, "FASTDDPM_CPU_CACHE_MB must be a whole number")])
def test_cache_limit_from_the_environment(env, held, error):
    """FASTDDPM_CPU_CACHE_MB: 0 turns the cache off, a 1 MiB limit keeps no 1.5 MiB
    block, 64 MiB keeps it; a bad value is refused with its name."""
    import ast
    import os
    import subprocess
    import sys
    code = ("import torch, fastddpm; op = torch.ops.fastddpm_cpp\n"
            "x = torch.randn(32, 48, 16, 16)\n"
            "try:\n    y = op.group_norm(x, 8, None, None, 1e-6, True, None, 0.0, None)[0]\n"
            "except RuntimeError as e:\n    print(str(e).splitlines()[0]); raise SystemExit(0)\n"
            "del y; print(op.cpu_cache_stats())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "FASTDDPM_CPU_CACHE_MB": env})
    assert r.returncode == 0, r.stderr
    if error:
        assert error in r.stdout and "lots" in r.stdout
    else:
        held_bytes, _, _, limit = ast.literal_eval(r.stdout.strip())
        assert limit == int(env) << 20 and (held_bytes == 32 * 48 * 16 * 16 * 4) == held


# ----------------------------------------------------------------------------- whole UNet

TINY = dict(image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4)


def _unet(dropout=0.0, seed=0):
    from fastddpm import UNet, UNetConfig
    torch.manual_seed(seed)
    model = UNet(UNetConfig.tiny(dropout=dropout, **TINY))
    with torch.no_grad():  # undo the zero init so every path carries signal
        for p in model.parameters():
            if p.abs().max() == 0:
                p.normal_(std=0.05)
    return model


def _unet_run(model, x, t, backend, channels_last=False):
    model.zero_grad(set_to_none=True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    with ops.use_backend(backend), expect_ran(*(GN_OPS if backend == "cpp" else ())):
        out = model(x, t)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_unet_cpp_backend_matches_float64_reference(channels_last):
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    out, grads = _unet_run(_unet(), x, t, "cpp", channels_last)
    ref_out, ref_grads = _unet_run(_unet().double(), x.double(), t, "reference")
    assert rel_err(out, ref_out) < 1e-5
    worst = max((rel_err(grads[n], ref_grads[n]), n) for n in grads if ref_grads[n].norm() > 0)
    assert worst[0] < 1e-5, f"gradient of {worst[1]}: {worst[0]:.2e}"


def test_unet_training_step_compiles_fullgraph_on_cpp_backend():
    # aot_eager traces the custom ops through their fake implementations and
    # autograd exactly as inductor does, without inductor's C++ compile time.
    from fastddpm import GaussianDiffusion
    model, d = _unet(dropout=0.1), GaussianDiffusion.linear(T=100)
    x0, noise = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    t = torch.tensor([1, 60])

    def step(x0, noise):
        return d.training_loss(model, x0, t, noise)

    with ops.use_backend("cpp"):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        torch.manual_seed(3)
        loss = compiled(x0, noise)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        eager = step(x0, noise)
        eager.backward()
    assert rel_err(loss, eager) < 1e-6
    assert all(rel_err(grads[n], p.grad) < 1e-5 for n, p in model.named_parameters() if p.grad.norm() > 0)
