"""The dispatch's first-use checks (fastddpm/ops/_backend.py): a fast path runs
under "auto" only after it matched the reference at that key; a broken one costs
one line on stderr and the reference's answer, for good (persisted per versions
and device), a slower one is dropped where timed. Broken implementations are
registered through the real registry (_backend.register) on the CPU's "cpp"
backend, which auto considers first there."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fastddpm
import fastddpm.ops as ops
from fastddpm import reference
from fastddpm.ops import _backend, _decisions, _replay, _verify
from _util import fresh_seed, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
needs_cpp = pytest.mark.skipif(not fastddpm.has_extension(), reason=f"no C++ extension: {fastddpm.extension_error()}")


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache folder and no decisions in memory; auto + verify; the registry restorable."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FASTDDPM_CACHE_DIR", str(cache))
    for name in ("_decided", "_checked", "_reasons", "_pending"):
        monkeypatch.setattr(_backend, name, {})
    monkeypatch.setattr(_backend, "_replays", dict(_backend._replays))
    monkeypatch.setattr(_backend, "_impls", {op: dict(impls) for op, impls in _backend._impls.items()})
    monkeypatch.setattr(_decisions, "_loaded", None)
    monkeypatch.setattr(_backend, "_mode", "verify")
    monkeypatch.setattr(_backend, "_forced", "auto")
    return cache


def _counted(fn, counts, name):
    def wrapped(*args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return fn(*args, **kwargs)
    return wrapped


def _q_inputs(B=4):
    x0 = torch.randn(B, 3, 8, 8)
    return x0, torch.randint(0, 10, (B,)), torch.randn_like(x0), torch.rand(10) + 0.1, torch.rand(10) + 0.1


def _stderr_lines(capsys):
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


# ----------------------------------------------------------------------------- broken fast paths


@needs_cpp
def test_wrong_op_answers_with_the_reference_once_and_for_all(fresh, capsys):
    counts = {}
    _backend.register("q_sample", "cpp", _counted(lambda *a: reference.q_sample_ref(*a) * 1.5, counts, "wrong"))
    args = _q_inputs()
    ref = reference.q_sample_ref(*args)
    for _ in range(3):
        assert torch.equal(ops.q_sample(*args), ref)
    assert counts == {"wrong": 1}   # checked once, never run again at that key
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and "q_sample (cpp)" in lines[0] and "mismatch: relative error" in lines[0], lines
    report = ops.dispatch_report()
    assert "| reference | q_sample cpp fwd (test_dispatch." in report and "mismatch" in report
    # another shape class is another key: checked again
    ops.q_sample(*_q_inputs(B=32))
    assert counts == {"wrong": 2}


@needs_cpp
def test_op_that_raises_answers_with_the_reference(fresh, capsys):
    def boom(*args):
        raise RuntimeError("launch failed\nsecond line")
    _backend.register("simple_loss", "cpp", boom)
    eps, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    assert torch.equal(ops.simple_loss(eps, noise), reference.simple_loss_ref(eps, noise))
    assert torch.equal(ops.simple_loss(eps, noise), reference.simple_loss_ref(eps, noise))
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and "error: RuntimeError: launch failed;" in lines[0], lines


def _ring_step_inputs():
    from fastddpm.sampling import make_plan
    plan = make_plan(fastddpm.GaussianDiffusion.linear(T=50), "dpmpp3m", steps=6)
    x, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    ring = torch.randn(plan.history + 1, 2, 3, 8, 8)   # earlier steps' predictions
    return (x, eps, plan.table, torch.tensor([3])), ring


@needs_cpp
@pytest.mark.parametrize("broken", [True, False], ids=["wrong-ring", "correct"])
def test_what_an_op_writes_in_place_is_checked_too(fresh, capsys, broken):
    # sample_step writes this step's prediction into the history ring: an
    # implementation with the right output but a wrong ring would spoil every
    # later step, so the ring is compared as well, and keeps one side's writes
    real = _backend._impls["sample_step"]["cpp"]

    def wrong_ring(x, eps, table, step, history, *rest):
        out = real(x, eps, table, step, history, *rest)
        history.index_add_(0, step % history.shape[0], torch.ones_like(history[:1]))
        return out
    _backend.register("sample_step", "cpp", wrong_ring if broken else real)
    args, ring0 = _ring_step_inputs()
    want_ring = ring0.clone()
    want, _ = reference.sample_step_ref(*args, want_ring)
    ring = ring0.clone()
    out, _ = ops.sample_step(*args, ring)
    assert rel_err(out, want) < 1e-5 and rel_err(ring, want_ring) < 1e-5
    lines = _stderr_lines(capsys)
    if broken:
        assert len(lines) == 1 and "sample_step (cpp)" in lines[0] and "mismatch" in lines[0], lines
        assert torch.equal(ring, want_ring)   # the reference's writes, as if it alone had run
    else:
        assert lines == [] and set(_backend._decided.values()) == {"cpp"}
        cpp_ring = ring0.clone()
        real(*args, cpp_ring, None, None, True, False)
        assert torch.equal(ring, cpp_ring)    # the verified fast path's own writes are kept


@needs_cpp
def test_an_ill_conditioned_in_place_write_is_not_called_a_mismatch(fresh, capsys):
    # the paper's first step (t = 999): x_t ~ eps, so x0_hat = 157 x - 157 eps cancels and
    # two correct float32 computations of the ring's x0_hat differ by ~5e-5 relative
    from fastddpm.sampling import make_plan
    d = fastddpm.GaussianDiffusion.linear(T=1000)
    plan = make_plan(d, "unipc", steps=10)
    abar = float(d.alphas_cumprod[plan.timesteps[0]])
    x0, eps = 0.35 * torch.randn(64, 3, 8, 8), torch.randn(64, 3, 8, 8)
    x = (abar ** 0.5 * x0 + (1 - abar) ** 0.5 * eps).float()
    ring = torch.zeros(plan.history + 1, *x.shape)
    want, _ = reference.sample_step_ref(x.double(), eps.double(), plan.table, torch.tensor([0]), ring.double())
    out, _ = ops.sample_step(x, eps, plan.table, torch.tensor([0]), ring)
    assert _stderr_lines(capsys) == [] and set(_backend._decided.values()) == {"cpp"}
    assert rel_err(out, want) < 1e-5


class _TripleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return 3 * g


@needs_cpp
def test_op_wrong_only_in_its_backward_is_caught_at_the_first_backward(fresh, capsys):
    counts = {}

    def wrong_grad(x, *args):
        return reference.group_norm_ref(_TripleGrad.apply(x), *args)
    _backend.register("group_norm", "cpp", _counted(wrong_grad, counts, "wrong"))
    seed = fresh_seed()
    x = torch.randn(2, 8, 8, 8, requires_grad=True)   # 64 positions per channel: auto asks C++
    w = torch.randn(8, requires_grad=True)
    g = torch.randn(2, 8, 8, 8)
    y = ops.group_norm(x, 4, w, None, act="silu")
    y2 = ops.group_norm(x, 4, w, None, act="silu")   # same key, no backward checked yet: checked too
    assert counts == {"wrong": 2}
    (y * g).sum().backward(retain_graph=True)
    (y2 * g).sum().backward()
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    (reference.group_norm_ref(xr, 4, wr, None, 1e-6, "silu") * g).sum().backward()
    assert rel_err(x.grad, 2 * xr.grad) < 1e-6, f"seed {seed}"   # both backward passes: the reference's
    assert rel_err(w.grad, 2 * wr.grad) < 1e-6, f"seed {seed}"
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and "backward mismatch" in lines[0], lines
    ops.group_norm(x, 4, w, None, act="silu")
    assert counts == {"wrong": 2}


@needs_cpp
def test_a_wrong_decision_persists_across_processes(fresh):
    script = """
