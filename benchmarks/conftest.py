"""Shared pieces of the kernel benchmarks: GPU timing with CUDA graphs.

`gpu_bench(benchmark, fn, group=..., provider=..., bytes_moved=..., flops=...)`
times `fn` (already checked for equality by the caller) two ways:
  * GPU time: triton.testing.do_bench_cudagraph (fn replayed inside one CUDA
    graph, so launch overhead is gone): median and 20/80 percentiles in us,
    GB/s from `bytes_moved` and TFLOP/s from `flops`, into benchmark.extra_info;
  * host-inclusive wall time: pytest-benchmark's own rounds (synchronised).
Warm-up (compilation, autotuning) happens before either timer starts and is
reported apart as `warmup_s`.
"""
import time

import pytest
import torch


def _sync_wrapped(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


def _gpu_bench(benchmark, fn, *, group, provider, bytes_moved=None, flops=None, rounds=20, **info):
    from triton.testing import do_bench_cudagraph

    t0 = time.perf_counter()
    for _ in range(3):                                  # compile, autotune, allocator warm-up
        fn()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    median_ms, p20_ms, p80_ms = do_bench_cudagraph(fn, rep=100, quantiles=[0.5, 0.2, 0.8])
    benchmark.group = group
    benchmark.extra_info.update(
        provider=provider,
        gpu_median_us=median_ms * 1e3,
        gpu_p20_us=p20_ms * 1e3,
        gpu_p80_us=p80_ms * 1e3,
        warmup_s=warmup_s,
        device=torch.cuda.get_device_name(),
        peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20,
        **info,
    )
    if bytes_moved is not None:
        benchmark.extra_info["gb_per_s"] = bytes_moved / (median_ms * 1e-3) / 1e9
        benchmark.extra_info["bytes_moved"] = bytes_moved
    if flops is not None:
        benchmark.extra_info["tflop_per_s"] = flops / (median_ms * 1e-3) / 1e12
    benchmark.pedantic(_sync_wrapped(fn), rounds=rounds, warmup_rounds=2, iterations=1)
    return median_ms


@pytest.fixture
def gpu_bench():
    """The GPU timing helper above; skips the test without CUDA."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.cuda.reset_peak_memory_stats()
    return _gpu_bench


# Parameter values that put torch.compile in the timed code: such benchmarks get
# the `compile` marker, so that run_gpu.sh runs them in a stage of their own
# (each one compiles for tens of seconds to minutes) and new files fall in too.
COMPILE_PARAMS = {"compiled", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"}


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: times torch.compile'd code (run_gpu.sh stage `compile`)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(isinstance(v, str) and (v in COMPILE_PARAMS or "compile" in v) for v in params.values()):
            item.add_marker(pytest.mark.compile)


def pytest_terminal_summary(terminalreporter):
    """The CPU benchmarks' ratio, target and time-breakdown lines (benchmarks/test_cpu.py)
    and the sampler-accuracy summary (benchmarks/test_sampler_accuracy.py), printed
    at the end whether or not output is captured (-s)."""
    import sys
    sections = (("test_cpu", "RATIO_LINES", "CPU ratios (reference / C++, medians of per-round ratios)"),
                ("test_cpu", "TARGET_LINES", "CPU targets"),
                ("test_cpu", "BREAKDOWN_LINES", "CPU whole-model steps: where the time goes"),
                ("test_sampler_accuracy", "SUMMARY_LINES", "Sampler accuracy (exact-score law)"))
    for suffix, attr, title in sections:
        mods = [mod for name, mod in list(sys.modules.items()) if name.endswith(suffix)]
        lines = [ln for mod in mods for ln in getattr(mod, attr, [])]
        if lines:
            terminalreporter.section(title)
            for line in lines:
                terminalreporter.write_line(line)
