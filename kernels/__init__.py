"""Triton kernels and their thin launchers (installed as fastddpm.kernels).

No autograd and no dispatch here: fastddpm.ops wraps these launchers in
torch.library custom ops and picks them per device. Import the modules
explicitly (`from fastddpm.kernels import group_norm`); importing this package
does not import triton.
"""
