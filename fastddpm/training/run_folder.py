"""The run folder (--out): it belongs to one run.

A trainer holds a lock on it (.lock, fastddpm.files.try_lock: held by the
trainer process alone, so data-loader workers it forked never keep it after a
kill) while it runs. A new run, or a resumed one continuing in a new folder, is
refused a folder that holds checkpoints or metrics of another run; a run
resumes in its own folder only from its newest checkpoint (branch from an older
one with --out NEW). Keep-N pruning deletes only older checkpoints of the
folder's own run. config.json holds the run's effective configuration;
metrics.jsonl (MetricsLog) one JSON record a line, cut on resume to the complete
records up to the step resumed from; each training record says how many steps
its window covers (window_steps)."""
import json
import os

from fastddpm import checkpoint as ckpt_io
from fastddpm import files


class RunFolderError(ValueError):
    """--out cannot be used: not a writable folder, in use, or holding another run."""


def _check_out_path(out):
    """--out is, or can be created as, a writable folder (checked before anything is written)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunFolderError(f"--out {out} is a file, not a folder")
    try:
        files.check_writable(out)  # creates nothing
    except NotADirectoryError as e:
        raise RunFolderError(f"--out {out}: {e.filename} is a file, not a folder") from None
    except OSError as e:
        raise RunFolderError(f"--out {out}: {e.filename} is not writable") from None


def _same_folder(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


def check_out_folder(out, resume_path=None, resume_step=None):
    """Refuse a run folder where writing would touch another run's files.

    A folder holds a run when it has checkpoints or a non-empty metrics.jsonl.
    A new run, or a resumed one continuing in a new folder, needs one that holds
    none. A run resumed in its own folder must resume its newest checkpoint:
    resuming an older one there would leave the newer ones (another future of the
    run) to be pruned or resumed by mistake, so branching needs a new --out."""
    _check_out_path(out)
    ckpts = ckpt_io.list_checkpoints(out)
    if resume_path is not None and _same_folder(os.path.dirname(os.path.abspath(resume_path)), out):
        newer = [os.path.basename(p) for s, p in ckpts if s > resume_step]
        if newer:
            raise RunFolderError(
                f"cannot resume {resume_path} (step {resume_step}) in {out}: the folder holds newer "
                f"checkpoints of the run ({', '.join(newer)}), which resuming there would discard. "
                f"Continue the newest with --resume {out}, or branch from step {resume_step} into a "
                "new folder with --out NEW")
        return
    metrics = os.path.join(out, "metrics.jsonl")
    held = [f"{len(ckpts)} checkpoint(s)"] if ckpts else []
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        held.append("metrics.jsonl")
    if not held:
        return
    if resume_path is None and not ckpts:  # nothing to resume: --resume would only fail
        raise RunFolderError(f"{out} already holds a run that wrote no checkpoint (metrics.jsonl): "
                             "choose another --out folder, or remove its metrics.jsonl to reuse it")
    if resume_path is None:
        raise RunFolderError(f"{out} already holds a run ({', '.join(held)}): continue it with "
                             f"--resume {out}, or choose another --out folder")
    raise RunFolderError(f"cannot resume {resume_path} into {out}: that folder holds another run "
                         f"({', '.join(held)}); choose a new or empty --out folder")


class RunFolder:
    """One run's folder, as rank 0 of the run holds it: claim() once, close() at the end."""

    def __init__(self, out):
        self.out = out
        self._lock = None  # the .lock file's descriptor while claimed

    def claim(self, config, resume_path=None, step=0):
        """Claim the folder (once): create it, lock it for the whole run (a second
        trainer on it gets a RunFolderError), check again under the lock that it
        holds no other run, remove temp files of killed writes, write config.json
        (`config`) and cut metrics.jsonl to the records of this run up to `step`, the
        step it starts from (resumed from `resume_path`, None for a new run)."""
        if self._lock is not None:
            return
        out = self.out
        lock = os.path.join(out, ".lock")
        try:
            os.makedirs(out, exist_ok=True)
            fd = files.try_lock(lock)
        except files.LockError as e:
            raise RunFolderError(f"cannot lock {lock}: {e.strerror or e}") from e
        except OSError as e:
            raise RunFolderError(f"cannot write to --out {out}: {e.strerror or e}") from e
        if fd is None:
            raise RunFolderError(f"{out} is in use by another trainer (it holds {lock}): wait for "
                                 "it to finish, or choose another --out folder")
        self._lock = fd
        try:
            check_out_folder(out, resume_path, step if resume_path else None)
        except BaseException:
            self.close()
            raise
        for n in os.listdir(out):  # temp files of writes killed half-way
            if files.is_temp(n, (".pt", "config.json", "metrics.jsonl")):
                try:
                    os.unlink(os.path.join(out, n))
                except FileNotFoundError:
                    pass
        files.write_atomic(os.path.join(out, "config.json"), json.dumps(config, indent=2) + "\n")
        metrics = os.path.join(out, "metrics.jsonl")
        if os.path.exists(metrics):
            with open(metrics) as f:
                lines = f.read().split("\n")
            # lines[-1] is "" or a record torn by a kill; drop it and records past our step
            kept = [ln + "\n" for ln in lines[:-1] if (st := _record_step(ln)) is not None and st <= step]
            files.write_atomic(metrics, "".join(kept))

    def close(self):
        """Release the folder's lock."""
        if self._lock is not None:
            files.release(self._lock)
            self._lock = None

    def prune(self, keep, step):
        """Delete all but the newest `keep` checkpoints, never one of `step` or later
        (check_out_folder keeps newer ones out anyway)."""
        for s, old in ckpt_io.list_checkpoints(self.out)[:-keep]:
            if s < step:
                try:
                    os.unlink(old)
                except FileNotFoundError:
                    pass

    def metrics_log(self):
        """metrics.jsonl, opened for appending."""
        return MetricsLog(os.path.join(self.out, "metrics.jsonl"))


class MetricsLog:
    """A run's metrics.jsonl: one JSON record a line, each flushed as it is written."""

    def __init__(self, path):
        self._file = open(path, "a")

    def write(self, record):
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self):
        self._file.close()


def _record_step(line):
    """The step of a metrics.jsonl line; None for a line that is not a complete record."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, TypeError, KeyError):
        return None

