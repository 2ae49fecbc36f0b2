"""ops.attention: softmax(q k^T / sqrt(d)) v."""
from fastddpm import reference
from fastddpm.ops import _backend
from fastddpm.ops._checks import check_float, check_same


def attention(q, k, v):
    """q, k, v: (B, heads, L, d), same dtype and device. Returns (B, heads, L, d)."""
    check_float("q", q)
    if q.dim() != 4:
        raise ValueError(f"attention: q must be (B, heads, L, d), got shape {tuple(q.shape)}")
    check_same("k", k, "q", q)
    check_same("v", v, "q", q)
    return _backend.pick("attention", q.device)(q, k, v)


_backend.register("attention", "reference", reference.attention_ref)
