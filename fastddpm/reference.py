"""Plain-PyTorch reference for every fused op: the specification.

Every fast path (Triton, C++) is tested against these functions. They compute
in float32 (float64 when given float64) and return the input dtype, which is
the contract the fused kernels keep: fp32 statistics and accumulation, I/O in
the caller's dtype. No input checking here: fastddpm.ops checks at the boundary.
"""
import math

import torch
import torch.nn.functional as F


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_norm_ref(x, num_groups, weight=None, bias=None, eps=1e-6, act=None, add=None, dropout=0.0):
    """GroupNorm over (C/G, *spatial) per sample and group of x + add, then
    optional SiLU, then dropout (training-mode F.dropout, torch's RNG) when
    dropout > 0.

    x: (N, C, *spatial); weight, bias: (C,) or None; add: (N, C) or None (the
    timestep-embedding term of a ResBlock). act: None or "silu".
    """
    cd = _compute_dtype(x.dtype)
    w = None if weight is None else weight.to(cd)
    b = None if bias is None else bias.to(cd)
    if w is None and b is not None:  # F.group_norm's backward needs a weight when given a bias
        w = torch.ones(x.shape[1], dtype=cd, device=x.device)
    h = x.to(cd)
    if add is not None:
        h = h + add.to(cd).reshape(*add.shape, *([1] * (x.dim() - 2)))
    y = F.group_norm(h, num_groups, w, b, eps)
    if act == "silu":
        y = F.silu(y)
    if dropout > 0:
        y = F.dropout(y, dropout, training=True)
    return y.to(x.dtype)


def conv1x1_ref(x, weight, bias=None, norm=None, residual=None):
    """1x1 convolution of x (N, K, *spatial) with weight (M, K) or (M, K, 1, 1)
    and bias (M,) or None, of GroupNorm(x) (no activation) when norm =
    (num_groups, gn_weight, gn_bias, eps) is given, plus residual (N, M,
    *spatial) when given. Computed in float32 (float64 if x or weight is);
    returns weight's dtype, promoted with residual's when there is one."""
    cd = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    h = x.to(cd)
    if norm is not None:
        num_groups, gn_weight, gn_bias, eps = norm
        h = group_norm_ref(h, num_groups, gn_weight, gn_bias, eps)
    N, K, M = x.shape[0], x.shape[1], weight.shape[0]
    y = torch.matmul(weight.reshape(M, K).to(cd), h.reshape(N, K, math.prod(x.shape[2:])))
    if bias is not None:
        y = y + bias.to(cd)[:, None]
    y = y.reshape(N, M, *x.shape[2:])
    if residual is None:
        return y.to(weight.dtype)
    return (y + residual.to(cd)).to(torch.promote_types(weight.dtype, residual.dtype))


def attention_ref(q, k, v):
    """softmax(q k^T / sqrt(d)) v for q, k, v of shape (B, heads, L, d)."""
    cd = _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    w = torch.softmax((q.to(cd) @ k.to(cd).transpose(-1, -2)) * scale, dim=-1)
    return (w @ v.to(cd)).to(q.dtype)


def _gather(table, t, like):
    """table[t] as a (B, 1, ..., 1) tensor in like's compute dtype."""
    c = table.index_select(0, t).to(_compute_dtype(like.dtype))
    return c.view(-1, *([1] * (like.dim() - 1)))


