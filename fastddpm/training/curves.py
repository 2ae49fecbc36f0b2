"""A training run's curves, drawn from its metrics.jsonl: loss (raw and smoothed),
images/s, learning rate, and FID / KID when the run logged them.

read_metrics(run) reads one run folder; draw(runs, path) draws one or several
runs (overlaid, one colour each) into a PNG and returns what it drew, panel by
panel, so callers and tests can check the data rather than pixels. The trainer
redraws RUN/curves.png at each sample grid and at the end; `python -m
fastddpm.plot` draws any runs on demand.

matplotlib is imported only when drawing, and only its object-oriented API
(Figure + the Agg canvas): no pyplot, no global state, no display needed.
"""
import json
import math
import os

from fastddpm import files

METRICS = "metrics.jsonl"
CURVES = "curves.png"
# The smoothed loss: a debiased exponential moving average whose memory is ~1/25 of
# the points drawn (a fixed weight lags a short run by a large part of its length).
SMOOTHING_SPAN = 25
# (panel title, record field, y log-scale): drawn when some record has the field
PANELS = (("loss", "loss", True), ("images/s", "images_per_s", False), ("learning rate", "lr", False),
          ("FID", "fid", True), ("KID", "kid", False))


class CurvesError(ValueError):
    """A run folder without usable metrics (one line, naming the file)."""


def read_metrics(run):
    """The records of RUN/metrics.jsonl (or a metrics.jsonl path), in file order, each
    a dict of its numeric fields with an int "step". Lines that are not a complete
    record (a torn last line of a killed run, blank lines) are skipped; a run with no
    record at all is a CurvesError."""
    path = run if os.path.basename(str(run)) == METRICS else os.path.join(run, METRICS)
    if not os.path.isfile(path):
        what = "no such folder" if not os.path.exists(run) else f"no {METRICS} (is it a run folder?)"
        raise CurvesError(f"{run}: {what}")
    records = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    step = int(rec["step"])
                except (ValueError, TypeError, KeyError, OverflowError):
                    continue
                if not isinstance(rec, dict):
                    continue
                vals = {k: float(v) for k, v in rec.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
                vals["step"] = step
                records.append(vals)
    except OSError as e:
        raise CurvesError(f"{path}: cannot read: {e.strerror or e}") from None
    if not records:
        raise CurvesError(f"{path}: no complete metrics record")
    return records


def smooth(values, weight=None):
    """Debiased exponential moving average (the first points are not pulled to 0); the
    weight defaults to 1 - SMOOTHING_SPAN / len(values), within [0, 0.98]."""
    if weight is None:
        weight = min(0.98, max(0.0, 1.0 - SMOOTHING_SPAN / max(len(values), 1)))
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def series(records, field):
    """(steps, values) of the records that carry `field`; a step logged twice (a resumed
    run redoes the steps after its checkpoint) keeps its last value."""
    by_step = {}
    for r in records:
        if field in r:
            by_step[r["step"]] = r[field]
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def draw(runs, path):
    """Draw `runs` ({label: records}) into the PNG `path` (written atomically: a reader
    never sees half a file). Returns {panel title: {line label: (steps, values)}}, what
    was drawn; panels without data in any run are left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(title, field, log) for title, field, log in PANELS
              if any(series(recs, field)[0] for recs in runs.values())]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    drawn = {}
    for k, (title, field, log) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        drawn[title] = {}
        positive = True
        for (label, recs), colour in zip(runs.items(), colours):
            steps, vals = series(recs, field)
            if not steps:
                continue
            positive &= min(vals) > 0
            marker = "o" if len(steps) < 20 else None
            if field == "loss":
                ax.plot(steps, vals, color=colour, alpha=0.3, lw=0.8, label=f"{label} (raw)")
                drawn[title][f"{label} (raw)"] = (steps, vals)
                vals = smooth(vals)
                label = f"{label} (smoothed)"
            ax.plot(steps, vals, color=colour, lw=1.5, marker=marker, ms=3, label=label)
            drawn[title][label] = (steps, vals)
        if log and positive:
            ax.set_yscale("log")
        if len(drawn[title]) > 1:
            ax.legend(fontsize="small")
    files.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return drawn


def write_run_curves(run):
    """Redraw RUN/curves.png from RUN/metrics.jsonl; returns its path."""
    path = os.path.join(run, CURVES)
    draw({os.path.basename(os.path.normpath(run)): read_metrics(run)}, path)
    return path
