"""Autotuning policy of the Triton kernels (issue 13): keys name everything that
changes the compiled code, pruners drop configs that cannot win (and never
return nothing), results are cached on disk. CPU only: the pruners and keys are
plain Python; the interpreter itself runs one config."""
import inspect

import pytest
import torch
import triton

from fastddpm.kernels import attention as ka
from fastddpm.kernels import conv1x1 as kc
from fastddpm.kernels import group_norm as kg
from _util import run_sm90_compile_check

AUTOTUNED = {
    "group_norm_fwd": kg._group_norm_fwd_kernel,
    "group_norm_bwd": kg._group_norm_bwd_kernel,
    "attention_fwd": ka._attention_fwd_kernel,
    "attention_bwd_dq": ka._attention_bwd_dq_kernel,
    "attention_bwd_dkdv": ka._attention_bwd_dkdv_kernel,
    "conv1x1_fwd": kc._conv1x1_fwd_kernel,
}


@pytest.mark.parametrize("name", AUTOTUNED)
def test_key_names_every_constexpr_the_configs_do_not_set(name):
    """A constexpr missing from the key (ACT_SILU, HAS_WEIGHT, DOT_PRECISION, ...)
    makes variants with different code share one tuned config."""
    kernel = AUTOTUNED[name]
    tuned = set().union(*(c.kwargs for c in kernel.configs))
    params = inspect.signature(kernel.base_fn).parameters.values()
    constexprs = {p.name for p in params if "constexpr" in str(p.annotation)} - tuned
    assert constexprs <= set(kernel.keys), f"{name}: key {kernel.keys} misses {sorted(constexprs - set(kernel.keys))}"


@pytest.mark.parametrize("name,layout_args", [
    ("group_norm_fwd", {"stride_xs", "stride_ys"}), ("group_norm_bwd", {"stride_xs", "stride_dys", "stride_dxs"}),
    ("attention_fwd", {"stride_qd", "stride_kd", "stride_vd", "stride_od"}),
    ("attention_bwd_dq", {"stride_qd", "stride_dqd"}), ("attention_bwd_dkdv", {"stride_kd", "stride_dkd"}),
    ("conv1x1_fwd", {"stride_xl", "stride_ol"})])
def test_key_names_the_layout(name, layout_args):
    """NCHW and channels_last (or row-major and L-contiguous heads) compile to
    different loads: each layout gets its own tuned config."""
    assert layout_args <= set(AUTOTUNED[name].keys), AUTOTUNED[name].keys


def _gn_configs():
    return [triton.Config({}, num_warps=w) for w in (2, 4, 8, 16)]


def test_group_norm_pruner_drops_spilling_and_idle_warps():
    prune = kg._prune_configs
    big = prune(_gn_configs(), {}, ONE_PASS=True, BLOCK_C=8, BLOCK_S=2048)      # 16K elements on chip
    assert sorted(c.num_warps for c in big) == [8, 16]
    looped = prune(_gn_configs(), {}, ONE_PASS=False, BLOCK_C=16, BLOCK_S=256)  # looped tiles do not spill
    assert sorted(c.num_warps for c in looped) == [2, 4, 8, 16]
    tiny = prune(_gn_configs(), {}, ONE_PASS=True, BLOCK_C=1, BLOCK_S=64)
    assert [c.num_warps for c in tiny] == [2]
    assert prune(_gn_configs()[3:], {}, ONE_PASS=True, BLOCK_C=1, BLOCK_S=1)   # never empty


def test_conv1x1_pruner_keeps_x_left_under_ieee():
    configs = [kc._config(t) for t in kc._GPU_TILES]
    ieee = kc._prune_configs(configs, {}, DOT_PRECISION="ieee")
    assert ieee and all(c.kwargs["X_LEFT"] for c in ieee)
    assert len(kc._prune_configs(configs, {}, DOT_PRECISION="tf32")) == len(configs)


def _attention_configs(tables):
    tiles = sorted({t for ts in tables.values() for t in ts})
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv"])
@pytest.mark.parametrize("L,D,dtype", [(16, 256, torch.float32), (16, 256, torch.bfloat16), (4, 512, torch.float32),
                                       (256, 256, torch.bfloat16), (1024, 64, torch.float16)])
def test_attention_pruner_picks_tiles_within_the_register_budget(kernel, L, D, dtype):
    """The 4x4 middle block (L = 16) in fp32: no tile both fits and stays within
    L; the fallback was the smallest tile, which spilled 33 KB per thread. It must
    be one that fits the budget whenever a listed one does."""
    prune, tables, budget = {"fwd": (ka._prune_fwd, ka._FWD_TILES, lambda m, n: (m, 2 * n, m)),
                             "dq": (ka._prune_dq, ka._BWD_TILES, lambda m, n: (m, 2 * n, 3 * m)),
                             "dkdv": (ka._prune_dkdv, ka._BWD_TILES, lambda m, n: (2 * n, 2 * m, 2 * n))}[kernel]
    q = torch.empty(1, 1, L, D, dtype=dtype)
    block_d = max(16, triton.next_power_of_2(D))
    kept = prune(_attention_configs(tables), {"Q": q, "L": L}, BLOCK_D=block_d, DOT_PRECISION="ieee")
    assert kept
    listed = [c for c in _attention_configs(tables) if ka._tile(c) in tables[max(64, block_d)]]
    any_fits = any(ka._fits(c, block_d, q.element_size(), *budget(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]))
                   for c in listed)
    for c in kept:
        assert ka._tile(c) in tables[max(64, block_d)]
        fits = ka._fits(c, block_d, q.element_size(), *budget(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]))
        assert fits or not any_fits, f"{kernel} L={L} D={D} {dtype}: kept {ka._tile(c)} over the register budget"


_CACHE_SCRIPT = """
from fastddpm.kernels import attention, conv1x1, group_norm
kernels = [group_norm._group_norm_fwd_kernel, group_norm._group_norm_bwd_kernel, attention._attention_fwd_kernel,
           attention._attention_bwd_dq_kernel, attention._attention_bwd_dkdv_kernel, conv1x1._conv1x1_fwd_kernel]
missing = [k.base_fn.__name__ for k in kernels if not k.cache_results]
assert not missing, f"autotune results not cached on disk: {missing}"
print("compiled")
"""


def test_autotune_results_are_cached_on_disk():
    """On the GPU the first call of a key benchmarks every config; with
    cache_results the next process (a later stage of run_gpu.sh, a parallel test
    worker) reads the winner from Triton's cache instead (off under the interpreter,
    hence the subprocess without TRITON_INTERPRET)."""
    run_sm90_compile_check(_CACHE_SCRIPT)
