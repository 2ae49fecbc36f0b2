"""The statistics behind FID, KID and IS, in float64, and their files.

Stats: mu, sigma accumulated batch by batch (Moments: Chan's pairwise update,
no E[x^2] - E[x]^2) over n images, optionally with a random subset of the
features (for KID). Files are .npz in pytorch-fid's layout (mu, sigma; plus n
and the kept features), untrusted when read (load_stats: shapes bounded from the
.npy headers before any array is read, sigma a finite symmetric PSD matrix).
FID's trace of sqrt(sigma1 sigma2) comes from symmetric eigendecompositions
(frechet_distance); KID: the unbiased MMD^2 over KID_SUBSETS subsets of
min(KID_SUBSET_SIZE, n) features (no spread when a set is used whole); IS:
IS_SPLITS splits (Salimans et al.). FID from fewer than 2048 samples has a
singular sample covariance and is biased upward; compare FIDs at equal n.
fastddpm.evaluate computes the features (the Inception pass) and is the CLI.
"""
import dataclasses
import os
from typing import Optional

import numpy as np
import torch

from fastddpm import data as data_mod
from fastddpm import files, limits

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
IS_SPLITS = 10
KID_FEATURES = 10_000  # features kept in a stats file for KID (float32, ~80 MB at 10k)


class EvaluateError(ValueError):
    """Unusable input to an evaluation; the message names the file and the problem."""


@dataclasses.dataclass
class Stats:
    """Inception statistics: mu (D,) and sigma (D, D) float64 over n images, and
    optionally a random subset of the (n, D) float32 features (for KID)."""
    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: Optional[np.ndarray] = None
    source: str = ""

    @property
    def dim(self):
        return self.mu.shape[0]


def save_stats(path, stats):
    """Write stats as .npz: mu, sigma (pytorch-fid's keys), n, and features if kept."""
    arrays = {"mu": stats.mu.astype(np.float64), "sigma": stats.sigma.astype(np.float64),
              "n": np.int64(stats.n)}
    if stats.features is not None:
        arrays["features"] = stats.features.astype(np.float32)
    try:
        files.write_atomic(path, lambda f: np.savez(f, **arrays))
    except OSError as e:
        raise EvaluateError(f"cannot write {path}: {e.strerror or e}") from None


