"""The life of a training command line, shared by fastddpm.train and fastddpm.distill:
torchrun set-up, SIGINT/SIGTERM (stop at the next step with a checkpoint; a second
Ctrl-C gives up at once), claiming the run folder, and each way a run ends as one
message and exit status: 0 done, 1 a write failed while training (the message
names the file), 2 bad input or data, 3 diverged, 128 + signal when stopped."""
import signal
import sys
import threading

from fastddpm import data as data_mod
from fastddpm.allocator import keep_freed_memory
from fastddpm.checkpoint import CheckpointError
from fastddpm.training import distributed
from fastddpm.training.distributed import PeerFailed
from fastddpm.training.flags import _os_error_line
from fastddpm.training.trainer import Stopped, TrainingDiverged


def run(prog, build, *, idle, start, train, done):
    """Run one training command as `prog` ("fastddpm.train"); returns its exit status.
    build(rank, world, say) -> the trainer (CheckpointError, DataError or ValueError:
    bad input, exit 2); idle(trainer) -> the line said instead of training when the run
    is already at its end; start(trainer, say) says what is about to run, once the
    folder is claimed; train(trainer) -> the summary of the training; done(trainer,
    summary) -> its last line."""
    rank, world = distributed.init()
    say = print if rank == 0 else (lambda *a, **k: None)

    def error(msg, code):
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return code

    handlers, trainer = {}, None
    try:
        try:
            trainer = build(rank, world, say)
        except (CheckpointError, data_mod.DataError, ValueError) as e:
            return error(e, 2)
        if trainer.device.type == "cpu":
            keep_freed_memory()  # fewer page faults per step (fastddpm.allocator)

        def on_signal(signum, frame):
            if trainer.signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: give up at once
            trainer.signal = signum

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                handlers[s] = signal.signal(s, on_signal)
        if trainer.step >= trainer.cfg.steps:
            say(idle(trainer))
            return 0
        try:
            trainer.on_rank0(trainer.prepare_out)  # rank 0 claims the folder; the others learn its verdict
        except PeerFailed:
            return 2  # rank 0 says why
        except ValueError as e:
            return error(e, 2)
        except OSError as e:
            return error(_os_error_line(e), 2)
        start(trainer, say)
        try:
            summary = train(trainer)
        except TrainingDiverged as e:
            print(f"{prog}: {e}", file=sys.stderr)
            return 3
        except Stopped as e:
            name = signal.Signals(e.signum).name if e.signum else "signal"
            say(f"{prog}: {name} at step {e.step}: checkpoint {e.path} written; continue "
                f"with: python -m {prog} --resume {trainer.cfg.out}")
            return 128 + int(e.signum)
        except data_mod.DataError as e:
            return error(e, 2)
        except PeerFailed as e:  # rank 0 printed its error; this rank says why it stops
            return error(f"rank {rank}: stopping at step {trainer.step}: {e}", 1)
        except CheckpointError as e:  # e.g. "cannot write checkpoint FILE: No space left on device"
            return error(e, 1)
        except OSError as e:  # metrics.jsonl, a sample grid
            notes = "".join(f"; {n}" for n in getattr(e, "__notes__", ()))  # the checkpoint saved, if any
            return error(_os_error_line(e) + f" (training stopped at step {trainer.step}){notes}", 1)
        say(done(trainer, summary))
        return 0
    finally:
        if trainer is not None:
            trainer.close()
        for s, h in handlers.items():
            signal.signal(s, h)
        distributed.close(world)
