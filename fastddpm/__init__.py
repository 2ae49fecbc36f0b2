"""fastddpm: a paper-exact DDPM (Ho, Jain, Abbeel 2020) with fused kernels.

The model classes load lazily so that `import fastddpm.ops` (what people who
lift our kernels into their own UNets import) does not build the UNet module.
"""
from fastddpm._ext import extension_error, has_extension

__all__ = ["GaussianDiffusion", "UNet", "UNetConfig", "has_extension", "extension_error"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "GaussianDiffusion":
        from fastddpm.diffusion import GaussianDiffusion
        return GaussianDiffusion
    if name in ("UNet", "UNetConfig"):
        from fastddpm import unet
        return getattr(unet, name)
    raise AttributeError(f"module 'fastddpm' has no attribute {name!r}")
