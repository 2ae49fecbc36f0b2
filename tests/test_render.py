"""benchmarks/render.py turns the GPU results JSON into BENCHMARKS.md: checked
here on a synthetic pytest-benchmark file, since real ones only come from a GPU."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(name, group, median_s, **info):
    return {"name": name, "group": group, "stats": {"median": median_s}, "extra_info": info}


def test_render_tables_speedups_and_compile_variants(tmp_path):
    data = {
        "fastddpm_device": {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-25T03:00:00+00:00",
                            "torch": "2.11", "commit": "abc"},
        "benchmarks": [
            _bench("gn[reference]", "gn fwd", 2e-4, provider="reference", gpu_median_us=71.0,
                   gpu_p20_us=70.0, gpu_p80_us=72.0, gb_per_s=1000.0),
            _bench("gn[fastddpm]", "gn fwd", 1e-4, provider="fastddpm", gpu_median_us=10.0,
                   gpu_p20_us=9.5, gpu_p80_us=10.5, gb_per_s=2900.0),
            _bench("train[reference-none]", "train", 0.1, backend="reference", compile="none", images_per_s=1500.0),
            _bench("train[auto-reduce-overhead]", "train", 0.05, backend="auto", compile="reduce-overhead",
                   images_per_s=3000.0),
        ],
    }
    (tmp_path / "nvidia-h100-2026-11-25.json").write_text(json.dumps(data))
    (tmp_path / "bench.json").write_text("{}")      # the raw file run_gpu.sh leaves: skipped
    (tmp_path / "device.json").write_text("{}")
    out = tmp_path / "BENCHMARKS.md"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "render.py"), "--results", str(tmp_path),
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    md = out.read_text()
    assert "## NVIDIA H100 80GB HBM3 — 2026-11-25" in md
    assert "| fastddpm | 10.0 |" in md and "7.10x" in md          # GPU speed-up vs the reference
    assert "auto + compile(reduce-overhead)" in md and "2.00x" in md  # wall speed-up
    assert "images_per_s=3,000" in md
    assert "skipped" not in md


def test_render_shows_a_renamed_mode_under_its_current_name(tmp_path):
    """Recorded results keep the names of their day; the page says today's and what was measured."""
    data = {"benchmarks": [
        _bench("step[threads1-noise_x0_prev]", "sample_step noise_x0_prev (8,) fp32", 2e-3, mode="noise_x0_prev"),
        _bench("step[threads1-rng]", "sample_step rng (8,) fp32", 1e-3, mode="rng")]}
    (tmp_path / "cpu-2026-12-01.json").write_text(json.dumps(data))
    out = tmp_path / "BENCHMARKS.md"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "render.py"), "--results", str(tmp_path),
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    md = out.read_text()
    assert "### sample_step noise_history (8,) fp32" in md and "mode=noise_history" in md
    assert md.count("measured as `noise_x0_prev`") == 1 and "noise_x0_prev" not in md.replace("`noise_x0_prev`", "")
    assert "### sample_step rng (8,) fp32" in md
