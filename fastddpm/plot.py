"""python -m fastddpm.plot RUN [RUN ...] [--out curves.png]: draw the curves of
one or several training runs (overlaid) from their metrics.jsonl into a PNG.
Exit codes: 0 drawn, 2 bad input (a folder without metrics, an unwritable --out)."""
import argparse
import os
import sys

from fastddpm import files
from fastddpm.training.curves import CurvesError, draw, read_metrics


def build_parser():
    p = argparse.ArgumentParser(prog="python -m fastddpm.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or their metrics.jsonl files)")
    p.add_argument("--out", default="curves.png", help="the PNG to write (default: curves.png)")
    return p


def _labels(runs):
    """Each run's folder name, or its whole path where two names coincide."""
    names = [os.path.basename(os.path.normpath(r if os.path.isdir(r) else os.path.dirname(r) or "."))
             for r in runs]
    return [n if names.count(n) == 1 else os.path.normpath(r) for n, r in zip(names, runs)]


def _writable(folder):
    try:
        files.check_writable(folder)
    except OSError:
        return False
    return True


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if not args.out.lower().endswith(".png"):
            raise CurvesError(f"--out {args.out}: the plot is a PNG, name it *.png")
        folder = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(folder) or not _writable(folder):
            raise CurvesError(f"--out {args.out}: {folder} is not a writable folder")
        runs = {label: read_metrics(r) for label, r in zip(_labels(args.runs), args.runs)}
        drawn = draw(runs, args.out)
    except (CurvesError, OSError) as e:
        print(f"fastddpm.plot: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {', '.join(drawn)} of {len(runs)} run{'s' if len(runs) > 1 else ''}")
    return 0


if __name__ == "__main__":
    from fastddpm.files import tolerate_closed_stdout
    tolerate_closed_stdout()  # `... | head` must not cost the files being written
    sys.exit(main())