def q_sample_ref(x0, t, noise, sqrt_abar, sqrt_one_minus_abar):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; t: int64 (B,)."""
    cd = _compute_dtype(x0.dtype)
    xt = _gather(sqrt_abar, t, x0) * x0.to(cd) + _gather(sqrt_one_minus_abar, t, x0) * noise.to(cd)
    return xt.to(x0.dtype)


def simple_loss_ref(eps_hat, noise):
    """L_simple: mean over all elements of (noise - eps_hat)^2, as a float32 scalar
    (float64 for float64 input)."""
    cd = _compute_dtype(eps_hat.dtype)
    return (noise.to(cd) - eps_hat.to(cd)).square().mean()


def p_sample_step_ref(x_t, t, eps, sqrt_recip_abar, sqrt_recipm1_abar, coef1, coef2, log_var,
                      noise, clip=True):
    """One ancestral step (the paper's Algorithm 2, line 4) from eps_hat.

    x0_hat = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps   (clipped to [-1, 1] if clip)
    mean   = coef1_t x0_hat + coef2_t x_t
    x_{t-1} = mean + [t > 0] exp(0.5 log_var_t) noise
    All coefficient tables are 1-D of length T; t is int64 (B,).
    """
    cd = _compute_dtype(x_t.dtype)
    x = x_t.to(cd)
    x0 = _gather(sqrt_recip_abar, t, x_t) * x - _gather(sqrt_recipm1_abar, t, x_t) * eps.to(cd)
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    mean = _gather(coef1, t, x_t) * x0 + _gather(coef2, t, x_t) * x
    nonzero = (t != 0).to(cd).view(-1, *([1] * (x_t.dim() - 1)))
    std = torch.exp(0.5 * _gather(log_var, t, x_t))
    return (mean + nonzero * std * noise.to(cd)).to(x_t.dtype)


# ----------------------------------------------------------------------------- samplers
# Every sampler (ancestral / respaced DDPM, DDIM, DPM-Solver++(2M/3M), UniPC,
# iPNDM) is a float64 table with one row per network evaluation and these
# columns, run by one linear multistep update:
#   x0_hat = a_x x_t - a_e eps                          (clipped to [-1, 1] if clip)
#   x_next = c_x x_t + c_0 x0_hat + sum_{j=1..K} c_j H_{i-j} + sigma z
#   H_i    = h_x x_t + h_0 x0_hat                       (kept for the next K steps)
# H is the sampler's history: x0_hat itself (h_x = 0, h_0 = 1; DPM-Solver++,
# UniPC) or eps recomputed from the clipped x0_hat (iPNDM). It lives in a ring
# of K + 1 slots on the device indexed by the step (H_i in slot i mod (K + 1)),
# so a captured step replays for every step; the slot written is never read in
# the same step, so running a step twice gives the same result.
SAMPLER_COEFS = ("a_x", "a_e", "c_x", "c_0", "c_1", "c_2", "c_3", "c_4", "h_x", "h_0", "sigma")
MAX_HISTORY = 4    # past predictions a row can read (c_1 .. c_4)
# What a network outputs (GaussianDiffusion.prediction): "eps" is the paper's; for
# "x0" and "v" only a_x, a_e change (sampling.tables.x0_columns), "eps" above
# standing for the network output.
PREDICTIONS = ("eps", "x0", "v")

_M32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a, m):
    """(high, low) 32-bit words of a * m for int64 tensors a in [0, 2^32) and a
    constant m < 2^32: the product is < 2^64 and int64 multiplication wraps
    modulo 2^64 (two's complement), so its bits are exact; shifts and masks
    then read the two words."""
    p = a * m
    return (p >> 32) & _M32, p & _M32


def philox4x32_ref(key, c0, c1, c2, c3, rounds=10):
    """Philox-4x32 (Salmon et al. 2011, the Random123 generator Triton's
    tl.random.philox implements): four uint32 words (as int64 tensors) from the
    64-bit `key` (an int64 tensor or int) and the counter words c0..c3 (int64
    tensors in [0, 2^32), broadcastable)."""
    k0, k1 = key & _M32, (key >> 32) & _M32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo32(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def _philox_normal(key, c0, c1, c2, c3):
    """float32 normals from the first two Philox words of each counter: u1, u2 =
    ((word >> 8) + 0.5) / 2^24 in (0, 1), z = sqrt(-2 ln u1) cos(2 pi u2) (Box-Muller)."""
    w0, w1, _, _ = philox4x32_ref(key, c0, c1, c2, c3)
    u1 = ((w0 >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)
    u2 = ((w1 >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def philox_normal_ref(rng, shape):
    """Standard normals (float32, `shape` = (B, ...)) of the sampler noise stream.

    rng: int64 tensor (3,) = (key, offset, first_sample) on the output device.
    Element d of sample b uses Philox(key, counter = (d, first_sample + b,
    offset mod 2^32, offset >> 32)) (_philox_normal). Image b's noise thus
    depends only on (key, first_sample + b, offset), never on the batch it is
    drawn in. Reads rng on the device (no sync).
    """
    B, D = shape[0], math.prod(shape[1:])
    dev = rng.device
    key, offset, first = rng[0], rng[1], rng[2]
    c0 = torch.arange(D, dtype=torch.int64, device=dev).view(1, D)
    c1 = ((first + torch.arange(B, dtype=torch.int64, device=dev)) & _M32).view(B, 1)
    return _philox_normal(key, c0, c1, offset & _M32, (offset >> 32) & _M32).view(shape)


def seeded_step_noise_ref(shape, t, seed, offset=0):
    """Standard normals (float32, `shape` = (B, ...), on t's device) of the seeded
    ancestral step (ops.p_sample_step(seed=...)): element e (its flat index in the
    whole tensor, < 2^32) of sample b uses Philox(key = seed, counter = (e, t[b],
    offset mod 2^32, offset >> 32)), as the Triton kernel draws them. seed: int in
    [0, 2^63), offset: int in [0, 2^64). Reads t on the device only (no sync)."""
    B, D = shape[0], math.prod(shape[1:])
    dev = t.device
    c0 = (torch.arange(B * D, dtype=torch.int64, device=dev) & _M32).view(B, D)
    c1 = (t.to(torch.int64) & _M32).view(B, 1)
    # seed and offset stay Python ints (no host-to-device copy): philox4x32_ref mixes them in
    return _philox_normal(int(seed), c0, c1, offset & _M32, (offset >> 32) & _M32).view(shape)


def sample_step_ref(x_t, eps, table, step, history=None, noise=None, rng=None, clip=True):
    """One step of any sampler (see SAMPLER_COEFS): returns (x_next, x0_hat),
    both in x_t's dtype, and writes H_i into the history ring.

    table: (S, 11) coefficients (any float dtype, applied in float32, float64 for
    float64 x_t); step: int64 (1,), the row to use, on the device; history: a
    ring (K + 1, *x_t.shape) in x_t's dtype, K in [1, MAX_HISTORY], or None (no
    history: the c_j and h columns are unused); noise: z like x_t, or None to
    draw it from `rng` with philox_normal_ref, or neither: no noise term. eps
    may have another float dtype than x_t. Reads step on the device only.
    """
    cd = _compute_dtype(x_t.dtype)
    row = table.index_select(0, step).to(cd)[0]
    a_x, a_e, c_x, c_0 = row[0], row[1], row[2], row[3]
    x = x_t.to(cd)
    x0 = a_x * x - a_e * eps.to(cd)
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    out = c_x * x + c_0 * x0
    if history is not None:
        R = history.shape[0]
        for j in range(1, R):
            out = out + row[3 + j] * history.index_select(0, (step - j) % R)[0].to(cd)
        h = row[8] * x + row[9] * x0
        history.index_copy_(0, step % R, h.to(history.dtype).unsqueeze(0))
    if noise is not None or rng is not None:
        z = philox_normal_ref(rng, x_t.shape) if noise is None else noise
        out = out + row[10] * z.to(cd)
    return out.to(x_t.dtype), x0.to(x_t.dtype)
