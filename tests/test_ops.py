"""The ops layer: backend switch, the C++ op, input checks."""
import os

import pytest
import torch

import fastddpm
import fastddpm.ops as ops
from fastddpm import reference
from _util import assert_close_rel


def test_available_backends_reports_reasons(monkeypatch):
    av = ops.available_backends("cpu")
    assert av["reference"] is None
    assert set(av) == {"reference", "triton", "cpp"}
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in ops.available_backends("cpu")["triton"]
    assert "CPU kernels only" in ops.available_backends("meta")["cpp"]


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    from fastddpm.ops import _backend
    monkeypatch.setitem(_backend._impls, "_probe", {"reference": lambda x: "ref", "triton": lambda x: "tri"})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    assert _backend.pick("_probe", cpu)(0) == "ref"  # auto never picks the interpreter
    with ops.use_backend("triton"):
        with pytest.raises(RuntimeError, match="forced for _probe.*TRITON_INTERPRET"):
            _backend.pick("_probe", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with ops.use_backend("triton"):
        assert _backend.pick("_probe", cpu)(0) == "tri"
    with ops.use_backend("cpp"):  # an op without that backend runs its reference
        assert _backend.pick("_probe", cpu)(0) == "ref"
    with pytest.raises(ValueError, match="not one of"):
        with ops.use_backend("cuda"):
            pass


def test_use_backend_nests_and_restores():
    assert ops.current_backend() == os.environ.get("FASTDDPM_BACKEND", "auto")
    with ops.use_backend("reference"):
        with ops.use_backend("cpp"):
            assert ops.current_backend() == "cpp"
        assert ops.current_backend() == "reference"


@pytest.mark.skipif(not fastddpm.has_extension(), reason=f"no C++ extension: {fastddpm.extension_error()}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cpp_q_sample_matches_reference(dtype):
    x0 = torch.randn(5, 3, 7, 7).to(dtype)
    noise = torch.randn_like(x0)
    t = torch.randint(0, 50, (5,))
    a, s = torch.rand(50, dtype=torch.float64), torch.rand(50, dtype=torch.float64)
    out = torch.ops.fastddpm_cpp.q_sample(x0, t, noise, a, s)
    ref = reference.q_sample_ref(x0.double(), t, noise.double(), a, s)
    assert_close_rel(out, ref, dtype)    # float64 in, float64 arithmetic out: float64's tolerance
    with ops.use_backend("cpp"):
        assert torch.equal(ops.q_sample(x0, t, noise, a, s), out)
    torch.library.opcheck(torch.ops.fastddpm_cpp.q_sample, (x0, t, noise, a, s))


@pytest.mark.skipif(not fastddpm.has_extension(), reason="no C++ extension")
def test_cpp_q_sample_refuses_bad_t():
    x0 = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.fastddpm_cpp.q_sample(x0, torch.tensor([0, 9]), x0, torch.ones(5), torch.ones(5))


def test_group_norm_checks():
    x = torch.randn(2, 6, 3, 3)
    with pytest.raises(ValueError, match="not divisible by num_groups 4"):
        ops.group_norm(x, 4)
    with pytest.raises(ValueError, match=r"weight must have shape \(6,\)"):
        ops.group_norm(x, 3, torch.ones(5))
    with pytest.raises(ValueError, match="act must be"):
        ops.group_norm(x, 3, act="relu")
    with pytest.raises(TypeError, match="float16"):
        ops.group_norm(x.int(), 3)


def test_attention_checks():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="k has shape"):
        ops.attention(q, torch.randn(1, 1, 5, 8), q)
    with pytest.raises(ValueError, match=r"\(B, heads, L, d\)"):
        ops.attention(q[0], q[0], q[0])
