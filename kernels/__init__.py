"""Triton kernels and their thin launchers (installed as fastddpm.kernels).

No autograd and no dispatch here: fastddpm.ops wraps these launchers in
torch.library custom ops and picks them per device. Import the modules
explicitly (`from fastddpm.kernels import group_norm`); importing this package
does not import triton.
"""
import os


def interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
