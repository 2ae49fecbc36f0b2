"""Convert checkpoints between fastddpm and diffusers: `python -m fastddpm.convert SRC DST`.

SRC a diffusers UNet2DModel or DDPMPipeline folder -> DST a fastddpm .pt
checkpoint (sample it with `python -m fastddpm.sample --checkpoint DST`).
SRC a fastddpm checkpoint or run folder -> DST a DDPMPipeline folder
(`DDPMPipeline.from_pretrained(DST)`), with the EMA weights unless --no-ema.
DST must not exist yet (an empty folder is fine for a pipeline).
"""
import argparse
import os
import sys

from fastddpm import checkpoint, interop, loader

FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastddpm.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a diffusers folder, or a fastddpm checkpoint file / run folder")
    p.add_argument("dst", help="the fastddpm .pt checkpoint, or the diffusers pipeline folder, to write")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights (fastddpm sources; a diffusers "
                   "folder holds one set of weights)")
    return p.parse_args(argv)


def convert(src, dst, use_ema=True):
    """Convert src to dst (the direction follows from src); returns a one-line summary."""
    src_path = loader.resolve(src)
    from_diffusers = os.path.isdir(src_path) and interop.folder_kind(src_path) is not None
    ckpt = loader.load(src_path)
    if from_diffusers:
        if os.path.exists(dst):
            raise checkpoint.CheckpointError(f"{dst} already exists; choose a new file name")
        checkpoint.build_model(ckpt, path=src_path)  # the weights fit and are finite
        checkpoint.atomic_save(ckpt, dst)
        return f"{src_path} (diffusers) -> {dst} (fastddpm checkpoint)"
    if os.path.splitext(os.fspath(dst))[1].lower() in FILE_SUFFIXES:
        # a fastddpm checkpoint converts to a diffusers folder only: a folder named
        # like a weights file is not what was asked for
        raise checkpoint.CheckpointError(
            f"{dst}: a fastddpm checkpoint converts to a diffusers pipeline folder, not to a "
            f"'{os.path.splitext(dst)[1]}' file ({src_path} is already a fastddpm checkpoint); "
            "name the folder without a file extension")
    interop.export_pipeline(ckpt, dst, use_ema=use_ema, where=src_path)
    weights = "EMA" if use_ema and ckpt.get("ema") is not None else "raw"
    return f"{src_path} (fastddpm, step {ckpt.get('step')}, {weights} weights) -> {dst} (diffusers DDPMPipeline)"


def main(argv=None):
    args = parse_args(argv)
    try:
        print(convert(args.src, args.dst, use_ema=not args.no_ema), file=sys.stderr)
    except checkpoint.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    return 0


if __name__ == "__main__":
    from fastddpm.files import tolerate_closed_stdout
    tolerate_closed_stdout()  # `... | head` must not cost the files being written
    sys.exit(main())
