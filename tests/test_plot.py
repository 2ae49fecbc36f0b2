"""curves.png and `python -m fastddpm.plot`: what is drawn (the data, not pixels),
torn metrics lines, several runs, and bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fastddpm import plot
from fastddpm.training import curves


def _run(folder, steps, fid_at=(), torn=False, lr=1e-3):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in steps:
        lines.append(json.dumps({"step": s, "loss": 1.0 / s, "lr": lr * min(1.0, s / 20), "images_per_s": 100.0 + s,
                                 "grad_norm": 0.5, "skipped_steps": 0}))
        if s in fid_at:
            lines.append(json.dumps({"step": s, "fid": 300.0 / s, "fid_n": 64, "fid_seconds": 1.5}))
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"step": 999, "loss": 0.1, "lr'  # a run killed while writing
    (folder / "metrics.jsonl").write_text(text)
    return folder


def _png(path):
    with Image.open(path) as im:
        im.verify()
        return im.format


def test_curves_of_a_run_without_fid_draw_loss_speed_and_lr(tmp_path):
    run = _run(tmp_path / "a", range(10, 110, 10))
    out = curves.write_run_curves(str(run))
    assert _png(out) == "PNG"
    drawn = curves.draw({"a": curves.read_metrics(str(run))}, str(tmp_path / "c.png"))
    assert list(drawn) == ["loss", "images/s", "learning rate"]  # no FID panel without FID records
    steps, raw = drawn["loss"]["a (raw)"]
    assert steps == list(range(10, 110, 10)) and raw == pytest.approx([1.0 / s for s in steps])
    _, sm = drawn["loss"]["a (smoothed)"]
    assert sm == pytest.approx(curves.smooth(raw)) and sm == pytest.approx(raw)  # 10 points: too few to smooth
    lagged = curves.smooth(raw, 0.9)
    assert lagged[0] == pytest.approx(raw[0]) and raw[-1] < lagged[-1] < raw[0]  # debiased; lags a falling loss
    long = [1.0 + (-1) ** i for i in range(500)]  # 0, 2, 0, 2, ...: smoothed to ~1
    assert abs(curves.smooth(long)[-1] - 1.0) < 0.1
    assert drawn["learning rate"]["a"][1] == pytest.approx([1e-3 * min(1.0, s / 20) for s in steps])
    assert drawn["images/s"]["a"][1] == pytest.approx([100.0 + s for s in steps])


def test_curves_with_fid_records_add_the_fid_panel(tmp_path):
    run = _run(tmp_path / "b", range(10, 60, 10), fid_at=(20, 40))
    drawn = curves.draw({"b": curves.read_metrics(str(run))}, str(tmp_path / "c.png"))
    assert "FID" in drawn and drawn["FID"]["b"] == ([20, 40], pytest.approx([15.0, 7.5]))
    assert "KID" not in drawn


def test_a_resumed_run_keeps_the_last_value_of_a_repeated_step(tmp_path):
    run = _run(tmp_path / "r", [10, 20, 30])
    with open(run / "metrics.jsonl", "a") as f:  # resumed from step 20: step 30 again
        f.write(json.dumps({"step": 30, "loss": 0.5, "lr": 1e-3, "images_per_s": 1.0}) + "\n")
    steps, vals = curves.series(curves.read_metrics(str(run)), "loss")
    assert steps == [10, 20, 30] and vals[-1] == 0.5


def test_plot_cli_overlays_two_runs_and_skips_a_torn_line(tmp_path, capsys):
    a = _run(tmp_path / "a", range(10, 60, 10), torn=True)
    b = _run(tmp_path / "b", range(10, 90, 10), fid_at=(40,), lr=2e-3)
    out = tmp_path / "both.png"
    assert plot.main([str(a), str(b), "--out", str(out)]) == 0
    assert _png(out) == "PNG" and "loss" in capsys.readouterr().out
    recs = curves.read_metrics(str(a))
    assert [r["step"] for r in recs] == [10, 20, 30, 40, 50]  # the torn step-999 line is not a record
    drawn = curves.draw({"a": recs, "b": curves.read_metrics(str(b))}, str(tmp_path / "x.png"))
    assert set(drawn["loss"]) == {"a (raw)", "a (smoothed)", "b (raw)", "b (smoothed)"}
    assert set(drawn["FID"]) == {"b"} and set(drawn["learning rate"]) == {"a", "b"}


def test_plot_cli_refuses_a_folder_without_metrics_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    _run(tmp_path / "ok", [10])
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "metrics.jsonl").write_text("not json\n{\"loss\": 1}\n")
    for args, what in (([str(tmp_path / "empty")], "no metrics.jsonl"),
                       ([str(tmp_path / "missing")], "no such folder"),
                       ([str(tmp_path / "junk")], "no complete metrics record"),
                       ([str(tmp_path / "ok"), "--out", str(tmp_path / "c.txt")], "*.png"),
                       ([str(tmp_path / "ok"), "--out", str(tmp_path / "nope" / "c.png")], "not a writable folder")):
        r = subprocess.run([sys.executable, "-m", "fastddpm.plot", *args], capture_output=True, text=True,
                           cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("fastddpm.plot: error:") and r.stderr.count("\n") == 1 and what in r.stderr
    assert not (tmp_path / "curves.png").exists()


def test_tensorboard_log_writes_scalars_and_images_that_read_back(tmp_path):
    from fastddpm.training import tensorboard as tb

    if tb.available():
        pytest.skip(tb.available())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = tb.TensorBoardLog(str(tmp_path))
    for s in (10, 20, 30):
        log.record({"step": s, "loss": 1.0 / s, "lr": 2e-4, "skipped_steps": 0, "note": "text is left out"})
    grid = (np.arange(8 * 12 * 3) % 256).astype(np.uint8).reshape(8, 12, 3)
    log.image("samples", grid, 30)
    with pytest.raises(ValueError, match="uint8"):
        log.image("samples", grid.astype(np.float32), 30)
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "lr", "skipped_steps"}
    ev = acc.Scalars("loss")
    assert [e.step for e in ev] == [10, 20, 30] and [e.value for e in ev] == pytest.approx([0.1, 0.05, 1 / 30])
    (img,) = acc.Images("samples")
    assert img.step == 30 and (img.width, img.height) == (12, 8)


def test_tensorboard_missing_says_how_to_install(monkeypatch):
    from fastddpm.training import tensorboard as tb

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    assert "pip install tensorboard" in tb.available()
    with pytest.raises(tb.TensorBoardMissing, match="pip install tensorboard"):
        tb.TensorBoardLog("unused")
