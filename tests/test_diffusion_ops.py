"""Diffusion ops (q_sample, L_simple, the ancestral step, the sampler step):
Triton custom ops against the float64 reference, Philox noise, the seeded
reference path, and the range/length checks every backend applies.

On the CPU the kernels run through TRITON_INTERPRET=1 at tiny shapes; the
`gpu` tests run the real shapes and CUDA-graph capture.
"""

import contextlib

import pytest
import torch

import fastddpm.ops as ops
from fastddpm import reference
from fastddpm.kernels import diffusion as kd
from _util import HAS_CUDA, assert_close_rel, capture_cuda_graph, expect_ran, rel_err, run_sm90_compile_check

DEV = "cuda" if HAS_CUDA else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
T_STEPS = 40
# per-sample shapes: image, odd, 1-D, scalar-per-sample
SHAPES = [(3, 2, 4, 4), (1, 3, 5, 5), (2, 7), (5,)]
SHAPE_IDS = ["3x2x4x4", "1x3x5x5", "2x7", "5"]


def _tables(dtype=torch.float64, device=DEV):
    """A real linear schedule (T_STEPS steps): the five sampler tables and the q_sample pair."""
    betas = torch.linspace(1e-4, 0.2, T_STEPS, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    tabs = {
        "sqrt_abar": abar.sqrt(),
        "sqrt_one_minus_abar": (1 - abar).sqrt(),
        "sqrt_recip_abar": (1 / abar).sqrt(),
        "sqrt_recipm1_abar": (1 / abar - 1).sqrt(),
        "coef1": betas * abar_prev.sqrt() / (1 - abar),
        "coef2": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
        "log_var": torch.log(torch.cat([post_var[1:2], betas[1:]])),
    }
    return {k: v.to(dtype=dtype, device=device) for k, v in tabs.items()}


STEP_TABLES = ("sqrt_recip_abar", "sqrt_recipm1_abar", "coef1", "coef2", "log_var")


def _step_tables(tabs):
    return tuple(tabs[k] for k in STEP_TABLES)


def _t(B, device=DEV, include=(0, T_STEPS - 1)):
    t = torch.randint(0, T_STEPS, (B,), device=device)
    for i, v in enumerate(include[:B]):
        t[i] = v
    return t


@contextlib.contextmanager
def _on(backend, op, dtype=torch.float32):
    """ops.use_backend(backend); on "triton" with a kernel dtype, the block must run
    the Triton custom op fastddpm::<op> (no silent fall back to the reference)."""
    ran = (f"fastddpm::{op}",) if backend == "triton" and dtype != torch.float64 else ()
    with ops.use_backend(backend), expect_ran(*ran):
        yield


def _rand(shape, dtype, device=DEV, scale=1.0):
    return (torch.randn(shape, device=device) * scale).to(dtype)


# ----------------------------------------------------------------------------- q_sample


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_q_sample_matches_reference(backend, dtype, shape):
    tabs = _tables()
    x0, noise = _rand(shape, dtype), _rand(shape, dtype)
    t = _t(shape[0])
    with _on(backend, "q_sample"):
        out = ops.q_sample(x0, t, noise, tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"])
    ref = reference.q_sample_ref(x0.double(), t, noise.double(), tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"])
    assert out.dtype == dtype and out.shape == x0.shape
    assert_close_rel(out, ref, dtype)


@pytest.mark.parametrize("table_dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_q_sample_table_dtypes(table_dtype):
    tabs = _tables(table_dtype)
    x0, noise = _rand((3, 2, 3, 3), torch.float32), _rand((3, 2, 3, 3), torch.float32)
    t = _t(3)
    out = kd.q_sample_fwd(x0, t, noise, tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"])
    ref = reference.q_sample_ref(x0, t, noise, tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"])
    assert_close_rel(out, ref, torch.float32)


def test_q_sample_gradients():
    tabs = _tables()
    x0, noise = _rand((3, 2, 3, 3), torch.float32), _rand((3, 2, 3, 3), torch.float32)
    t = _t(3)
    g = torch.randn_like(x0)
    a = [x0.clone().requires_grad_(), noise.clone().requires_grad_()]
    with _on("triton", "q_sample"):
        out = ops.q_sample(a[0], t, a[1], tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"])
        grads = torch.autograd.grad(out, a, g)
    r = [x0.double().requires_grad_(), noise.double().requires_grad_()]
    ref = reference.q_sample_ref(r[0], t, r[1], tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"])
    grads_ref = torch.autograd.grad(ref, r, g.double())
    for gr, gr_ref in zip(grads, grads_ref):
        assert_close_rel(gr, gr_ref, torch.float32)


def test_q_sample_non_contiguous_and_poisoned(monkeypatch):
    monkeypatch.setattr(kd, "POISON", True)
    tabs = _tables()
    x0 = _rand((3, 4, 5, 2), torch.float32).permute(0, 3, 1, 2)
    noise = _rand((3, 2, 4, 5), torch.float32).to(memory_format=torch.channels_last)
    t = _t(3)
    out = kd.q_sample_fwd(x0, t, noise, tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"])
    assert torch.isfinite(out).all()
    ref = reference.q_sample_ref(x0.double(), t, noise.double(), tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"])
    assert_close_rel(out, ref, torch.float32)
    buf = torch.full((3, 2, 4, 5), float("nan"))
    assert kd.q_sample_fwd(x0, t, noise, tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"], out=buf) is buf
    assert torch.isfinite(buf).all()


def test_q_sample_opcheck():
    tabs = _tables()
    x0 = _rand((2, 2, 3, 3), torch.float32).requires_grad_()
    noise = _rand((2, 2, 3, 3), torch.float32).requires_grad_()
    torch.library.opcheck(torch.ops.fastddpm.q_sample.default,
                          (x0, _t(2), noise, tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"]))


# ----------------------------------------------------------------------------- simple_loss


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 2, 4, 4), (1, 3, 5, 5), (7,)], ids=["3x2x4x4", "1x3x5x5", "7"])
def test_simple_loss_and_gradients(monkeypatch, backend, dtype, shape):
    monkeypatch.setattr(kd, "LOSS_BLOCK", 16)       # several blocks, the last one partial
    eps_hat, noise = _rand(shape, dtype), _rand(shape, dtype)
    e, n = eps_hat.clone().requires_grad_(), noise.clone().requires_grad_()
    with _on(backend, "simple_loss"):
        loss = ops.simple_loss(e, n)
    upstream = torch.tensor(1.7)
    grads = torch.autograd.grad(loss, (e, n), upstream)
    er, nr = eps_hat.double().requires_grad_(), noise.double().requires_grad_()
    ref = reference.simple_loss_ref(er, nr)
    grads_ref = torch.autograd.grad(ref, (er, nr), upstream.double())
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close_rel(loss, ref, torch.float32, "loss", tol=1e-6)
    for name, gr, gr_ref in zip(("d eps_hat", "d noise"), grads, grads_ref):
        assert gr.dtype == dtype
        assert_close_rel(gr, gr_ref, dtype, name)


def test_simple_loss_deterministic_and_fully_written(monkeypatch):
    monkeypatch.setattr(kd, "POISON", True)
    monkeypatch.setattr(kd, "LOSS_BLOCK", 32)
    eps_hat, noise = _rand((4, 3, 5, 5), torch.float32), _rand((4, 3, 5, 5), torch.float32)
    a = kd.simple_loss_fwd(eps_hat, noise, True)
    b = kd.simple_loss_fwd(eps_hat, noise, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.isfinite(a[0]) and torch.isfinite(a[1]).all()
    loss, grad = kd.simple_loss_fwd(eps_hat, noise, False)
    assert grad.numel() == 0 and torch.equal(loss, a[0])


def test_simple_loss_no_grad_mode_skips_gradient():
    e = _rand((2, 3, 4), torch.float32).requires_grad_()
    n = _rand((2, 3, 4), torch.float32)
    with torch.no_grad(), _on("triton", "simple_loss"):
        loss = ops.simple_loss(e, n)
    assert not loss.requires_grad
    assert_close_rel(loss, reference.simple_loss_ref(e.double(), n.double()), torch.float32)


def test_simple_loss_opcheck():
    e = _rand((2, 3, 5), torch.float32).requires_grad_()
    n = _rand((2, 3, 5), torch.float32)
    torch.library.opcheck(torch.ops.fastddpm.simple_loss.default, (e, n, True))


# ----------------------------------------------------------------------------- p_sample_step


def _step(backend, x, t, eps, tabs, noise=None, clip=True, **kw):
    with _on(backend, "p_sample_step", x.dtype):
        return ops.p_sample_step(x, t, eps, *_step_tables(tabs), noise, clip, **kw)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("clip", [True, False])
def test_p_sample_step_explicit_noise(backend, dtype, shape, clip):
    tabs = _tables()
    x, eps, z = _rand(shape, dtype, scale=1.5), _rand(shape, dtype), _rand(shape, dtype)
    t = _t(shape[0])
    out = _step(backend, x, t, eps, tabs, z, clip)
    ref = reference.p_sample_step_ref(x.double(), t, eps.double(), *_step_tables(tabs), z.double(), clip)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_rel(out, ref, dtype)


def test_p_sample_step_fp32_matches_fp32_reference_closely():
    """Explicit noise: the same fp32 arithmetic as reference.p_sample_step_ref."""
    tabs = _tables()
    x, eps, z = _rand((4, 2, 3, 3), torch.float32), _rand((4, 2, 3, 3), torch.float32), _rand((4, 2, 3, 3), torch.float32)
    t = _t(4)
    out = _step("triton", x, t, eps, tabs, z)
    ref = reference.p_sample_step_ref(x, t, eps, *_step_tables(tabs), z)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)


def test_p_sample_step_poisoned_outputs(monkeypatch):
    monkeypatch.setattr(kd, "POISON", True)
    tabs = _tables()
    x, eps = _rand((3, 2, 5, 5), torch.float16), _rand((3, 2, 5, 5), torch.float16)
    t = _t(3)
    for noise in (_rand((3, 2, 5, 5), torch.float16), None):
        out = kd.p_sample_step_fwd(x, t, eps, *_step_tables(tabs), noise, True, 7, 0)
        assert torch.isfinite(out).all()


def _seeded_noise_of(backend, x, t, eps, tabs, **kw):
    """z recovered from a seeded step: (out - out with zero noise) / std, for t > 0 samples."""
    out = _step(backend, x, t, eps, tabs, **kw)
    mean = _step(backend, x, t, eps, tabs, torch.zeros_like(x))
    std = torch.exp(0.5 * tabs["log_var"][t].float()).view(-1, *[1] * (x.dim() - 1))
    return (out.float() - mean.float()) / std, out, mean


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_seeded_step_no_noise_at_t0(backend):
    tabs = _tables()
    x, eps = _rand((4, 2, 3, 3), torch.float32), _rand((4, 2, 3, 3), torch.float32)
    t = torch.tensor([0, 5, 0, T_STEPS - 1], device=DEV)
    z, out, mean = _seeded_noise_of(backend, x, t, eps, tabs, seed=11)
    assert torch.equal(out[t == 0], mean[t == 0])
    assert (z[t != 0].abs() > 0).float().mean() > 0.99


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_seeded_step_determinism_and_distinct_streams(backend):
    tabs = _tables()
    x, eps = _rand((2, 3, 4, 4), torch.float32), _rand((2, 3, 4, 4), torch.float32)
    t5, t6 = torch.full((2,), 5, device=DEV), torch.full((2,), 6, device=DEV)
    z = lambda t, **kw: _seeded_noise_of(backend, x, t, eps, tabs, **kw)[0]   # noqa: E731
    base = z(t5, seed=1)
    assert torch.equal(base, z(t5, seed=1))                      # same seed: same noise
    for other in (z(t5, seed=2), z(t6, seed=1), z(t5, seed=1, offset=1)):
        assert (other - base).abs().mean() > 0.5                 # a different stream
        assert abs(torch.corrcoef(torch.stack([other.flatten(), base.flatten()]))[0, 1]) < 0.3
    # within one tensor, samples and elements get different normals
    assert (base[0] - base[1]).abs().mean() > 0.5
    assert base.flatten().unique().numel() == base.numel()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_seeded_noise_is_standard_normal(backend):
    tabs = _tables()
    shape = (8, 4, 16, 16)   # 8192 normals
    x, eps = _rand(shape, torch.float32), _rand(shape, torch.float32)
    t = torch.arange(1, 9, device=DEV)
    z = _seeded_noise_of(backend, x, t, eps, tabs, seed=2024)[0].double().flatten()
    assert abs(z.mean().item()) < 0.05          # ~4.5 standard errors
    assert abs(z.std().item() - 1.0) < 0.04     # ~5 standard errors
    assert abs((z ** 3).mean().item()) < 0.15   # symmetric
    assert abs((z ** 4).mean().item() - 3.0) < 0.3
    assert 0.64 < (z.abs() < 1).double().mean().item() < 0.72   # P(|z| < 1) = 0.683


def test_seeded_noise_is_the_same_on_every_backend():
    """Philox (seed, element, t, offset) as device ops on the reference path, in the
    kernel on Triton: the same normals, no host-side generator (issue 24)."""
    tabs = _tables()
    x, eps = _rand((3, 2, 4, 4), torch.float32), _rand((3, 2, 4, 4), torch.float32)
    t = torch.tensor([1, 7, T_STEPS - 1], device=DEV)
    for seed, offset in ((3, 0), (2**62 + 9, 2**40 + 3)):
        ref = _step("reference", x, t, eps, tabs, seed=seed, offset=offset)
        tri = _step("triton", x, t, eps, tabs, seed=seed, offset=offset)
        assert_close_rel(tri, ref, torch.float32, tol=1e-5)
    z = reference.seeded_step_noise_ref((3, 2, 4, 4), t, 3, 0)
    assert torch.equal(_seeded_noise_of("reference", x, t, eps, tabs, seed=3)[0][1:].sign(), z[1:].sign())


def test_seeded_step_triton_matches_explicit_noise_math():
    """The seeded kernel is the explicit-noise kernel with Philox z: clip, mean and std agree."""
    tabs = _tables()
    x, eps = _rand((3, 2, 4, 4), torch.float32, scale=2.0), _rand((3, 2, 4, 4), torch.float32)
    t = torch.tensor([0, 3, T_STEPS - 1], device=DEV)
    z, out, _ = _seeded_noise_of("triton", x, t, eps, tabs, seed=5, offset=2**40 + 3)
    ref = reference.p_sample_step_ref(x.double(), t, eps.double(), *_step_tables(tabs), z.double())
    assert_close_rel(out, ref, torch.float32, tol=1e-5)


def test_p_sample_step_opcheck():
    tabs = _step_tables(_tables())
    x, eps, z = (_rand((2, 2, 3, 3), torch.float32) for _ in range(3))
    t = _t(2)
    torch.library.opcheck(torch.ops.fastddpm.p_sample_step.default, (x, t, eps, *tabs, z, True, 0, 0))
    torch.library.opcheck(torch.ops.fastddpm.p_sample_step.default, (x, t, eps, *tabs, None, False, 3, -5))


def test_float64_runs_the_reference():
    tabs = _tables()
    x, eps, z = (_rand((2, 2, 3, 3), torch.float64) for _ in range(3))
    t = _t(2)
    out = _step("triton", x, t, eps, tabs, z)
    assert torch.equal(out, reference.p_sample_step_ref(x, t, eps, *_step_tables(tabs), z))
    with ops.use_backend("triton"):
        q = ops.q_sample(x, t, z, tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"])
        loss = ops.simple_loss(x, z)
    assert torch.equal(q, reference.q_sample_ref(x, t, z, tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"]))
    assert loss.dtype == torch.float64


def test_torch_compile_fullgraph():
    """Training-loss and sampler-step paths under torch.compile(fullgraph=True)."""
    tabs = _tables(torch.float32)

    def loss_fn(x0, t, noise, w):
        with ops.use_backend("triton"):
            xt = ops.q_sample(x0, t, noise, tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"])
            return ops.simple_loss(xt * w, noise)

    def step_fn(x, t, eps):
        with ops.use_backend("triton"):
            return ops.p_sample_step(x, t, eps, *_step_tables(tabs), seed=9)

    table, step, rng = _sampler_table(), torch.tensor([3]), torch.tensor([7, 2, 0])

    def sampler_fn(x, eps, ring):
        with ops.use_backend("triton"):
            return ops.sample_step(x, eps, table, step, ring, rng=rng, return_x0=True)

    x0, noise = _rand((2, 2, 3, 3), torch.float32), _rand((2, 2, 3, 3), torch.float32)
    t = _t(2)
    w = torch.randn(2, 2, 3, 3, requires_grad=True)
    loss = torch.compile(loss_fn, fullgraph=True)(x0, t, noise, w)
    (gw,) = torch.autograd.grad(loss, w)
    wr = w.detach().double().requires_grad_()
    xt = reference.q_sample_ref(x0.double(), t, noise.double(), tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"])
    loss_ref = reference.simple_loss_ref(xt * wr, noise.double())
    (gw_ref,) = torch.autograd.grad(loss_ref, wr)
    assert_close_rel(loss, loss_ref, torch.float32, tol=1e-5)
    assert_close_rel(gw, gw_ref, torch.float32, tol=1e-5)
    out = torch.compile(step_fn, fullgraph=True)(x0, t, noise)
    assert torch.equal(out, step_fn(x0, t, noise))
    ring = _ring(2, x0.shape, torch.float32)
    ring_eager = ring.clone()
    compiled = torch.compile(sampler_fn, fullgraph=True)(x0, noise, ring)
    for a, b in zip(compiled, sampler_fn(x0, noise, ring_eager)):
        assert torch.equal(a, b)
    assert torch.equal(ring, ring_eager)            # the in-place history write survives compilation


def test_bad_input_raises_clear_errors():
    tabs = _tables()
    st = _step_tables(tabs)
    x = _rand((2, 3), torch.float32)
    t = _t(2)
    with pytest.raises(ValueError, match="seed"):
        ops.p_sample_step(x, t, x, *st)                      # neither noise nor seed
    with pytest.raises(ValueError, match="not both"):
        ops.p_sample_step(x, t, x, *st, x, seed=1)
    for bad in (-1, 2**63, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            ops.p_sample_step(x, t, x, *st, seed=bad)
    with pytest.raises(ValueError, match="offset"):
        ops.p_sample_step(x, t, x, *st, seed=1, offset=-1)
    with pytest.raises(ValueError, match="shape"):
        ops.p_sample_step(x, t, x[:, :2], *st, x)
    with pytest.raises(TypeError, match="int64"):
        ops.p_sample_step(x, t.int(), x, *st, seed=1)
    with pytest.raises(ValueError, match="1-D"):
        ops.p_sample_step(x, t, x, st[0].view(2, -1), *st[1:], seed=1)
    with pytest.raises(TypeError, match="dtype"):
        ops.q_sample(x, t, x.half(), tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"])
    with pytest.raises(ValueError, match="shape"):
        ops.simple_loss(x, x[:1])
    with pytest.raises(TypeError, match="kernel dtypes"):
        kd.q_sample_fwd(x.double(), t, x.double(), tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"])
    with pytest.raises(ValueError, match="seed"):
        kd.p_sample_step_fwd(x, t, x, *st, None, True, -3, 0)


# ----------------------------------------------------------------------------- range and length checks


def _three_ops(backend, x, t, tabs, **kw):
    """q_sample and the ancestral step (explicit noise and seeded) on `backend`."""
    with ops.use_backend(backend):
        yield lambda: ops.q_sample(x, t, x, tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"], **kw)
        yield lambda: ops.p_sample_step(x, t, x, *_step_tables(tabs), x, **kw)
        yield lambda: ops.p_sample_step(x, t, x, *_step_tables(tabs), seed=3, **kw)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("bad_t", [T_STEPS, -1, 10**6])
def test_out_of_range_t_is_refused_on_every_backend(backend, bad_t):
    """Issue 10.5: Triton clamped t = T to T - 1 and answered; now every backend refuses."""
    tabs = _tables()
    x = _rand((3, 2, 3), torch.float32)
    t = torch.tensor([0, bad_t, 5], device=DEV)
    for i, call in enumerate(_three_ops(backend, x, t, tabs)):
        with ops.use_backend(backend), pytest.raises(ValueError, match=rf"t must lie in \[0, {T_STEPS - 1}\]"):
            call()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_unequal_table_lengths_are_refused_on_every_backend(backend):
    """Issue 10.5: a short table was read past its end (0.00635 returned for 1.00633)."""
    x = _rand((2, 4), torch.float32)
    t = torch.tensor([1, T_STEPS - 1], device=DEV)
    for name in ("sqrt_abar", "sqrt_one_minus_abar", "coef1", "log_var"):
        tabs = _tables()
        tabs[name] = tabs[name][: T_STEPS // 2]
        calls = list(_three_ops(backend, x, t, tabs))
        calls = calls[:1] if name.startswith("sqrt_") else calls[1:]
        for call in calls:
            with ops.use_backend(backend), pytest.raises(ValueError, match="one length T.*" + name):
                call()


def test_kernels_clamp_t_when_the_range_check_is_skipped():
    """check_range=False (GaussianDiffusion's own calls, CUDA-graph capture): a bad t
    still never reads out of bounds; it reads the last entry."""
    tabs = _tables()
    x = _rand((2, 5), torch.float32)
    bad, last = torch.tensor([T_STEPS + 7, 0], device=DEV), torch.tensor([T_STEPS - 1, 0], device=DEV)
    with _on("triton", "q_sample"):
        a = ops.q_sample(x, bad, x, tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"], check_range=False)
        b = ops.q_sample(x, last, x, tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"])
    assert torch.equal(a, b)
    table = torch.rand(4, len(reference.SAMPLER_COEFS), dtype=torch.float64, device=DEV)
    for step in (7, -3):
        ring = _ring(2, x.shape, torch.float32)
        ring_ref = ring.clone()
        out, _ = _sample_step("triton", x, x, table, torch.tensor([step], device=DEV), ring, noise=x,
                              check_range=False)
        ref, _ = reference.sample_step_ref(x, x, table, torch.tensor([min(max(step, 0), 3)], device=DEV), ring_ref,
                                           noise=x)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(ring, ring_ref)


# ----------------------------------------------------------------------------- sample_step


def _sample_step(backend, x, eps, table, step, hist=None, noise=None, rng=None, clip=True, **kw):
    # an empty batch has nothing to launch a kernel for
    with _on(backend, "sample_step", x.dtype if x.numel() else torch.float64):
        return ops.sample_step(x, eps, table, step, hist, noise, rng=rng, clip=clip, return_x0=True, **kw)


def _sampler_table(rows=5, device=DEV):
    """Random coefficients of the ranges the samplers use (x0 coefficients up to ~60),
    every column of reference.SAMPLER_COEFS nonzero."""
    t = torch.rand(rows, len(reference.SAMPLER_COEFS), dtype=torch.float64, device=device)
    t[:, 0] = 1 + 10 * t[:, 0]
    t[:, 1] = 10 * t[:, 1]
    t[:, 4:8] -= 0.5
    t[:, 8] = 5 * t[:, 8]
    return t


def _ring(k, shape, dtype):
    """A history ring of K = k past predictions, every slot random."""
    return _rand((k + 1, *shape), dtype)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 2, 4, 4), (1, 3, 5, 5), (2, 7)], ids=["3x2x4x4", "1x3x5x5", "2x7"])
@pytest.mark.parametrize("mode", ["noise", "rng", "none"])
def test_sample_step_matches_reference(backend, dtype, shape, mode):
    table = _sampler_table()
    step = torch.randint(0, 5, (1,), device=DEV)
    k = int(torch.randint(1, 5, ()))                  # 1..4 past predictions
    x, hist = _rand(shape, dtype, scale=1.5), _ring(k, shape, dtype)
    eps = _rand(shape, torch.bfloat16 if dtype == torch.float32 else dtype)   # a bf16 network output
    noise = _rand(shape, dtype) if mode == "noise" else None
    rng = torch.tensor([2**40 + 5, 3, 11], device=DEV) if mode == "rng" else None
    clip = mode != "none"
    hist_ref = hist.double()
    out, x0 = _sample_step(backend, x, eps, table, step, hist if mode != "none" else None, noise, rng, clip)
    ref, x0_ref = reference.sample_step_ref(x.double(), eps.double(), table, step,
                                            hist_ref if mode != "none" else None,
                                            None if noise is None else noise.double(), rng, clip)
    assert out.dtype == dtype and out.shape == x.shape and x0.dtype == dtype
    assert_close_rel(out, ref, dtype, f"x_next (K={k}, step {int(step)})")
    assert_close_rel(x0, x0_ref, dtype, "x0_hat")
    if mode != "none":      # the step's own prediction went into slot step mod (K + 1), the rest untouched
        slot = int(step) % (k + 1)
        assert_close_rel(hist[slot], hist_ref[slot], dtype, "history slot written")
        others = [j for j in range(k + 1) if j != slot]
        assert torch.equal(hist[others].double(), hist_ref[others])


def test_sample_step_fp32_close_to_fp32_reference_and_poisoned(monkeypatch):
    monkeypatch.setattr(kd, "POISON", True)
    table = _sampler_table()
    x, eps = (_rand((4, 2, 3, 3), torch.float32) for _ in range(2))
    hist = _ring(3, (4, 2, 3, 3), torch.float32)
    hist_ref = hist.clone()
    rng = torch.tensor([9, 1, 0], device=DEV)
    for step in range(5):
        s = torch.tensor([step], device=DEV)
        out, x0 = kd.sample_step_fwd(x, eps, table, s, hist, None, rng, True, True)
        ref, x0_ref = reference.sample_step_ref(x, eps, table, s, hist_ref, None, rng, True)
        assert torch.isfinite(out).all() and torch.isfinite(x0).all()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x0, x0_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(hist, hist_ref, rtol=1e-5, atol=1e-5)
    out, x0 = kd.sample_step_fwd(x, eps, table, s, None, None, None, False, False)
    assert torch.isfinite(out).all() and x0.numel() == 0


def test_sample_step_twice_gives_the_same_result():
    """The slot written is never read in the same step: a step run twice (e.g. a
    dispatch check beside the real call) leaves the same outputs and ring."""
    table, step = _sampler_table(), torch.tensor([3], device=DEV)
    x, eps = (_rand((2, 3, 4), torch.float32) for _ in range(2))
    for backend in ("reference", "triton"):
        for k in (1, 4):
            hist = _ring(k, (2, 3, 4), torch.float32)
            first = _sample_step(backend, x, eps, table, step, hist)[0]
            ring = hist.clone()
            assert torch.equal(_sample_step(backend, x, eps, table, step, hist)[0], first)
            assert torch.equal(hist, ring)


def test_philox_reference_known_answers():
    """Random123's known-answer vectors for Philox-4x32-10."""
    def words(key, *ctr):
        return [int(w) for w in reference.philox4x32_ref(torch.tensor(key), *(torch.tensor(c) for c in ctr))]
    assert words(0, 0, 0, 0, 0) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert words(-1, *[0xFFFFFFFF] * 4) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert words(0xA4093822 | (0x299F31D0 << 32), 0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def _kernel_noise(rng, shape):
    """z drawn by the sampler-step kernel: a table row that returns sigma * z with sigma = 1."""
    table = torch.tensor([[1.0] + [0.0] * 9 + [1.0]], dtype=torch.float64, device=DEV)
    x = torch.zeros(shape, device=DEV)
    return _sample_step("triton", x, x, table, torch.zeros(1, dtype=torch.int64, device=DEV), rng=rng)[0]


def test_triton_noise_is_the_reference_philox_stream():
    shape = (5, 3, 4, 4)
    for state in ([123, 1, 0], [2**62 + 17, 2**33 + 4, 2**31 + 3]):
        rng = torch.tensor(state, device=DEV)
        torch.testing.assert_close(_kernel_noise(rng, shape), reference.philox_normal_ref(rng, shape),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", ["reference", "triton"])
def test_philox_noise_statistics_and_streams(source):
    draw = (lambda r, s: reference.philox_normal_ref(r, s)) if source == "reference" else _kernel_noise
    shape = (16, 2, 16, 16)   # 8192 normals
    z = draw(torch.tensor([2024, 1, 0], device=DEV), shape).double()
    f = z.flatten()
    assert abs(f.mean().item()) < 0.05 and abs(f.std().item() - 1.0) < 0.04
    assert abs((f ** 3).mean().item()) < 0.15 and abs((f ** 4).mean().item() - 3.0) < 0.3
    assert 0.64 < (f.abs() < 1).double().mean().item() < 0.72   # P(|z| < 1) = 0.683
    for other in ([2025, 1, 0], [2024, 2, 0], [2024, 1, 16]):   # key, offset, sample index
        o = draw(torch.tensor(other, device=DEV), shape).double().flatten()
        assert abs(torch.corrcoef(torch.stack([o, f]))[0, 1]) < 0.1 and (o - f).abs().mean() > 0.5
    # a sample's noise depends on its index, not on the batch it is drawn in
    shifted = draw(torch.tensor([2024, 1, 3], device=DEV), (4, 2, 16, 16)).double()
    assert torch.equal(shifted, z[3:7])


def test_sample_step_bad_input():
    x = _rand((2, 3), torch.float32)
    table, step, rng = _sampler_table(), torch.tensor([1], device=DEV), torch.tensor([1, 0, 0], device=DEV)
    ring = _ring(2, (2, 3), torch.float32)
    cases = [
        (dict(table=table[:, :5]), ValueError, r"\(S, 11\)"),
        (dict(table=table[0]), ValueError, r"\(S, 11\)"),
        (dict(table=table.long()), TypeError, "table must be"),
        (dict(step=step.int()), TypeError, "step must be an int64"),
        (dict(step=torch.tensor([1, 2], device=DEV)), TypeError, "step must be"),
        (dict(step=torch.tensor([5], device=DEV)), ValueError, r"step must lie in \[0, 4\]"),
        (dict(step=torch.tensor([-1], device=DEV)), ValueError, "step must lie"),
        (dict(rng=rng[:2]), TypeError, "rng must be"),
        (dict(noise=x), ValueError, "not both"),
        (dict(eps=x[:1]), ValueError, "shape"),
        (dict(hist=ring.half()), TypeError, "history has dtype"),
        (dict(hist=x), ValueError, "history must be a ring"),
        (dict(hist=ring[:1]), ValueError, r"K in \[1, 4\]"),
        (dict(hist=_ring(5, (2, 3), torch.float32)), ValueError, r"K in \[1, 4\]"),
        (dict(hist=ring[:, :1]), ValueError, "history must be a ring"),
        (dict(hist=ring.transpose(1, 2).contiguous().transpose(1, 2)), ValueError, "contiguous"),
        (dict(eps=x.long()), TypeError, "eps must be"),
    ]
    for kw, exc, match in cases:
        args = dict(x=x, eps=x, table=table, step=step, hist=None, noise=None, rng=rng)
        args.update(kw)
        for backend in ("reference", "triton"):
            with ops.use_backend(backend), pytest.raises(exc, match=match):
                ops.sample_step(args["x"], args["eps"], args["table"], args["step"], args["hist"], args["noise"],
                                rng=args["rng"])


def test_sample_step_opcheck():
    table, step = _sampler_table(), torch.tensor([2])
    x, eps, z = (_rand((2, 2, 3, 3), torch.float32) for _ in range(3))
    rng = torch.tensor([5, 1, 0])
    for args in ((x, eps, table, step, _ring(3, x.shape, x.dtype), None, rng, True, True),
                 (x, eps.half(), table, step, None, z, None, False, False),
                 (x, eps, table, step, _ring(1, x.shape, x.dtype), None, None, True, False)):
        torch.library.opcheck(torch.ops.fastddpm.sample_step.default, args)


_COMPILE_SCRIPT = """
from fastddpm.kernels import diffusion as k
from fastddpm.kernels._util import compile_ptx
tab = "*fp64"
sig = dict(X0="*bf16", Noise="*bf16", T="*i64", SqrtAbar=tab, SqrtOneMinusAbar=tab, Out="*bf16",
           EpsHat="*bf16", Partial="*fp32", Grad="*bf16", grad_scale="fp32",
           Xt="*fp32", Eps="*fp32", SqrtRecipAbar=tab, SqrtRecipm1Abar=tab, Coef1=tab, Coef2=tab, LogVar=tab,
           seed="i64", offset_hi="i64", Hist="*fp32", Table=tab, Step="*i64", Rng="*i64", X0Out="*fp32")
assert "ld.global" in compile_ptx(k._q_sample_fwd_kernel, sig, dict(BLOCK=1024, D=1))
assert "ld.global" in compile_ptx(k._simple_loss_fwd_kernel, sig, dict(WRITE_GRAD=True, BLOCK=4096))
for noise in (True, False):   # ints equal to 1 are specialised to constants by the JIT
    c = dict(CLIP=True, HAS_NOISE=noise, BLOCK=1024, offset_lo=1, b_first=0, num_steps=1)
    assert "ld.global" in compile_ptx(k._p_sample_step_fwd_kernel, sig, c)
sig["Eps"] = "*bf16"
for noise, hist in ((0, 0), (1, 1), (2, 4), (0, 3)):
    c = dict(CLIP=True, HIST=hist, NOISE=noise, WRITE_X0=noise == 2, BLOCK=1024, b_first=0)
    assert "ld.global" in compile_ptx(k._sample_step_fwd_kernel, sig, c)
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """The interpreter runs kernels as numpy; compile them for an H100 (sm_90, no GPU
    needed) so that compiler-only errors show up on the CPU too."""
    run_sm90_compile_check(_COMPILE_SCRIPT)


# ----------------------------------------------------------------------------- GPU, real shapes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_q_sample_and_loss_real_shape(dtype):
    tabs = _tables(device="cuda")
    x0, noise, eps_hat = (_rand((128, 3, 32, 32), dtype, "cuda") for _ in range(3))
    t = _t(128, "cuda")
    out = ops.q_sample(x0, t, noise, tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"])
    ref = reference.q_sample_ref(x0.double(), t, noise.double(), tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"])
    assert_close_rel(out, ref, dtype)
    e = eps_hat.clone().requires_grad_()
    with ops.use_backend("triton"):
        loss = ops.simple_loss(e, noise)
    (g,) = torch.autograd.grad(loss, e)
    er = eps_hat.double().requires_grad_()
    ref_loss = reference.simple_loss_ref(er, noise.double())
    (g_ref,) = torch.autograd.grad(ref_loss, er)
    assert_close_rel(loss, ref_loss, torch.float32, tol=1e-6)
    assert_close_rel(g, g_ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_sampler_step_real_shape(dtype):
    tabs = _tables(device="cuda")
    x, eps, z = (_rand((1024, 3, 32, 32), dtype, "cuda") for _ in range(3))
    t = _t(1024, "cuda")
    out = _step("triton", x, t, eps, tabs, z)
    ref = reference.p_sample_step_ref(x.double(), t, eps.double(), *_step_tables(tabs), z.double())
    assert_close_rel(out, ref, dtype)
    zs = _seeded_noise_of("triton", x.float(), t, eps.float(), tabs, seed=3)[0][t > 0].double()
    assert abs(zs.mean().item()) < 0.01 and abs(zs.std().item() - 1) < 0.01


@pytest.mark.gpu
def test_gpu_cuda_graph_sampler_loop():
    """A few seeded sampler steps captured in one CUDA graph, t updated in place on
    the device: replays equal the eager loop, and each step draws new noise."""
    tabs = _tables(torch.float32, device="cuda")
    st = _step_tables(tabs)
    B = 16
    x_buf = torch.randn(B, 3, 8, 8, device="cuda")
    eps_buf = torch.randn_like(x_buf)
    t_buf = torch.full((B,), T_STEPS - 1, device="cuda")
    start = x_buf.clone()

    def run_steps(n):
        x = x_buf
        for _ in range(n):
            with ops.use_backend("triton"):
                x = ops.p_sample_step(x, t_buf, eps_buf, *st, seed=123)
            t_buf.sub_(1)
        return x

    graph, out = capture_cuda_graph(lambda: run_steps(3), warmup=1)
    t_buf.fill_(T_STEPS - 1)
    x_buf.copy_(start)
    graph.replay()
    torch.cuda.synchronize()
    replayed = out.clone()
    assert int(t_buf[0]) == T_STEPS - 4
    t_buf.fill_(T_STEPS - 1)
    x_buf.copy_(start)
    eager = run_steps(3)
    assert torch.equal(replayed, eager)
    # the training pieces (q_sample, loss) capture too
    x0 = torch.randn_like(x_buf)

    def train_pieces():
        with ops.use_backend("triton"):
            xt = ops.q_sample(x0, t_buf, eps_buf, tabs["sqrt_abar"], tabs["sqrt_one_minus_abar"])
            return ops.simple_loss(xt, eps_buf)

    g2, loss = capture_cuda_graph(train_pieces, warmup=1)
    g2.replay()
    torch.cuda.synchronize()
    ref = reference.simple_loss_ref(
        reference.q_sample_ref(x0.double(), t_buf, eps_buf.double(), tabs["sqrt_abar"],
                               tabs["sqrt_one_minus_abar"]), eps_buf.double())
    assert rel_err(loss, ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_sample_step_real_shape(dtype):
    table = _sampler_table(device="cuda")
    x, ring = _rand((1024, 3, 32, 32), dtype, "cuda"), _ring(3, (1024, 3, 32, 32), dtype).cuda()
    eps = _rand((1024, 3, 32, 32), torch.bfloat16, "cuda")
    rng = torch.tensor([77, 5, 0], device="cuda")
    step = torch.tensor([3], device="cuda")
    ring_ref = ring.double()
    out, x0 = _sample_step("triton", x, eps, table, step, ring, rng=rng)
    ref, x0_ref = reference.sample_step_ref(x.double(), eps.double(), table, step, ring_ref, None, rng)
    assert_close_rel(out, ref, dtype)
    assert_close_rel(x0, x0_ref, dtype)
    assert_close_rel(ring, ring_ref, dtype, "history")
    z = _kernel_noise(rng, (1024, 3, 32, 32))
    torch.testing.assert_close(z, reference.philox_normal_ref(rng, z.shape), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_sample_step_graph_replays_draw_fresh_noise():
    """rng advanced inside the graph: every replay draws the next offset's noise,
    exactly reference.philox_normal_ref's; the step row is read on the device too."""
    table = torch.tensor([[1.0] + [0.0] * 9 + [1.0], [1.0] + [0.0] * 9 + [2.0]], dtype=torch.float64, device="cuda")
    x = torch.zeros(8, 3, 4, 4, device="cuda")
    step = torch.zeros(1, dtype=torch.int64, device="cuda")
    rng = torch.tensor([99, 1, 0], device="cuda")

    def one():
        with ops.use_backend("triton"):
            out, _ = ops.sample_step(x, x, table, step, rng=rng, check_range=False)
        step.add_(1)
        rng[1:2].add_(1)
        return out

    graph, out = capture_cuda_graph(one, warmup=1)
    step.zero_()
    rng.copy_(torch.tensor([99, 1, 0]))
    seen = []
    for k in range(2):
        graph.replay()
        torch.cuda.synchronize()
        seen.append(out.clone())
        expect = (k + 1) * reference.philox_normal_ref(torch.tensor([99, k + 1, 0], device="cuda"), x.shape)
        torch.testing.assert_close(seen[-1], expect, rtol=1e-5, atol=1e-5)
    assert (seen[0] * 2 - seen[1]).abs().mean() > 0.5
    assert int(step) == 2 and int(rng[1]) == 3


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sample_step_empty_batch_with_rng(backend):
    """An empty batch with in-kernel noise raised IndexError (x_t[0]) instead of
    returning empty outputs, as it does with given noise."""
    x = torch.empty(0, 2, 3, 3, device=DEV)
    rng = torch.tensor([1, 1, 0], device=DEV)
    out, x0 = _sample_step(backend, x, x, _sampler_table(), torch.tensor([1], device=DEV), rng=rng)
    assert out.shape == x.shape and x0.shape == x.shape


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gpu_seeded_step_has_no_host_sync(backend):
    """p_sample_step(seed=...) draws its noise on the device on every backend."""
    tabs = _tables(device="cuda")
    x, eps = _rand((4, 3, 8, 8), torch.float32, "cuda"), _rand((4, 3, 8, 8), torch.float32, "cuda")
    t = torch.tensor([1, 5, 9, 0], device="cuda")
    with ops.use_backend(backend):
        first = ops.p_sample_step(x, t, eps, *_step_tables(tabs), seed=7, offset=3, check_range=False)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            again = ops.p_sample_step(x, t, eps, *_step_tables(tabs), seed=7, offset=3, check_range=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(first, again)
