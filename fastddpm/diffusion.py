"""GaussianDiffusion: the DDPM forward process, posterior, losses, VLB and one
sampler step (Ho, Jain, Abbeel 2020). Math only: the network is an argument.

Conventions (DESIGN.md): timesteps are 0-indexed (index t is the paper's t+1);
schedule buffers are float64 and registered, so `.to(device)` moves them;
coefficients are applied in float32 (float64 for float64 input). Images live
in [-1, 1].

Parameterisation (`prediction`): what the network outputs at (x_t, t), with
a = sqrt(abar_t), s = sqrt(1 - abar_t), x_t = a x0 + s eps:
  "eps" (the paper's): eps;  "x0": x0;  "v" (Salimans & Ho 2022): v = a eps - s x0.
split_prediction turns any of them into (x0_hat, eps_hat); prediction_target is
what training regresses on. Each is trained on a weighted x0 error
w(t) |x0 - x0_hat|^2 (loss_weight): eps's L_simple is w = SNR, x0 uses the
truncated SNR max(SNR, 1), v's plain v MSE is w = SNR + 1 (Salimans & Ho,
sec. 4), since |v - v_hat|^2 = |x0 - x0_hat|^2 / s^2 at fixed x_t.
"""
import math

import numpy as np
import torch
import torch.nn as nn

from fastddpm import ops
from fastddpm.ops._checks import check_float, check_same, check_timesteps
from fastddpm.reference import PREDICTIONS

VARIANCES = ("fixedlarge", "fixedsmall")
SCHEDULES = ("linear", "quad", "cosine")


def make_betas(schedule, T, beta_start=1e-4, beta_end=0.02, cosine_s=0.008):
    """Beta schedule as float64 numpy (T,). linear/quad as in the paper's code;
    cosine as in Nichol & Dhariwal (2021), betas capped at 0.999."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}, expected one of {SCHEDULES}")
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive int, got {T!r}")
    if schedule == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif schedule == "quad":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    else:
        f = lambda u: math.cos((u / T + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=np.float64)
    if not (np.all(betas > 0) and np.all(betas < 1)):
        raise ValueError(f"betas must lie in (0, 1); got range [{betas.min()}, {betas.max()}]")
    return betas


def _bcast(c, x):
    """(B,) coefficients -> (B, 1, ..., 1) in x's compute dtype."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return c.to(dt).view(-1, *([1] * (x.dim() - 1)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    # The tanh approximation of the standard normal CDF used by the paper's code,
    # kept so that bits/dim are comparable with the published numbers.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) per element for x in [-1, 1] quantised to 256 bins (nats)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min,
                                   torch.log(cdf_delta.clamp(min=1e-12))))


