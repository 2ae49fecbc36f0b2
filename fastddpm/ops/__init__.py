"""The public functional ops. Each call checks its input, then runs the
implementation that fastddpm.ops._backend chooses for the device (Triton on
CUDA, C++ on CPU, each checked against the plain-PyTorch reference at its first
use; the reference as the fallback)."""
from fastddpm.ops._backend import available_backends, current_backend, preferred_memory_format, use_backend
from fastddpm.ops._report import clear_dispatch_cache, dispatch_report, dispatch_summary, report_dispatch
from fastddpm.ops.attention import attention, attention_packed
from fastddpm.ops.conv1x1 import conv1x1
from fastddpm.ops.diffusion import p_sample_step, q_sample, sample_step, simple_loss
from fastddpm.ops.group_norm import group_norm

__all__ = ["group_norm", "conv1x1", "attention", "attention_packed", "q_sample", "simple_loss", "p_sample_step",
           "sample_step",
           "use_backend", "current_backend", "available_backends", "preferred_memory_format",
           "dispatch_report", "dispatch_summary", "report_dispatch", "clear_dispatch_cache"]
