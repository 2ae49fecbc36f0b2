"""TensorBoard event files for a training run (train --tensorboard): the scalars of
every metrics.jsonl record and the sample grids, in RUN/tensorboard/. `tensorboard
--logdir RUN` (or a parent of several runs) shows them. The tensorboard package is
optional: without it, TensorBoardLog() raises TensorBoardMissing saying how to
install it."""
import os

import numpy as np

SUBDIR = "tensorboard"
INSTALL = "pip install tensorboard"


class TensorBoardMissing(ValueError):
    """--tensorboard without the tensorboard package."""


def available():
    """None if event files can be written, else why not (one line)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return f"--tensorboard needs the tensorboard package, which is not installed: {INSTALL}"
    return None


class TensorBoardLog:
    def __init__(self, run_dir):
        why = available()
        if why:
            raise TensorBoardMissing(why)
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = os.path.join(run_dir, SUBDIR)
        self.writer = SummaryWriter(log_dir=self.log_dir)

    def record(self, rec):
        """The numeric fields of a metrics record (a dict with "step") as scalars."""
        step = int(rec["step"])
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def image(self, tag, image, step):
        """A (H, W, C) uint8 image (C = 1 or 3), e.g. a sample grid."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
            raise ValueError(f"TensorBoard image {tag!r}: expected (H, W, 1 or 3) uint8, got {image.shape} "
                             f"{image.dtype}")
        self.writer.add_image(tag, image, int(step), dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()
