"""Compile check for an H200/H100 (sm_90) without a GPU (issue 13 item 8).

Every config the autotuner would benchmark, for the CIFAR-10 UNet's shapes,
goes through Triton's backend and its bundled ptxas; asserted:
  * no config needs more shared memory than a block can have (227 KB);
  * the tensor-core configs (bf16 attention and 1x1 conv) spill at most
    SPILL_BOUND bytes per thread, and the GroupNorm configs the pruner keeps
    do not spill;
  * channels_last GroupNorm uses 16-byte vector loads and stores (it did
    ld.global.b16, 2-byte scalars, while C_PER_G was a run-time int).
The launch's 16-byte divisibility hints are modelled per argument: pointers
and the sizes/strides that are multiples of 16 at these shapes, never
C_PER_G (8 here). About 70 compiles, ~0.5 s each.
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest

SMEM_LIMIT = 227 * 1024
# Bytes of spill stores per thread allowed for a tensor-core config. Measured
# (2026-12-01, triton 3.6 ptxas, bf16, d = 256): the dK/dV tiles 0-204, dQ 0-100,
# the forward and every conv1x1 tile 0.
SPILL_BOUND = 256

_SCRIPT = r'''
import contextlib, io, json, re, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
from fastddpm.kernels import attention as ka, conv1x1 as kc, group_norm as kg


_seen = {}


def compile_sm90(kernel, signature, constexprs, num_warps, num_stages, aligned):
    """{shared, spill, ld, st} of one compile; a repeat (same code) is answered from
    memory: Triton's cache would skip ptxas and so its spill report."""
    key = (id(kernel), str(sorted(signature.items())), str(sorted(constexprs.items())), num_warps, num_stages)
    if key not in _seen:
        _seen[key] = _compile_sm90(kernel, signature, constexprs, num_warps, num_stages, aligned)
    return _seen[key]


def _compile_sm90(kernel, signature, constexprs, num_warps, num_stages, aligned):
    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    sig = {a: "constexpr" if a in constexprs else signature.get(a, "i32") for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a in aligned and sig[a] != "constexpr"}
    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1: ptxas -v prints here
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages})
    spill = re.search(r"(\d+) bytes spill stores", log.getvalue())
    ptx = k.asm["ptx"]
    return {"shared": k.metadata.shared, "spill": int(spill.group(1)) if spill else None,
            "ld": sorted(set(re.findall(r"ld\.global[.\w]*", ptx))),
            "st": sorted(set(re.findall(r"st\.global[.\w]*", ptx)))}


def configs_kept(kernel, prune, nargs, **kwargs):
    """The configs the autotuner benchmarks for these arguments (its pruner applied)."""
    return prune(list(kernel.configs), nargs, **kwargs) if prune else list(kernel.configs)


