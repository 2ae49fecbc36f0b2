"""ops.attention and ops.attention_packed: softmax(q k^T / sqrt(d)) v.

Two public functionals:
  attention(q, k, v)             q, k, v: (B, heads, L, d) -> (B, heads, L, d)
  attention_packed(qkv, heads)   qkv: (B, 3C, L), the (q; k; v) channels of a
                                 1x1 conv output, heads splitting C (d = C / heads)
                                 -> (B, C, L). What the UNet's AttentionBlock calls:
                                 its backward writes one (B, 3C, L) gradient
                                 instead of three zero-filled ones summed by autograd.

Backends: "reference" (fastddpm.reference.attention_ref; for the packed op q,
k, v are viewed out of qkv first) and "triton" (the flash-attention kernels in
fastddpm.kernels.attention, wrapped in the torch.library custom ops below so
they work under torch.compile(fullgraph=True), inside CUDA graphs and through
torch.library.opcheck). The triton backend runs the reference for inputs the
kernels do not take: float64, d > 512, empty tensors, and bf16 on the CPU
interpreter.

Custom ops (schema namespace fastddpm):
  fastddpm::attention(q, k, v, float scale) -> (Tensor out, Tensor lse)
      out: (B, H, L, d) in q.dtype, in q's layout (L-contiguous when q is, e.g.
      q viewed out of a (B, 3C, L) conv output, else row-major); lse: (B, H, L) float32, the
      natural-log log-sum-exp of each row of the scaled scores. Autograd is
      registered (saves q, k, v, out, lse); lse is not differentiable.
  fastddpm::attention_backward(dout, q, k, v, out, lse, float scale) -> (dq, dk, dv)
      dq, dk, dv in the layouts of q, k, v; no autograd of its own (double backward is not supported).
  fastddpm::attention_packed(Tensor qkv, int num_heads, float scale) -> (Tensor out, Tensor lse)
      qkv: (B, 3C, L), any strides: channel c of part p (0: q, 1: k, 2: v) and
      head h is qkv[:, p * C + h * d + i] (the (B, 3, heads, d, L) view, which
      splitting one dimension always gives without a copy). out: (B, C, L) in
      qkv.dtype, channel-major (contiguous) so that out.reshape(B, C, H, W) is a
      view, or channel-fastest ((B, L, C) memory) when qkv is, as a channels_last
      conv output is; lse: (B, heads, L) float32. Autograd registered (saves
      qkv, out, lse); lse is not differentiable.
  fastddpm::attention_packed_backward(dout, qkv, out, lse, int num_heads, float scale) -> Tensor dqkv
      dqkv: one buffer shaped and strided like qkv (torch.empty_like), whose
      q, k, v views the backward kernels write as dq, dk, dv: every element is
      written, so no zero-fill and no sum of three gradients. No autograd of its own.
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
    if q.shape[-1] < 1:  # the softmax scale is 1/sqrt(d)
        raise ValueError(f"attention: head dimension d must be >= 1, got shape {tuple(q.shape)}")
    return _backend.call("attention", q.device, q, k, v)


def _split_heads(t, num_heads, parts):
    """(B, parts * C, L) -> `parts` views (B, heads, L, d), d = C / heads: the
    channel dimension split into (parts, heads, d), then d and L swapped. No copy.
    Unbound before the swap: autograd then stacks the parts' gradients straight
    into t's (B, parts * C, L) order (swapping first cost one more copy of it)."""
    B, CP, L = t.shape
    d = CP // (parts * num_heads)
    return tuple(p.transpose(-1, -2) for p in t.unflatten(1, (parts, num_heads, d)).unbind(1))


