"""ops.attention: softmax(q k^T / sqrt(d)) v.

Backends: "reference" (fastddpm.reference.attention_ref) and "triton"
(the flash-attention kernels in fastddpm.kernels.attention, wrapped in the
torch.library custom ops below so they work under torch.compile(fullgraph=True),
inside CUDA graphs and through torch.library.opcheck).

Custom ops (schema namespace fastddpm):
  fastddpm::attention(q, k, v, float scale) -> (Tensor out, Tensor lse)
      out: (B, H, L, d) in q.dtype, in q's layout (L-contiguous when q is, e.g.
      q viewed out of a (B, 3C, L) conv output, else row-major); lse: (B, H, L) float32, the
      natural-log log-sum-exp of each row of the scaled scores. Autograd is
      registered (saves q, k, v, out, lse); lse is not differentiable.
  fastddpm::attention_backward(dout, q, k, v, out, lse, float scale) -> (dq, dk, dv)
      dq, dk, dv in the layouts of q, k, v; no autograd of its own (double backward is not supported).
"""
import math

import torch

from fastddpm import reference
from fastddpm.ops import _backend
from fastddpm.ops._checks import check_float, check_same

try:
    from fastddpm.kernels import attention as attention_kernels
except ImportError:  # no triton: only the reference backend is registered
    attention_kernels = None


def attention(q, k, v):
    """q, k, v: (B, heads, L, d), same dtype and device. Returns (B, heads, L, d)."""
    check_float("q", q)
    if q.dim() != 4:
        raise ValueError(f"attention: q must be (B, heads, L, d), got shape {tuple(q.shape)}")
    check_same("k", k, "q", q)
    check_same("v", v, "q", q)
    return _backend.pick("attention", q.device)(q, k, v)


_backend.register("attention", "reference", reference.attention_ref)


if attention_kernels is not None:

    @torch.library.custom_op("fastddpm::attention", mutates_args=())
    def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        o, lse = attention_kernels.attention_fwd(q, k, v, scale)
        return o, lse

    @_attention_op.register_fake
    def _(q, k, v, scale):
        B, H, L, _d = q.shape
        torch._check(k.shape == q.shape and v.shape == q.shape,
                     lambda: f"attention: q, k, v shapes differ: {q.shape}, {k.shape}, {v.shape}")
        torch._check(k.dtype == q.dtype and v.dtype == q.dtype,
                     lambda: f"attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
        return attention_kernels.empty_like_layout(q), q.new_empty((B, H, L), dtype=torch.float32)

    @torch.library.custom_op("fastddpm::attention_backward", mutates_args=())
    def _attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               out: torch.Tensor, lse: torch.Tensor,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return attention_kernels.attention_bwd(dout, q, k, v, out, lse, scale)

    @_attention_backward_op.register_fake
    def _(dout, q, k, v, out, lse, scale):
        return (attention_kernels.empty_like_layout(q), attention_kernels.empty_like_layout(k),
                attention_kernels.empty_like_layout(v))

    def _setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)

    def _backward(ctx, dout, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.fastddpm.attention_backward(dout, q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None

    _attention_op.register_autograd(_backward, setup_context=_setup_context)

    def _kernel_can_run(q):
        """Whether the Triton kernels take q (metadata only, no host sync)."""
        if q.shape[-1] > attention_kernels.MAX_HEAD_DIM or q.numel() == 0:
            return False
        if q.device.type == "cuda":
            return q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        # the interpreter computes in numpy: fp32 only (no bf16 tl.dot)
        return q.device.type == "cpu" and attention_kernels._INTERPRET and q.dtype == torch.float32

    def attention_triton(q, k, v):
        """The "triton" backend of ops.attention; same signature as attention_ref.
        Inputs the kernels cannot take (float64, d > 512, empty, fp16/bf16 on the
        CPU interpreter) run attention_ref instead."""
        if not _kernel_can_run(q):
            return reference.attention_ref(q, k, v)
        o, _lse = torch.ops.fastddpm.attention(q, k, v, 1.0 / math.sqrt(q.shape[-1]))
        return o

    _backend.register("attention", "triton", attention_triton)
