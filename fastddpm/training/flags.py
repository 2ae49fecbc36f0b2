"""The command lines' flag parsers (fastddpm.train, fastddpm.distill): one-line
argparse errors that name the problem, and an OSError as one line."""
import argparse
import math

from fastddpm.sampling import parse_restart
from fastddpm.training.config import SEED_MAX


def _int(s):
    try:
        return int(s)
    except ValueError:  # else argparse names the parser function: "invalid parse value"
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


def _ints(s):
    s = s.strip()
    try:
        return tuple(int(v) for v in s.replace(" ", "").split(",") if v) if s else ()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _finite(s):
    """A float flag: a finite number (inf and nan would only surface later, as a nan loss)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {s}")
    return v


def _positive(kind):
    def parse(s):
        v = _finite(s) if kind is float else _int(s)
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
        return v
    return parse


def _fraction(s):
    v = _finite(s)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {s}")
    return v


def _restart(s):
    """LO,HI,K of Restart sampling, or none/'' (off): (LO, HI, K) or None."""
    try:
        return parse_restart(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _quantile(s):
    v = _finite(s)
    if not (v == 0 or 0 < v <= 1):
        raise argparse.ArgumentTypeError(f"must be in (0, 1], or 0 (off), got {s}")
    return v


def _nonneg_int(s):
    v = _int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _seed(s):
    v = _int(s)
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63 - 1], got {s}")
    return v


def _os_error_line(e):
    """An OSError as one line naming its file: 'FILE: No space left on device'."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)