def attention_packed(qkv, num_heads):
    """qkv: (B, 3C, L) float (channels [0, C) are q, [C, 2C) k, [2C, 3C) v, each
    split into num_heads heads of d = C / num_heads consecutive channels).
    Returns (B, C, L): per head softmax(q k^T / sqrt(d)) v, heads concatenated
    along the channels (the layout the q channels had)."""
    check_float("qkv", qkv)
    if qkv.dim() != 3:
        raise ValueError(f"attention_packed: qkv must be (B, 3*C, L), got shape {tuple(qkv.shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise TypeError(f"attention_packed: num_heads must be an int, got {type(num_heads).__name__}")
    if num_heads < 1:
        raise ValueError(f"attention_packed: num_heads must be positive, got {num_heads}")
    channels = qkv.shape[1]
    if channels == 0 or channels % (3 * num_heads):
        raise ValueError(f"attention_packed: qkv has {channels} channels, expected a positive multiple of "
                         f"3 * num_heads = {3 * num_heads} (q, k, v of num_heads heads each)")
    return _backend.call("attention_packed", qkv.device, qkv, num_heads)


def attention_packed_ref(qkv, num_heads):
    """The "reference" backend of ops.attention_packed: attention_ref on the q,
    k, v views of qkv; returns (B, C, L) in the Triton op's layout: contiguous,
    or channel-fastest when qkv is (a channels_last conv output)."""
    B, C3, L = qkv.shape
    if qkv.stride(1) == 1 and qkv.stride(2) != 1:
        # Views of the (B, L, 3C) memory split at the q/k/v dimension, so that
        # autograd's one copy (stacking the q, k, v gradients) writes a
        # channel-fastest gradient the conv's backward reads without another;
        # the output is a view for one head.
        qkv_l = qkv.transpose(1, 2).unflatten(2, (3, num_heads, C3 // (3 * num_heads)))
        q, k, v = (p.transpose(1, 2) for p in qkv_l.unbind(2))
        o = reference.attention_ref(q, k, v)
        return o.transpose(1, 2).reshape(B, L, C3 // 3).transpose(1, 2)
    q, k, v = _split_heads(qkv, num_heads, 3)
    return reference.attention_ref(q, k, v).transpose(-1, -2).reshape(B, C3 // 3, L)


_backend.register("attention", "reference", reference.attention_ref)
_backend.register("attention_packed", "reference", attention_packed_ref)


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

    def _kernel_can_run(q, head_dim=None):
        """Whether the Triton kernels take q (metadata only, no host sync);
        head_dim defaults to q.shape[-1] (pass it for a packed qkv)."""
        head_dim = q.shape[-1] if head_dim is None else head_dim
        if head_dim > attention_kernels.MAX_HEAD_DIM or head_dim < 1 or q.numel() == 0:
            return False
        if q.device.type == "cuda":
            return q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        # the interpreter computes tl.dot in numpy: fp32 and fp16 (exactly), no bf16
        return q.device.type == "cpu" and attention_kernels._INTERPRET and q.dtype in (torch.float32, torch.float16)

    def attention_triton(q, k, v):
        """The "triton" backend of ops.attention; same signature as attention_ref.
        Inputs the kernels cannot take (float64, d > 512, empty, bf16 on the CPU
        interpreter) run attention_ref instead."""
        if not _kernel_can_run(q):
            return reference.attention_ref(q, k, v)
        o, _lse = torch.ops.fastddpm.attention(q, k, v, 1.0 / math.sqrt(q.shape[-1]))
        return o

    _backend.register("attention", "triton", attention_triton)

    # ---------------------------------------------------------------- packed qkv
    def _packed_out_like(qkv, channels):
        """The (B, C, L) output buffer: channel-major (contiguous) unless qkv is
        channel-fastest (a channels_last conv output), then (B, L, C) memory.
        The fake below allocates the same layout."""
        B, _, L = qkv.shape
        if qkv.stride(1) == 1 and qkv.stride(2) != 1:
            return attention_kernels.new_empty((B, L, channels), qkv.dtype, qkv.device).transpose(1, 2)
        return attention_kernels.new_empty((B, channels, L), qkv.dtype, qkv.device)

    def _check_packed(qkv, num_heads):
        torch._check(qkv.dim() == 3, lambda: f"attention_packed: qkv must be (B, 3*C, L), got {qkv.shape}")
        torch._check(num_heads >= 1, lambda: f"attention_packed: num_heads must be positive, got {num_heads}")
        torch._check(qkv.shape[1] % (3 * num_heads) == 0,
                     lambda: f"attention_packed: {qkv.shape[1]} channels are not 3 * {num_heads} heads * d")

    @torch.library.custom_op("fastddpm::attention_packed", mutates_args=())
    def _attention_packed_op(qkv: torch.Tensor, num_heads: int,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        _check_packed(qkv, num_heads)
        q, k, v = _split_heads(qkv, num_heads, 3)
        out = _packed_out_like(qkv, qkv.shape[1] // 3)
        (o,) = _split_heads(out, num_heads, 1)
        _o, lse = attention_kernels.attention_fwd(q, k, v, scale, o=o)
        return out, lse

    @_attention_packed_op.register_fake
    def _(qkv, num_heads, scale):
        _check_packed(qkv, num_heads)
        B, C3, L = qkv.shape
        out = _packed_out_like(qkv, C3 // 3)
        return out, qkv.new_empty((B, num_heads, L), dtype=torch.float32)

    @torch.library.custom_op("fastddpm::attention_packed_backward", mutates_args=())
    def _attention_packed_backward_op(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor,
                                      lse: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
        _check_packed(qkv, num_heads)
        q, k, v = _split_heads(qkv, num_heads, 3)
        (o,) = _split_heads(out, num_heads, 1)
        (do,) = _split_heads(dout, num_heads, 1)
        # one buffer; the kernels write every element of its three views
        dqkv = attention_kernels.new_empty_like(qkv)
        dq, dk, dv = _split_heads(dqkv, num_heads, 3)
        attention_kernels.attention_bwd(do, q, k, v, o, lse, scale, dq=dq, dk=dk, dv=dv)
        return dqkv

    @_attention_packed_backward_op.register_fake
    def _(dout, qkv, out, lse, num_heads, scale):
        _check_packed(qkv, num_heads)
        torch._check(dout.shape == out.shape,
                     lambda: f"attention_packed_backward: dout shape {dout.shape} != out shape {out.shape}")
        return torch.empty_like(qkv)

    def _setup_context_packed(ctx, inputs, output):
        qkv, num_heads, scale = inputs
        out, lse = output
        ctx.save_for_backward(qkv, out, lse)
        ctx.num_heads = num_heads
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)

    def _backward_packed(ctx, dout, _dlse):
        qkv, out, lse = ctx.saved_tensors
        dqkv = torch.ops.fastddpm.attention_packed_backward(dout, qkv, out, lse, ctx.num_heads, ctx.scale)
        return dqkv, None, None

    _attention_packed_op.register_autograd(_backward_packed, setup_context=_setup_context_packed)

    def attention_packed_triton(qkv, num_heads):
        """The "triton" backend of ops.attention_packed; same signature as
        attention_packed_ref. Inputs the kernels cannot take (float64, d > 512,
        empty, bf16 on the CPU interpreter) run attention_packed_ref instead."""
        d = qkv.shape[1] // (3 * num_heads)
        if not _kernel_can_run(qkv, head_dim=d):
            return attention_packed_ref(qkv, num_heads)
        out, _lse = torch.ops.fastddpm.attention_packed(qkv, num_heads, 1.0 / math.sqrt(d))
        return out

    _backend.register("attention_packed", "triton", attention_packed_triton)
