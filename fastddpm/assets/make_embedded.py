"""Generate fastddpm/assets/shapes16.npz, the embedded default dataset.

4,096 RGB images of 16x16 pixels: one flat-coloured shape (a disc or a
square) or a stripe pattern on a plain background, from a palette of six
saturated colours, with hard edges. Structure that a tiny DDPM learns in minutes on a CPU and a
human recognises in a sample grid at a glance. Everything comes from a fixed
seed, so running this script again rewrites the same file (licence-clean: no
outside data).

    python fastddpm/assets/make_embedded.py          # writes shapes16.npz beside it
"""
import argparse
import os

import numpy as np

PALETTE = np.array([
    (220, 40, 40), (250, 200, 30), (40, 90, 220), (30, 160, 80), (245, 245, 240), (25, 25, 30),
], dtype=np.uint8)
KINDS = ("disc", "square", "hstripes", "vstripes")


def make_images(n=4096, size=16, seed=0):
    """(n, size, size, 3) uint8 images and (n,) int64 shape labels (index into KINDS)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, len(KINDS), size=n)
    for i, kind in enumerate(labels):
        bg, fg = rng.choice(len(PALETTE), size=2, replace=False)
        img = np.empty((size, size, 3), dtype=np.uint8)
        img[:] = PALETTE[bg]
        name = KINDS[kind]
        if name == "disc":
            r = rng.uniform(size * 0.25, size * 0.45)
            cy, cx = rng.uniform(r, size - r, size=2)
            mask = np.hypot(yy - cy, xx - cx) <= r
        elif name == "square":
            s = int(rng.integers(size // 2, size * 7 // 8 + 1))
            y0, x0 = rng.integers(0, size - s + 1, size=2)
            mask = (yy >= y0) & (yy < y0 + s) & (xx >= x0) & (xx < x0 + s)
        else:
            period = int(rng.choice([4, 6, 8]))
            phase = int(rng.integers(0, period))
            coord = yy if name == "hstripes" else xx
            mask = ((coord.astype(int) + phase) % period) < period // 2
        img[mask] = PALETTE[fg]
        images[i] = img
    return images, labels.astype(np.int64)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes16.npz"))
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    images, labels = make_images(args.n, 16, args.seed)
    np.savez_compressed(args.out, images=images, labels=labels, kinds=np.array(KINDS))
    print(f"wrote {args.out}: {images.shape} {images.dtype}, {os.path.getsize(args.out) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
