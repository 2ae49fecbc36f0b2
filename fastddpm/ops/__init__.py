"""The public functional ops. Each call checks its input, then runs the
implementation that fastddpm.ops._backend picks for the device (Triton on CUDA,
C++ on CPU, the plain-PyTorch reference as the fallback)."""
from fastddpm.ops._backend import available_backends, current_backend, preferred_memory_format, use_backend
from fastddpm.ops.attention import attention, attention_packed
from fastddpm.ops.conv1x1 import conv1x1
from fastddpm.ops.diffusion import p_sample_step, q_sample, sample_step, simple_loss
from fastddpm.ops.group_norm import group_norm

__all__ = ["group_norm", "conv1x1", "attention", "attention_packed", "q_sample", "simple_loss", "p_sample_step",
           "sample_step",
           "use_backend", "current_backend", "available_backends", "preferred_memory_format"]
