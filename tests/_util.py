"""Test helpers: tolerances in one place and the relative-error check."""
import torch

# ||out - ref|| / ||ref|| bounds against a float64 reference, per dtype.
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-2, torch.bfloat16: 1e-2}

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
    """Run `script` (which compiles kernels for an H100 through kernels.compile_ptx
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
