"""Image conversion and grids: [-1, 1] floats <-> uint8, PNG grids."""
import math

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8: round((x + 1) * 127.5), clamped."""
    if x.dim() != 4:
        raise ValueError(f"to_uint8 expects (N, C, H, W), got shape {tuple(x.shape)}")
    u = ((x.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return u.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, nrow=None, pad=2) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) uint8 grid."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"make_grid expects uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    return grid


def save_grid(images: np.ndarray, path, nrow=None, scale=None) -> None:
    """Write (N, H, W, C) uint8 images as one PNG grid; small images are
    upscaled (nearest) so the grid is at least ~256 px wide."""
    from PIL import Image

    grid = make_grid(images, nrow)
    if scale is None:
        scale = max(1, 256 // grid.shape[1])
    img = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