def is_stats_file(path):
    """Whether `path` is an .npz holding 'mu' and 'sigma' (rather than images)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return "mu" in f.files and "sigma" in f.files
    except Exception:
        return False


def _check_stats_headers(path, headers):
    """Refuse, before any array is read (numpy allocates what a header declares),
    shapes and dtypes that are not statistics of at most limits.MAX_FEATURE_DIM features."""
    (mu, mu_t), (sigma, sigma_t) = headers["mu"], headers["sigma"]
    if len(mu) != 1 or sigma != (mu[0], mu[0]):
        raise EvaluateError(f"{path}: mu must be (D,) and sigma (D, D), got {mu} and {sigma}")
    if mu[0] > limits.MAX_FEATURE_DIM:
        raise EvaluateError(f"{path}: {mu[0]}-d features, above fastddpm's bound {limits.MAX_FEATURE_DIM} "
                            "(the Inception's pool features are 2048-d)")
    floats = lambda t: t.kind == "f" and t.itemsize <= 8  # noqa: E731
    if not all(t.kind == "f" and t.itemsize in (4, 8) for t in (mu_t, sigma_t)):  # float16 rounds away PSD-ness
        raise EvaluateError(f"{path}: mu and sigma must be float32 or float64, got {mu_t}, {sigma_t}")
    if "n" in headers and (headers["n"][0] != () or headers["n"][1].kind not in "iu"):
        raise EvaluateError(f"{path}: n must be one integer, got {headers['n'][1]} of shape {headers['n'][0]}")
    if "features" in headers:
        shape, dtype = headers["features"]
        if len(shape) != 2 or shape[1] != mu[0] or not floats(dtype):
            raise EvaluateError(f"{path}: features must be floating point (k, {mu[0]}), got {dtype} {shape}")
        if shape[0] > limits.MAX_KID_FEATURES:
            raise EvaluateError(f"{path}: {shape[0]} features, above fastddpm's bound {limits.MAX_KID_FEATURES}")


def check_covariance(sigma, where, stored=np.float64):
    """Refuse a sigma that is not symmetric and positive semi-definite up to the
    rounding of the dtype it was stored in: a tolerance tol = max(1e-6, 10 D eps)
    relative to its largest entry s. PSD within tolerance is a Cholesky factorization
    of sigma + tol s I in float64 (~1 s at 2048-d on the loaded 2-core CI machine,
    where an eigendecomposition took ~6 s); eigenvalues only to name a failure."""
    d = sigma.shape[0]
    tol = max(1e-6, 10 * d * float(np.finfo(stored).eps))
    scale = float(np.abs(sigma).max()) if sigma.size else 0.0
    asym = float(np.abs(sigma - sigma.T).max()) if sigma.size else 0.0
    if asym > tol * scale:
        raise EvaluateError(f"{where}: sigma is not symmetric (|sigma - sigma^T| reaches {asym:.3g}, its largest "
                            f"entry is {scale:.3g}): not a covariance")
    a = torch.from_numpy(np.ascontiguousarray(sigma, np.float64))
    a = (a + a.t()) / 2
    if d and torch.linalg.cholesky_ex(a + tol * max(scale, 1e-300) * torch.eye(d, dtype=a.dtype)).info != 0:
        w = torch.linalg.eigvalsh(a)
        raise EvaluateError(f"{where}: sigma is not positive semi-definite (eigenvalue {float(w.min()):.6g}, the "
                            f"largest is {float(w.max()):.6g}): not a covariance")


def load_stats(path):
    """Stats from an .npz with mu (D,) and sigma (D, D) (pytorch-fid's, or ours): shapes
    bounded before reading; mu finite, sigma a finite symmetric PSD matrix."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f.files or "sigma" not in f.files:
                raise EvaluateError(f"{path}: not a statistics file (no 'mu' and 'sigma' arrays; "
                                    f"it holds {f.files})")
            _check_stats_headers(path, {k: data_mod.npz_member_header(f, k, path)
                                        for k in ("mu", "sigma", "n", "features") if k in f.files})
            mu, sigma = f["mu"], f["sigma"]
            n = int(f["n"]) if "n" in f.files else 0
            feats = f["features"] if "features" in f.files else None
    except EvaluateError:
        raise
    except data_mod.DataError as e:  # a .npy header format numpy cannot read
        raise EvaluateError(str(e)) from None
    except Exception as e:
        raise EvaluateError(f"{path}: cannot read as .npz: {type(e).__name__}: {e}") from e
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise EvaluateError(f"{path}: mu or sigma holds NaN or inf")
    check_covariance(sigma, path, sigma.dtype)
    return Stats(mu.astype(np.float64), sigma.astype(np.float64), n, feats, source=os.fspath(path))


class Moments:
    """Running mean and scatter matrix in float64, merged batch by batch (Chan et al.)."""

    def __init__(self, dim, device):
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, x):
        x = x.double()
        nb = x.shape[0]
        mb = x.mean(0)
        xc = x - mb
        m2b = xc.t() @ xc
        n = self.n + nb
        delta = mb - self.mean
        self.m2 += m2b + torch.outer(delta, delta) * (self.n * nb / n)
        self.mean += delta * (nb / n)
        self.n = n

    def result(self):
        sigma = self.m2 / (self.n - 1)
        return self.mean.cpu().numpy(), sigma.cpu().numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2, device="cpu"):
    """FID = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)), in float64.

    tr(sqrt(S1 S2)) is the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix L^T S2 L with S1 = L L^T (similar to S1 S2), from two
    symmetric eigendecompositions (torch.linalg, float64, on `device`): no
    scipy.linalg.sqrtm and no complex parts. Singular covariances (fewer samples
    than dimensions) need no epsilon offset (pytorch-fid's fix for sqrtm):
    eigenvalues below the numerical rank tolerance (max * D * machine eps) count as 0."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise EvaluateError(f"statistics of different feature sizes: mu {mu1.shape} / {mu2.shape}, "
                            f"sigma {s1.shape} / {s2.shape}")
    eps = np.finfo(np.float64).eps
    a = torch.from_numpy(s1).to(device)
    b = torch.from_numpy(s2).to(device)
    w, v = torch.linalg.eigh((a + a.t()) / 2)  # S1 = V diag(w) V^T: L = V sqrt(w)
    w = torch.where(w > w.max().clamp_min(0) * w.numel() * eps, w, 0.0)
    lt = v.t() * w.sqrt()[:, None]
    m = lt @ b @ lt.t()
    ev = torch.linalg.eigvalsh((m + m.t()) / 2)
    # eigenvalues at rounding level (the null space of a singular S1 or S2) count as 0
    ev = torch.where(ev > ev.max().clamp_min(0) * ev.numel() * eps, ev, 0.0)
    tr_covmean = ev.sqrt().sum().item()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def check_kid_args(subsets, subset_size):
    """KID needs >= 1 subset of >= 2 features (else its mean is NaN or undefined)."""
    for name, v, lo in (("subsets", subsets, 1), ("subset size", subset_size, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise EvaluateError(f"KID {name} must be an int >= {lo}, got {v!r}")


def kernel_inception_distance(feats_a, feats_b, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE, seed=0,
                              device="cpu"):
    """KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
    k(x, y) = (x.y / d + 1)^3, averaged over `subsets` random subsets of
    m = min(subset_size, n_a, n_b) features of each set (without replacement), in
    float64. Returns (mean, std over subsets); the std is None when a set has no
    more than m features (its subsets would all be the whole set)."""
    check_kid_args(subsets, subset_size)
    a, b = np.asarray(feats_a), np.asarray(feats_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise EvaluateError(f"KID needs two (n, d) feature sets of the same d, got {a.shape} and {b.shape}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise EvaluateError(f"KID needs at least 2 features in each set, got {a.shape[0]} and {b.shape[0]}")
    # A set no larger than m enters every subset whole: the subsets' spread then leaves
    # out that set's sampling noise (it is 0 when both do), so no spread is reported.
    whole = m in (a.shape[0], b.shape[0])
    if m == a.shape[0] and m == b.shape[0]:
        subsets = 1  # every subset is the same pair of sets
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    ta = torch.from_numpy(a).to(device, torch.float64)
    tb = torch.from_numpy(b).to(device, torch.float64)
    scores = []
    for _ in range(subsets):
        x = ta[torch.from_numpy(rng.choice(a.shape[0], m, replace=False)).to(device)]
        y = tb[torch.from_numpy(rng.choice(b.shape[0], m, replace=False)).to(device)]
        kxx = (x @ x.t() / d + 1) ** 3
        kyy = (y @ y.t() / d + 1) ** 3
        kxy = (x @ y.t() / d + 1) ** 3
        mmd = ((kxx.sum() - kxx.diagonal().sum()) + (kyy.sum() - kyy.diagonal().sum())) / (m * (m - 1)) \
            - 2 * kxy.sum() / (m * m)
        scores.append(mmd.item())
    scores = np.asarray(scores)
    return float(scores.mean()), None if whole else float(scores.std())


def inception_score(probs, splits=IS_SPLITS):
    """IS = exp(E_x KL(p(y|x) || p(y))) per split of the (N, K) class probabilities (in
    order, as Salimans et al.), in float64. Returns (mean, std over splits)."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise EvaluateError(f"IS needs (N, K) class probabilities, got shape {p.shape}")
    if splits < 1 or p.shape[0] < splits:
        raise EvaluateError(f"IS with {splits} splits needs at least {splits} images, got {p.shape[0]}")
    n = p.shape[0]
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        py = part.mean(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(py)), 0.0)
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def softmax64(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def check_compatible(*stats):
    """Refuse statistics of another feature size (e.g. pytorch-fid --dims 768)."""
    for s in stats:
        if s.dim != 2048:
            raise EvaluateError(f"{s.source or 'statistics'}: {s.dim}-d features; fastddpm's Inception gives "
                                "the 2048-d pool features (pytorch-fid's default --dims 2048)")


def fid_kid(samples, ref, kid_subsets=KID_SUBSETS, kid_subset_size=KID_SUBSET_SIZE, seed=0, device="cpu"):
    """{'fid', 'kid', 'kid_std'} of two Stats; KID is None unless both kept features."""
    check_compatible(samples, ref)
    out = {"fid": frechet_distance(samples.mu, samples.sigma, ref.mu, ref.sigma, device), "kid": None, "kid_std": None,
           "n_samples": samples.n, "n_ref": ref.n}
    if samples.features is not None and ref.features is not None:
        out["kid"], out["kid_std"] = kernel_inception_distance(samples.features, ref.features, kid_subsets,
                                                               kid_subset_size, seed, device)
    return out
