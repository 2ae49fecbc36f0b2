"""Test helpers: tolerances in one place, the relative-error check, seeds,
well-posed GroupNorm inputs, the check that a fast path ran, the
AttentionBlock helpers the attention and conv1x1 tests share, and the exit
status and one-line error checks of the command lines."""
import collections
import contextlib
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ||out - ref|| / ||ref|| bounds against a float64 reference, per dtype. Rounding the
# output alone costs ~u / sqrt(3) in this norm (u = 2^-p, the unit roundoff): fp16
# u = 4.9e-4, bf16 u = 3.9e-3, fp32 u = 6e-8. A bound of ~4u leaves room for rounded
# inputs and fp32 accumulation without hiding a real error: measured fp16 errors are
# <= 4.3e-4 for GroupNorm and ~3e-4 for attention (issue 20), so fp16's former 1e-2
# (bf16's) was 25-40x looser than needed and let a 1e-3 perturbation of a kernel pass.
# float64 results must be float64 arithmetic; fp32 is ~16u (well-posed inputs only:
# see spread_groups).
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}

HAS_CUDA = torch.cuda.is_available()


def rel_err(out, ref):
    """||out - ref|| / ||ref|| computed in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_close_rel(out, ref, dtype, name="output", tol=None):
    tol = REL_TOL[dtype] if tol is None else tol
    err = rel_err(out, ref)
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.1e} ({dtype})"


def run_sm90_compile_check(script):
    """Run `script` (which compiles kernels for an H100 through kernels._util.compile_ptx
    and prints "compiled") in a subprocess without TRITON_INTERPRET, so that
    compiler-only errors show up on a CPU machine too."""
    import os
    import subprocess
    import sys

    import pytest

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and ("ptxas" in r.stderr and "not found" in r.stderr.lower()):
        pytest.skip("no ptxas in this triton install")
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


def capture_cuda_graph(step, warmup=2):
    """Run `step` `warmup` times on a side stream (Triton compilation and
    autotuning must happen outside a capture), then capture one call in a CUDA
    graph. Returns (graph, what the captured call returned)."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def fresh_seed():
    """Draw a seed from torch's generator (which tests/conftest.py seeds per test,
    and reports on failure), reseed torch with it and return it: a value for the
    seed arguments of the ops, reproducible from the test's seed."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    torch.manual_seed(seed)
    return seed


def spread_groups(shape, groups, scale=1.0, shift=0.0, device="cpu"):
    """Random float32 x of `shape` (N, C, *spatial) whose every GroupNorm group is
    well-posed: a group mean ~ N(0, 0.5^2) and a standard deviation drawn from
    [0.5, 1.5], exactly (in float64, before rounding). i.i.d. normals are not: a
    3-element group can come out nearly constant, and then fp32 rounding of
    x - mean (~|mean| / std ulps) is amplified past any fp32 tolerance on every
    backend, torch's own included (issue 20). Then `* scale + shift`."""
    N, C = shape[:2]
    z = torch.randn(shape, dtype=torch.float64, device=device).reshape(N, groups, -1)
    if z.shape[-1] > 1:
        z = z - z.mean(-1, keepdim=True)
        z = z / z.pow(2).mean(-1, keepdim=True).sqrt()
    z = z * (torch.rand(N, groups, 1, dtype=torch.float64, device=device) + 0.5)
    z = z + 0.5 * torch.randn(N, groups, 1, dtype=torch.float64, device=device)
    return (z.reshape(shape) * scale + shift).float()


class _OpLog(TorchDispatchMode):
    """Counts every op dispatched below autograd, by "namespace::name"."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[f"{func.namespace}::{func._opname}"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def expect_ran(*ops):
    """Assert that each op named ("fastddpm::group_norm", "fastddpm_cpp::q_sample",
    ...) ran inside the block, backward included when it runs in the block: the
    fast path under test really ran, a silent fall back to the reference fails.
    Ops are seen at the dispatcher (a TorchDispatchMode), so this holds whatever
    ops/_backend.py does, and sees the C++ autograd's calls too."""
    log = _OpLog()
    with log:
        yield log.counts
    missing = [op for op in ops if not log.counts[op]]
    ran = sorted(k for k in log.counts if not k.startswith("aten::"))
    assert not missing, f"the fast path did not run: {missing} never called (custom ops that ran: {ran})"


def backward_node_names(t):
    """The class name of every autograd node behind t (one entry per node)."""
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def randomised_attention_block(channels, num_heads, num_groups, dtype=torch.float32, device=None):
    """fastddpm.nn.AttentionBlock with every parameter random (the proj starts at zero)."""
    from fastddpm.nn import AttentionBlock
    device = device or ("cuda" if HAS_CUDA else "cpu")
    block = AttentionBlock(channels, num_groups=num_groups, num_heads=num_heads).to(device, dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
    return block


def block_fwd_bwd(block, x, backend, dout):
    """block(x) on `backend`, then backward of dout: (out, dx, {name: parameter
    gradient}, backward_node_names(out))."""
    import fastddpm.ops as ops
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with ops.use_backend(backend):
        out = block(x)
    nodes = backward_node_names(out)
    out.backward(dout)
    return out.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}, nodes


def exit_code(main, args):
    """A CLI main's exit status, also for argparse's own errors (SystemExit)."""
    try:
        return main(args)
    except SystemExit as e:
        return e.code


def one_error_line(err, *words):
    """stderr holds exactly one error line, no traceback, and every one of `words`."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len([ln for ln in lines if "error" in ln]) == 1, err
    for w in words:
        assert w in err, (w, err)