class GaussianDiffusion(nn.Module):
    """The DDPM forward process and its learned reverse with fixed variances.

    Args:
        betas: 1-D float64 array-like of length T, each in (0, 1).
        variance: "fixedlarge" (sigma_t^2 = beta_t, the paper's CIFAR-10 choice;
            index 0 uses the posterior variance) or "fixedsmall" (the posterior
            variance, log clipped at index 0).
        prediction: what the network outputs, "eps" (the paper's), "x0" or "v"
            (see the module docstring).
    """

    def __init__(self, betas, variance="fixedlarge", schedule_config=None, prediction="eps"):
        super().__init__()
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}, expected one of {VARIANCES}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}, expected one of {PREDICTIONS}")
        self.prediction = prediction
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 1 or not (np.all(betas > 0) and np.all(betas < 1)):
            raise ValueError("betas must be a non-empty 1-D array with values in (0, 1)")
        self.variance = variance
        self.num_timesteps = T = len(betas)
        self._schedule_config = {k: v for k, v in (schedule_config or {"schedule": "custom"}).items()
                                 if k != "prediction"}
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # post_var[0] == 0: its log is clipped by taking index 1's value.
        post_logvar_clipped = np.log(np.append(post_var[1], post_var[1:])) if T > 1 else np.log(betas)
        if variance == "fixedlarge":
            model_logvar = np.log(np.append(post_var[1], betas[1:])) if T > 1 else np.log(betas)
        else:
            model_logvar = post_logvar_clipped
        bufs = {
            "betas": betas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": np.sqrt(abar),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
            "log_one_minus_alphas_cumprod": np.log(1.0 - abar),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1.0),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_logvar_clipped,
            "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
            "model_log_variance": model_logvar,
            "snr": abar / (1.0 - abar),
        }
        for name, arr in bufs.items():
            # persistent=False: schedules are rebuilt from the config, never loaded.
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(arr)), persistent=False)

    # ---- construction ---------------------------------------------------------
    @classmethod
    def from_schedule(cls, schedule="linear", T=1000, beta_start=1e-4, beta_end=0.02,
                      variance="fixedlarge", prediction="eps"):
        betas = make_betas(schedule, T, beta_start, beta_end)
        cfg = {"schedule": schedule, "T": T, "beta_start": beta_start, "beta_end": beta_end,
               "variance": variance}
        return cls(betas, variance, schedule_config=cfg, prediction=prediction)

    @classmethod
    def linear(cls, T=1000, beta_start=1e-4, beta_end=0.02, variance="fixedlarge", prediction="eps"):
        return cls.from_schedule("linear", T, beta_start, beta_end, variance, prediction)

    @classmethod
    def quad(cls, T=1000, beta_start=1e-4, beta_end=0.02, variance="fixedlarge", prediction="eps"):
        return cls.from_schedule("quad", T, beta_start, beta_end, variance, prediction)

    @classmethod
    def cosine(cls, T=1000, variance="fixedlarge", prediction="eps"):
        return cls.from_schedule("cosine", T, variance=variance, prediction=prediction)

    @property
    def config(self) -> dict:
        """What from_config needs to rebuild this object (saved in checkpoints).
        "prediction" is written only when it is not "eps": a config without it
        means eps, so eps checkpoints stay what they were (and readable by
        fastddpm versions before the parameterisations)."""
        if self._schedule_config.get("schedule") == "custom":
            cfg = {"schedule": "custom", "betas": self.betas.tolist(), "variance": self.variance}
        else:
            cfg = dict(self._schedule_config)
        if self.prediction != "eps":
            cfg["prediction"] = self.prediction
        return cfg

    @classmethod
    def from_config(cls, cfg: dict):
        cfg = dict(cfg)
        prediction = cfg.pop("prediction", "eps")
        if cfg.get("schedule") == "custom":
            return cls(cfg["betas"], cfg.get("variance", "fixedlarge"), schedule_config=cfg,
                       prediction=prediction)
        unknown = set(cfg) - {"schedule", "T", "beta_start", "beta_end", "variance"}
        if unknown:
            raise ValueError(f"unknown diffusion config keys {sorted(unknown)}")
        return cls.from_schedule(**cfg, prediction=prediction)

    def extra_repr(self):
        return (f"T={self.num_timesteps}, variance={self.variance!r}, prediction={self.prediction!r}, "
                f"{self._schedule_config}")

    # ---- checks -----------------------------------------------------------------
    def _check(self, x, t, name="x", check_range=True):
        check_float(name, x)
        if x.dim() < 2:
            raise ValueError(f"{name} must be batched (B, ...), got shape {tuple(x.shape)}")
        if x.device != self.betas.device:
            raise ValueError(f"{name} is on {x.device} but the diffusion's buffers are on "
                             f"{self.betas.device}: call diffusion.to({x.device})")
        check_timesteps(t, x.shape[0], self.num_timesteps, x.device, check_range)

    def _coef(self, name, t, x):
        return _bcast(getattr(self, name).index_select(0, t), x)

    # ---- forward process ------------------------------------------------------
    def q_mean_variance(self, x0, t):
        """Mean, variance and log-variance of q(x_t | x0); variances (B, 1, ..)."""
        self._check(x0, t, "x0")
        mean = self._coef("sqrt_alphas_cumprod", t, x0) * x0
        return (mean, self._coef("alphas_cumprod", t, x0).neg().add(1.0),
                self._coef("log_one_minus_alphas_cumprod", t, x0))

    def q_sample(self, x0, t, noise=None):
        """x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I); x0 (B, ...), t int64 (B,)."""
        self._check(x0, t, "x0")
        if noise is None:
            noise = torch.randn_like(x0)
        check_same("noise", noise, "x0", x0)
        return ops.q_sample(x0, t, noise, self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod,
                            check_range=False)  # checked by _check above

    def q_posterior(self, x0, x_t, t):
        """q(x_{t-1} | x_t, x0): (mean, variance, log_variance_clipped); the
        variances have shape (B, 1, ..., 1) and broadcast against x."""
        self._check(x_t, t, "x_t")
        check_same("x0", x0, "x_t", x_t)
        mean = self._coef("posterior_mean_coef1", t, x_t) * x0 + self._coef("posterior_mean_coef2", t, x_t) * x_t
        return (mean.to(x_t.dtype), self._coef("posterior_variance", t, x_t),
                self._coef("posterior_log_variance_clipped", t, x_t))

    # ---- reverse process ------------------------------------------------------
    def predict_x0(self, x_t, t, eps):
        """x0_hat = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps (no clipping)."""
        self._check(x_t, t, "x_t")
        check_same("eps", eps, "x_t", x_t)
        return self._x0_from_eps(x_t, t, eps)

    def _x0_from_eps(self, x_t, t, eps):
        x0 = self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._coef("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        return x0.to(x_t.dtype)

    def split_prediction(self, out, x_t, t, *, check_t=True):
        """The network output `out` under this parameterisation as (x0_hat, eps_hat),
        closed form, in x_t's dtype (coefficients in float32, float64 for float64):
        eps: x0 = (x - s eps) / a;  x0: eps = (x - a x0) / s;  v: x0 = a x - s v,
        eps = s x + a v (a = sqrt(abar_t), s = sqrt(1 - abar_t)). Not clipped.
        check_t=False skips the range check of t (a host sync on a GPU)."""
        self._check(x_t, t, "x_t", check_range=check_t)
        check_same("model output", out, "x_t", x_t)
        return self._split(out, x_t, t)

    def _split(self, out, x_t, t):
        # split_prediction without checks, for callers that checked x_t and t
        if self.prediction == "eps":
            return self._x0_from_eps(x_t, t, out), out.to(x_t.dtype)
        a, s = self._coef("sqrt_alphas_cumprod", t, x_t), self._coef("sqrt_one_minus_alphas_cumprod", t, x_t)
        if self.prediction == "x0":
            return out.to(x_t.dtype), ((x_t - a * out) / s).to(x_t.dtype)
        return (a * x_t - s * out).to(x_t.dtype), (s * x_t + a * out).to(x_t.dtype)

    def prediction_target(self, x0, eps, t, *, check_t=True):
        """What the network is trained to output for x_t = a x0 + s eps: eps, x0,
        or v = a eps - s x0; in x0's dtype. check_t as for split_prediction."""
        self._check(x0, t, "x0", check_range=check_t)
        check_same("eps", eps, "x0", x0)
        return self._target(x0, eps, t)

    def _target(self, x0, eps, t):
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x0
        a, s = self._coef("sqrt_alphas_cumprod", t, x0), self._coef("sqrt_one_minus_alphas_cumprod", t, x0)
        return (a * eps - s * x0).to(x0.dtype)

    def loss_weight(self, t):
        """(B,) float64: the weight w(t) of the squared x0 error |x0 - x0_hat|^2
        that training_loss minimises under this parameterisation: SNR for eps
        (L_simple), max(SNR, 1) for x0 (truncated SNR), SNR + 1 for v."""
        snr = self.snr.index_select(0, t)
        if self.prediction == "eps":
            return snr
        return snr.clamp(min=1.0) if self.prediction == "x0" else snr + 1.0

    def p_mean_variance(self, out, x_t, t, clip=True):
        """p(x_{t-1} | x_t) from the network output `out` (eps_hat for an eps model,
        see split_prediction): (mean, variance, log_variance), the variances
        (B, 1, ..., 1). clip: clip x0_hat to [-1, 1] first."""
        x0, _ = self.split_prediction(out, x_t, t)
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior(x0, x_t, t)
        logvar = self._coef("model_log_variance", t, x_t)
        return mean, logvar.exp(), logvar

    def p_sample_step(self, x_t, t, eps, noise=None, clip=True, generator=None):
        """x_{t-1} = mean + sigma_t z (Algorithm 2, line 4); no noise where t == 0.
        eps: the network output (eps_hat for an eps model; an x0 or v output is
        converted to eps_hat first, a pass the sampler tables do without).
        noise: z of x_t's shape, or None to draw it (from `generator` if given)."""
        self._check(x_t, t, "x_t")
        check_same("eps", eps, "x_t", x_t)
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return self._p_sample_step(x_t, t, eps, noise, clip)

    def _p_sample_step(self, x_t, t, eps, noise, clip=True):
        """p_sample_step without the host-side range check of t (no device sync):
        for callers that built t themselves, like the sampler loop."""
        if self.prediction != "eps":  # the fused op reads eps_hat
            eps = self._split(eps, x_t, t)[1]
        return ops.p_sample_step(x_t, t, eps, self.sqrt_recip_alphas_cumprod,
                                 self.sqrt_recipm1_alphas_cumprod, self.posterior_mean_coef1,
                                 self.posterior_mean_coef2, self.model_log_variance, noise, clip,
                                 check_range=False)

    # ---- training -------------------------------------------------------------
    def training_loss(self, model, x0, t=None, noise=None, generator=None, *, check_t=True):
        """With t ~ U{0..T-1} and eps ~ N(0, I), the mean over all elements of:
        eps: L_simple (the paper's eq. 14), (eps - model(x_t, t))^2, exactly as
        before the parameterisations; x0: max(SNR_t, 1) (x0 - model(x_t, t))^2;
        v: (v - model(x_t, t))^2 (= (SNR_t + 1) |x0 - x0_hat|^2). See loss_weight.
        check_t=False skips the range check of a given t (a host sync on a GPU),
        for callers that drew t themselves; a t drawn here is never checked."""
        check_float("x0", x0)
        own_t = t is None
        if own_t:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        self._check(x0, t, "x0", check_range=check_t and not own_t)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        check_same("noise", noise, "x0", x0)
        x_t = ops.q_sample(x0, t, noise, self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod,
                           check_range=False)  # checked by _check above, or drawn here
        out = model(x_t, t)
        if out.shape != x0.shape:
            raise ValueError(f"model output has shape {tuple(out.shape)}, expected {tuple(x0.shape)}")
        if self.prediction == "eps":
            # fp32 loss from a half-precision (autocast) output, never a half-precision noise
            return ops.simple_loss(out.float(), noise.float())
        dt = torch.float64 if x0.dtype == torch.float64 else torch.float32
        out, x0, noise = out.to(dt), x0.to(dt), noise.to(dt)
        if self.prediction == "v":
            return ops.simple_loss(out, self._target(x0, noise, t))
        return (_bcast(self.loss_weight(t), x0) * (out - x0).square()).mean()

    # ---- likelihood -----------------------------------------------------------
    def prior_bpd(self, x0):
        """KL(q(x_T | x0) || N(0, I)) per image, in bits/dim."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x0.device)
        mean, _, logvar = self.q_mean_variance(x0.to(torch.float64 if x0.dtype == torch.float64 else torch.float32), t)
        kl = normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(mean))
        return kl.flatten(1).mean(1) / math.log(2.0)

    def vb_term_bpd(self, model, x0, x_t, t, clip=True):
        """One VLB term per image in bits/dim: the decoder NLL -log p(x0 | x_1)
        where t == 0, else KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))."""
        out = model(x_t, t)
        true_mean, _, true_logvar = self.q_posterior(x0, x_t, t)
        mean, _, logvar = self.p_mean_variance(out.to(x_t.dtype), x_t, t, clip=clip)
        kl = normal_kl(true_mean.float(), true_logvar, mean.float(), logvar).flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0.float(), mean.float(), 0.5 * logvar)
        nll = nll.flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    @torch.no_grad()
    def vlb_terms(self, model, x0, clip=True, generator=None, progress=False):
        """The full VLB of x0 (B, ...) in bits/dim: {"prior": (B,), "terms": (B, T),
        "total": (B,)} with total = prior + terms.sum(1); terms[:, 0] is the
        decoder NLL. Costs T network evaluations."""
        self._check(x0, torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device), "x0")
        B, T = x0.shape[0], self.num_timesteps
        terms = torch.empty(B, T, dtype=torch.float64, device=x0.device)
        steps = range(T - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc="nll", total=T)
        for i in steps:
            t = torch.full((B,), i, dtype=torch.long, device=x0.device)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = self.q_sample(x0, t, noise)
            terms[:, i] = self.vb_term_bpd(model, x0, x_t, t, clip=clip).double()
        prior = self.prior_bpd(x0).double()
        return {"prior": prior, "terms": terms, "total": prior + terms.sum(1)}

    def nll_bpd(self, model, x0, clip=True, generator=None, progress=False):
        """Negative log-likelihood bound (the full VLB) per image, in bits/dim."""
        return self.vlb_terms(model, x0, clip=clip, generator=generator, progress=progress)["total"]