import json, torch
import fastddpm.ops as ops
from fastddpm import reference
from fastddpm.ops import _backend
calls = [0]
def wrong(*a):
    calls[0] += 1
    return reference.q_sample_ref(*a) + 1.0
_backend.register("q_sample", "cpp", wrong)
torch.manual_seed(0)
x0 = torch.randn(4, 3, 8, 8); noise = torch.randn_like(x0); t = torch.randint(0, 10, (4,))
a, s = torch.rand(10), torch.rand(10)
ok = all(torch.equal(ops.q_sample(x0, t, noise, a, s), reference.q_sample_ref(x0, t, noise, a, s)) for _ in range(2))
print(json.dumps({"calls": calls[0], "ok": ok}))
"""
    env = dict(os.environ, FASTDDPM_CACHE_DIR=str(fresh), PYTHONPATH=ROOT)
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    outs = [json.loads(r.stdout.strip().splitlines()[-1]) for r in runs]
    assert outs[0] == {"calls": 1, "ok": True} and outs[1] == {"calls": 0, "ok": True}, runs[1].stderr
    assert runs[0].stderr.count("failed its first-use check") == 1 and runs[1].stderr == "", runs[0].stderr


# ----------------------------------------------------------------------------- random streams


@needs_cpp
def test_check_of_a_noise_drawing_op_leaves_the_user_stream_as_one_call(fresh, monkeypatch):
    monkeypatch.setitem(_backend.CPU_AUTO_CPP, "_noisy", None)
    _backend.register("_noisy", "reference", lambda x: x + torch.randn(x.shape))
    _backend.register("_noisy", "cpp", lambda x: torch.randn(x.shape).add_(x))
    x = torch.randn(3, 5)
    torch.manual_seed(7)
    out, after = _backend.call("_noisy", CPU, x), torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(out, x + torch.randn(x.shape)) and torch.equal(after, torch.rand(4))
    assert "verified" in _backend._reasons[next(iter(_backend._decided))]


@needs_cpp
def test_cpp_dropout_is_checked_with_its_own_mask_and_stream(fresh, capsys):
    x = torch.randn(2, 8, 8, 8)
    torch.manual_seed(3)
    y, after = ops.group_norm(x, 4, act="silu", dropout=0.3), torch.rand(4)
    torch.manual_seed(3)
    with ops.use_backend("cpp"):
        y_cpp = ops.group_norm(x, 4, act="silu", dropout=0.3)
    assert torch.equal(y, y_cpp) and torch.equal(after, torch.rand(4))
    assert _stderr_lines(capsys) == [] and set(_backend._decided.values()) == {"cpp"}


def test_triton_replays_reproduce_the_kernels_random_streams():
    pytest.importorskip("triton")
    seed = fresh_seed()
    x = torch.randn(2, 8, 5, 3)
    torch.manual_seed(seed)
    with ops.use_backend("triton"):
        y = ops.group_norm(x, 4, act="silu", dropout=0.4)
    torch.manual_seed(seed)
    assert rel_err(y, _replay.group_norm_triton(x, 4, None, None, 1e-6, "silu", None, 0.4)) < 1e-5, f"seed {seed}"
    d = fastddpm.GaussianDiffusion.linear(T=10)
    xt, eps, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([0, 4, 9])
    tables = (d.sqrt_recip_alphas_cumprod, d.sqrt_recipm1_alphas_cumprod, d.posterior_mean_coef1,
              d.posterior_mean_coef2, d.posterior_log_variance_clipped)
    tables = tuple(tb.float() for tb in tables)
    # the seeded step needs no replay: its reference draws the kernel's own Philox normals
    with ops.use_backend("triton"):
        z = ops.p_sample_step(xt, t, eps, *tables, seed=seed, offset=2**63 + 5)
    with ops.use_backend("reference"):
        r = ops.p_sample_step(xt, t, eps, *tables, seed=seed, offset=2**63 + 5)
    assert rel_err(z, r) < 1e-5, f"seed {seed}"


# ----------------------------------------------------------------------------- correct fast paths


@needs_cpp
def test_correct_cpp_op_is_checked_once_then_runs_alone(fresh, capsys):
    counts = {}
    impls = _backend._impls["q_sample"]
    impls["reference"] = _counted(impls["reference"], counts, "reference")
    impls["cpp"] = _counted(impls["cpp"], counts, "cpp")
    args = _q_inputs()
    outs = [ops.q_sample(*args) for _ in range(5)]
    assert counts == {"reference": 1, "cpp": 5}
    assert all(torch.equal(o, outs[0]) for o in outs) and rel_err(outs[0], reference.q_sample_ref(*args)) < 1e-6
    assert _stderr_lines(capsys) == []
    (key, backend), = _backend._decided.items()
    assert backend == "cpp" and _backend._reasons[key].startswith("verified (rel err")
    # the next process reads the decision: no check
    _decisions.forget()
    for name in ("_decided", "_checked", "_reasons"):
        getattr(_backend, name).clear()
    ops.q_sample(*args)
    assert counts == {"reference": 1, "cpp": 6}
    # an implementation registered after the decision (a fix, a test's spy) is checked anew
    _backend.register("q_sample", "cpp", lambda *a: reference.q_sample_ref(*a) * 3)
    assert torch.equal(ops.q_sample(*args), reference.q_sample_ref(*args))
    assert "mismatch" in _stderr_lines(capsys)[0]


@needs_cpp
def test_no_check_under_torch_compile_once_a_decision_exists(fresh):
    counts = {}
    x = torch.randn(2, 8, 8, 8)
    impls = _backend._impls["group_norm"]
    impls["reference"] = _counted(impls["reference"], counts, "reference")
    impls["cpp"] = _counted(impls["cpp"], counts, "cpp")
    ops.group_norm(x, 4, act="silu")   # eager: the check
    assert counts == {"reference": 1, "cpp": 1}
    counts.clear()
    checks = {}
    first_use = _backend._first_use
    _backend._first_use = _counted(first_use, checks, "checks")
    try:
        torch._dynamo.reset()
        f = torch.compile(lambda v: ops.group_norm(v, 4, act="silu") * 2, fullgraph=True, backend="aot_eager")
        y = f(x)
        assert checks == {} and counts == {"cpp": 1}   # the recorded decision, traced once
        assert torch.equal(y, 2 * ops.group_norm(x, 4, act="silu"))
        y = f(torch.randn(1, 8, 16, 16))   # no decision at this key: the reference, no check
        assert checks == {} and counts.get("reference") == 1
    finally:
        _backend._first_use = first_use
        torch._dynamo.reset()
    assert len(_backend._decided) == 1


# ----------------------------------------------------------------------------- whole runs


def _break_every_cpp_op():
    def broken(op):
        ref = _backend._impls[op]["reference"]

        def wrong(*args):
            out = ref(*args)
            return tuple(o if o is None else o * 1.01 for o in out) if isinstance(out, tuple) else out * 1.01
        return wrong
    for op in [op for op, impls in _backend._impls.items() if "cpp" in impls]:
        _backend.register(op, "cpp", broken(op))
        _backend._replays.pop((op, "cpp"), None)


@needs_cpp
def test_training_with_broken_ops_ends_with_the_references_weights(fresh, monkeypatch, tmp_path, capsys):
    from fastddpm.train import Trainer, config_from_args
    from test_train import TINY

    def run(out):
        # fp32: the tiny preset trains in bf16 where the CPU has it, and there the weights
        # after a rejected fast path equal the reference mode's only to bf16 rounding
        cfg, _, _ = config_from_args(TINY + ["--out", str(tmp_path / out), "--steps", "3", "--precision", "fp32"])
        tr = Trainer(cfg, log=lambda *a: None)
        batch = torch.from_numpy(tr.dataset.images[:8])
        for s in range(3):
            tr.train_step(batch, *tr.draw(s), 1e-3)
        return tr.params, tr.ema_params
    monkeypatch.setattr(_backend, "_mode", "reference")
    ref_params, ref_ema = run("ref")
    monkeypatch.setattr(_backend, "_mode", "verify")
    _break_every_cpp_op()
    params, ema = run("broken")
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params))
    assert all(torch.equal(a, b) for a, b in zip(ema, ref_ema))
    lines = _stderr_lines(capsys)
    assert lines and len(lines) == len(_backend._decided) and set(_backend._decided.values()) == {"reference"}


@needs_cpp
def test_sampling_with_broken_ops_ends_with_the_references_samples(fresh, monkeypatch, capsys):
    from fastddpm.sampling import sample
    from test_sampling import _model
    model, d = _model(), fastddpm.GaussianDiffusion.linear(T=6)
    monkeypatch.setattr(_backend, "_mode", "reference")
    ref = sample(model, d, 3, seed=3, progress=False)
    monkeypatch.setattr(_backend, "_mode", "verify")
    _break_every_cpp_op()
    out = sample(model, d, 3, seed=3, progress=False)
    assert torch.equal(out, ref)
    assert "sample_step (cpp) failed its first-use check" in capsys.readouterr().err


# ----------------------------------------------------------------------------- modes, timing


@needs_cpp
def test_modes_trust_reference_and_a_forced_backend(fresh, monkeypatch):
    wrong = lambda *a: reference.q_sample_ref(*a) * 2  # noqa: E731
    _backend.register("q_sample", "cpp", wrong)
    args = _q_inputs()
    ref = reference.q_sample_ref(*args)
    monkeypatch.setattr(_backend, "_mode", "trust")
    assert torch.equal(ops.q_sample(*args), 2 * ref)      # today's behaviour: unchecked
    monkeypatch.setattr(_backend, "_mode", "reference")
    assert torch.equal(ops.q_sample(*args), ref)
    monkeypatch.setattr(_backend, "_mode", "verify")
    with ops.use_backend("cpp"):                           # forced: runs as is (the kernel tests rely on it)
        assert torch.equal(ops.q_sample(*args), 2 * ref)
    assert _backend._decided == {}


@needs_cpp
@pytest.mark.parametrize("t_cpp, expect", [(2e-3, "reference"), (0.5e-3, "cpp")])
def test_measured_choice_keeps_the_faster(fresh, monkeypatch, t_cpp, expect):
    """The CUDA measured choice, run on the CPU (measure mode) with a fake timer."""
    timed = []

    def fake(op, backend, run, device):
        run()
        timed.append(backend)
        return {"cpp": t_cpp, "reference": 1e-3}[backend]
    monkeypatch.setattr(_verify, "measure", fake)
    monkeypatch.setattr(_backend, "_mode", "measure")
    x = torch.randn(2, 8, 2, 2, requires_grad=True)   # 4 positions: only measure mode asks C++ here
    g = torch.randn(2, 8, 2, 2)
    (ops.group_norm(x, 4) * g).sum().backward()
    (key, backend), = _backend._decided.items()
    assert backend == expect and sorted(timed) == ["cpp", "reference"]
    reason = _backend._reasons[key]
    assert ("2.00x faster" in reason) if expect == "cpp" else ("slower: 2.00x the reference's time" in reason)
    xr = x.detach().requires_grad_()
    (reference.group_norm_ref(xr, 4) * g).sum().backward()
    assert rel_err(x.grad, xr.grad) < 1e-5


@needs_cpp
def test_measure_mode_times_on_the_host_clock(fresh, monkeypatch):
    monkeypatch.setattr(_backend, "_mode", "measure")
    ops.q_sample(*_q_inputs())
    (key, backend), = _backend._decided.items()
    assert "faster" in _backend._reasons[key] or "slower" in _backend._reasons[key]


@pytest.mark.gpu
def test_cuda_first_use_is_checked_and_timed(fresh):
    """GPU-pending: the real CUDA path (CUDA events) on a Triton op."""
    x = torch.randn(8, 64, 16, 16, device="cuda")
    ops.group_norm(x, 8, act="silu")
    (key, backend), = _backend._decided.items()
    assert key[2].startswith("cuda ") and ("faster" in _backend._reasons[key] or "slower" in _backend._reasons[key])
    g = torch.cuda.CUDAGraph()
    checks = {}
    first_use = _backend._first_use
    _backend._first_use = _counted(first_use, checks, "checks")
    try:
        with torch.cuda.graph(g):
            ops.group_norm(torch.randn(8, 64, 8, 8, device="cuda"), 8)   # a new key inside a capture
    finally:
        _backend._first_use = first_use
    assert checks == {} and len(_backend._decided) == 1


# ----------------------------------------------------------------------------- keys, cache file, report


def test_shape_classes():
    assert [_backend._dim(n) for n in (1, 3, 16)] == [1, 3, 16]
    assert _backend._dim(17) == _backend._dim(31) != _backend._dim(32)
    assert _backend._dim(33) == _backend._dim(63) != _backend._dim(48)
    x = torch.randn(2, 8, 4, 4)
    k = lambda t: _backend._key("group_norm", "cpp", CPU, (t, 4), {})  # noqa: E731
    assert k(x) != k(x.to(memory_format=torch.channels_last)) != k(x.half())
    assert k(x) != k(x.requires_grad_())


@needs_cpp
def test_untrusted_cache_files_are_ignored_silently(fresh, capsys):
    args = _q_inputs()
    ops.q_sample(*args)
    path = _decisions.path()
    good = open(path).read()
    assert json.loads(good)["versions"] == _decisions.versions()
    bad_files = [b"\x00garbage{", b"[1, 2]", json.dumps({"versions": {**_decisions.versions(), "torch": "0.1"},
                                                        "decisions": {}}).encode(),
                 good.replace('"cpp"', '"evil"').encode(), b" " * (_decisions.MAX_BYTES + 1)]
    for content in bad_files:
        with open(path, "wb") as f:
            f.write(content)
        _decisions.forget()
        assert _decisions.lookup(next(iter(_backend._decided))[2], "anything") is None
        assert _decisions.recorded() == {}
    _backend._decided.clear()
    ops.q_sample(*args)                      # checked again, file rewritten whole
    assert json.loads(open(path).read())["versions"] == _decisions.versions()
    assert _stderr_lines(capsys) == [] and sorted(os.listdir(fresh)) == [os.path.basename(path)]
    assert ops.clear_dispatch_cache() == [path] and not os.path.exists(path) and _backend._decided == {}


@needs_cpp
def test_report_dispatch_logs_at_start_and_after_the_first_step(fresh):
    from fastddpm import UNet, UNetConfig
    model = UNet(UNetConfig.tiny(image_size=8, ch=16, ch_mult=(1,), attn_resolutions=(), num_groups=4))
    lines = []
    ops.report_dispatch(model, lines.append)
    assert len(lines) == 1 and lines[0].startswith("dispatch: verify, 0 key(s) decided in this run")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        model(x, t)
        assert len(lines) == 1
        model(x, t)
        model(x, t)
    assert len(lines) == 2 and lines[1].startswith("dispatch after the first step: verify, ")