out = []
# ---- attention: the 16x16 blocks (L = 256) and the 4x4 middle block (L = 16), d = C = 256,
# q/k/v/o viewed out of (B, 3C, L) conv outputs (L-contiguous), bf16 and fp32 "ieee"
for dtype, tname, prec in ((torch.bfloat16, "bf16", "tf32"), (torch.float32, "fp32", "ieee")):
    ptrs = {n: f"*{tname}" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    ptrs.update({n: "*fp32" for n in ("LSE", "DELTA", "ROWMAX", "INVSUM")}, qk_scale="fp32", scale="fp32")
    args = ka._attention_bwd_dq_kernel.fn.arg_names + ka._attention_bwd_dkdv_kernel.fn.arg_names
    aligned = set(ptrs) | {"L", "D"} | {n for n in args if n.startswith("stride") and not n.endswith("l")}
    for L in (256, 16):
        q = torch.empty(1, 1, L, 256, dtype=dtype)
        for name, kern, prune in (("fwd", ka._attention_fwd_kernel, ka._prune_fwd),
                                  ("dq", ka._attention_bwd_dq_kernel, ka._prune_dq),
                                  ("dkdv", ka._attention_bwd_dkdv_kernel, ka._prune_dkdv)):
            for c in configs_kept(kern, prune, {"Q": q, "L": L}, BLOCK_D=256, DOT_PRECISION=prec):
                consts = dict(c.kwargs, BLOCK_D=256, DOT_PRECISION=prec, **{f"stride_{t}l": 1 for t in
                              ("q", "k", "v", "o", "do", "dq", "dk", "dv")})
                r = compile_sm90(kern, ptrs, consts, c.num_warps, c.num_stages, aligned)
                out.append(dict(r, kernel=f"attention_{name}", dtype=tname, L=L, tensor_cores=tname == "bf16",
                                config=str(c)))
# ---- conv1x1: the q/k/v projection with the GroupNorm prologue and the out projection with
# the residual, C = 256 at 16x16, contiguous; bf16 (tensor cores) and fp32 "ieee"
for tname, prec in (("bf16", "tf32"), ("fp32", "ieee")):
    ptrs = dict(X=f"*{tname}", W=f"*{tname}", Bias="*fp32", Scale="*fp32", Shift="*fp32", R=f"*{tname}",
                Out=f"*{tname}")
    aligned = set(ptrs) | {"M", "K", "L", "stride_xn", "stride_xk", "stride_wm", "stride_rn", "stride_rm",
                           "stride_on", "stride_om"}
    for prologue, residual in ((True, False), (False, True)):
        for c in configs_kept(kc._conv1x1_fwd_kernel, kc._prune_configs, {}, DOT_PRECISION=prec):
            consts = dict(c.kwargs, HAS_BIAS=True, HAS_PROLOGUE=prologue, HAS_RESIDUAL=residual,
                          DOT_PRECISION=prec, stride_xl=1, stride_wk=1, stride_rl=1, stride_ol=1)
            r = compile_sm90(kc._conv1x1_fwd_kernel, ptrs, consts, c.num_warps, c.num_stages, aligned)
            out.append(dict(r, kernel="conv1x1_fwd", dtype=tname, tensor_cores=tname == "bf16", config=str(c)))
# ---- GroupNorm + SiLU, 32 groups: 256 channels at 16x16
# (8 x 256), 512 at 32x32 (16 x 1024: the 16K one-pass tile); bf16, NCHW and channels_last
ptrs = dict(X="*bf16", Y="*bf16", W="*fp32", B="*fp32", Mean="*fp32", Rstd="*fp32", eps="fp32", numel="fp32",
            DY="*bf16", DX="*bf16", DWp="*fp32", DBp="*fp32", Add="*bf16", DAdd="*fp32", Seed="*i64", p="fp32",
            Scale="*fp32", Shift="*fp32")
aligned = set(ptrs) | {"S", "G", "C", "stride_xn", "stride_yn", "stride_dyn", "stride_dxn", "stride_xc", "stride_yc",
                       "stride_dyc", "stride_dxc", "stride_xs", "stride_ys", "stride_dys", "stride_dxs"}
for cpg, S in ((8, 256), (16, 1024)):
    one, bc, bs = kg._blocks(cpg, S, kg.ONE_PASS_MAX)
    for layout, unit in (("nchw", "s"), ("channels_last", "c")):
        unit_strides = {f"stride_{t}{unit}": 1 for t in ("x", "y", "dy", "dx")}
        flags = dict(HAS_WEIGHT=True, HAS_BIAS=True, ACT_SILU=True, HAS_ADD=False, DROPOUT=False, ONE_PASS=one,
                     BLOCK_C=bc, BLOCK_S=bs, C_PER_G=cpg, **unit_strides)
        for name, kern, extra in (("fwd", kg._group_norm_fwd_kernel, dict(WRITE_Y=True, WRITE_AFFINE=False)),
                                  ("bwd", kg._group_norm_bwd_kernel, dict(WRITE_DB=True))):
            for c in configs_kept(kern, kg._prune_configs, {}, **flags):
                r = compile_sm90(kern, ptrs, dict(flags, **extra), c.num_warps, c.num_stages, aligned)
                out.append(dict(r, kernel=f"group_norm_{name}", dtype="bf16", layout=layout, C_PER_G=cpg, S=S,
                                tensor_cores=False, config=str(c)))
print(json.dumps(out))
print(f"{len(_seen)} compiles", file=sys.stderr)
'''


@pytest.fixture(scope="module")
def compiled():
    import triton
    pytest.importorskip("triton.backends.nvidia")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's bundled ptxas is not there")
    with tempfile.TemporaryDirectory() as cache:   # a fresh cache, so ptxas runs (and reports spills)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1")
        r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _where(r):
    return {k: v for k, v in r.items() if k not in ("ld", "st")}


def test_every_config_compiles_within_the_shared_memory_limit(compiled):
    kernels = {r["kernel"] for r in compiled}
    assert kernels == {"attention_fwd", "attention_dq", "attention_dkdv", "conv1x1_fwd",
                       "group_norm_fwd", "group_norm_bwd"}, kernels
    over = [_where(r) for r in compiled if r["shared"] > SMEM_LIMIT]
    assert not over, f"{len(over)} configs over {SMEM_LIMIT} bytes of shared memory: {over}"


def test_tensor_core_configs_spill_at_most_the_bound(compiled):
    tc = [r for r in compiled if r["tensor_cores"]]
    assert tc and all(r["spill"] is not None for r in tc), "no ptxas spill report (TRITON_DUMP_PTXAS_LOG)"
    over = [_where(r) for r in tc if r["spill"] > SPILL_BOUND]
    assert not over, f"tensor-core configs spilling more than {SPILL_BOUND} bytes per thread: {over}"


def test_group_norm_configs_kept_do_not_spill(compiled):
    spills = [_where(r) for r in compiled if r["kernel"].startswith("group_norm") and r["spill"]]
    assert not spills, f"GroupNorm configs the pruner keeps spill: {spills}"


@pytest.mark.parametrize("kernel", ["group_norm_fwd", "group_norm_bwd"])
def test_group_norm_channels_last_uses_vector_loads(kernel, compiled):
    rows = [r for r in compiled if r["kernel"] == kernel and r["layout"] == "channels_last" and r["C_PER_G"] >= 8]
    assert rows
    for r in rows:
        assert "ld.global.b16" not in r["ld"] and any(".v4." in op or ".v2." in op for op in r["ld"]), _where(r) | r
        assert "st.global.b16" not in r["st"], _where(r) | r
