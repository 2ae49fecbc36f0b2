"""The Trainer: UNet + GaussianDiffusion + data + Adam + EMA, one process of a
(possibly distributed) run, and its loop.

Everything a run does is a function of its TrainConfig (saved as config.json
beside the checkpoints and inside each checkpoint) and the step:
  * the data order: epoch permutations from (seed, epoch), global batch j takes
    positions [jB, (j+1)B), rank r of W its r-th slice (fastddpm.data);
  * the timesteps, noise and flips of step s: drawn for the whole global batch
    from a generator seeded with (seed, s), each rank keeping its slice;
  * dropout: the global torch RNG, seeded per rank and saved in checkpoints.
So a run stopped at step k and resumed is bit-identical on the CPU to one that
never stopped, and it can resume on a different number of ranks.

The training step is small and free of host synchronisation: non-finite
gradients skip the optimizer step and the EMA update on the device (fused Adam
reads a found_inf flag; fp16 uses torch.amp.GradScaler, which does the same),
and the counters are read only every --log-every steps. A stop signal (the CLI
sets Trainer.signal) saves a checkpoint and raises Stopped; a sample grid or
in-training FID in progress is abandoned at its next network call.
"""
import copy
import hashlib
import math
import os
import sys
import time

import torch
from tqdm.auto import tqdm

from fastddpm import checkpoint as ckpt_io
from fastddpm import data as data_mod
from fastddpm import evaluate
from fastddpm import files
from fastddpm.checkpoint import CheckpointError
from fastddpm.diffusion import GaussianDiffusion
from fastddpm.images import make_grid, save_grid, to_uint8
from fastddpm.runtime import apply_memory_format, autocast, compile_model, default_precision, local_rank, parse_device
from fastddpm.sampling import before_each_call, sample
from fastddpm.sampling.graphs import CudaGraphRunner
from fastddpm.training import curves, distributed
from fastddpm.training.tensorboard import TensorBoardLog
from fastddpm.training.config import TrainConfig, fid_steps, grid_restart, grid_steps, usable_cpus
from fastddpm.training.run_folder import RunFolder
from fastddpm.unet import UNet


def lr_at(cfg, step):
    """The paper's warm-up, lr * min(step / warmup, 1) (step = updates done so far), then
    with lr_anneal = f > 0 a half cosine from lr to 0 over the last f * steps updates."""
    lr = cfg.lr * (min(step / cfg.warmup, 1.0) if cfg.warmup > 0 else 1.0)
    start = cfg.steps * (1.0 - cfg.lr_anneal)
    if cfg.lr_anneal > 0 and step > start:
        lr *= 0.5 * (1.0 + math.cos(math.pi * min((step - start) / (cfg.steps - start), 1.0)))
    return lr


def _contiguous(state):
    """`state` (nested dicts/lists of tensors) with every tensor in plain row-major
    strides, so that checkpoints do not depend on the layout the network ran in
    (--memory-format). Not .contiguous(): a channels_last (C, K, 1, 1) weight already
    counts as contiguous but keeps strides (K, 1, K, K)."""
    if torch.is_tensor(state):
        plain = state.stride() == torch.empty(state.shape, device="meta").stride()
        return state if plain else state.clone(memory_format=torch.contiguous_format)
    if isinstance(state, dict):
        return {k: _contiguous(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_contiguous(v) for v in state)
    return state


def params_digest(model):
    h = hashlib.sha1()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        # flatten(): a channels_last (C, K, 1, 1) weight is "contiguous" with stride(-1) == K
        h.update(p.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class _SamplingStopped(Exception):
    """A stop signal arrived while writing a sample grid or scoring an in-training FID."""


class Stopped(Exception):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint."""

    def __init__(self, signum, step, path):
        super().__init__(f"stopped by signal {signum} at step {step}; checkpoint {path}")
        self.signum, self.step, self.path = signum, step, path


# ---- the trainer ---------------------------------------------------------------------

class Trainer:
    """UNet + GaussianDiffusion + data + Adam + EMA, one process of a (possibly
    distributed) run. `resume`: a loaded checkpoint dict to continue from, read
    from `resume_path`. train() (or prepare_out() first) takes the run folder's
    lock; close() releases it (main does)."""

    def __init__(self, cfg: TrainConfig, resume=None, rank=0, world=1, log=print, resume_path=None):
        self.cfg, self.rank, self.world, self.log = cfg, rank, world, log
        self.resume_path = resume_path
        self.folder = RunFolder(cfg.out)  # rank 0 claims it (prepare_out) and holds its lock while training
        self.device = parse_device(cfg.device, default_index=local_rank())
        self.precision = cfg.precision or default_precision(self.device)
        self._warn_slow_settings()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if self.device.type == "cuda" and cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if cfg.batch_size % world:
            raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {world} ranks")

        self.dataset = data_mod.open_dataset(cfg.data, cfg.image_size)
        if getattr(self.dataset, "transparent", 0) and rank == 0:
            log(f"fastddpm.train: {self.dataset.transparent} of {len(self.dataset)} images have "
                "transparency: composited onto white (see fastddpm.data)")
        self.in_channels = self.dataset.image_shape[2]
        self.fingerprint = self.dataset.fingerprint()
        if len(self.dataset) < cfg.batch_size:
            raise data_mod.DataError(f"{cfg.data or 'embedded dataset'}: {len(self.dataset)} images, "
                                     f"fewer than the batch size {cfg.batch_size}")
        self.model_config = cfg.model_config(self.in_channels)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = UNet(self.model_config).to(self.device)
        self.memory_format = apply_memory_format(self.model, cfg.memory_format, self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion_config()).to(self.device)
        self.params = [p for p in self.model.parameters()]
        self.ema_params = [p for p in self.ema.parameters()]
        self.opt = torch.optim.Adam(self.params, lr=lr_at(cfg, 0), fused=True)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step = 0
        self._counters = torch.zeros(3, dtype=torch.int64, device=self.device)  # skipped, streak, max streak
        self._window = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, gnorm sum, finite n
        self._gen = torch.Generator(device=self.device)
        distributed.seed_rngs(cfg.seed, rank)
        self.graph_runner = CudaGraphRunner(log=log) if self.device.type == "cuda" else None  # kept: grids, FIDs
        if resume is not None:
            self._load(resume)
        self.net = distributed.data_parallel(self.model, self.device, world)
        self.net = compile_model(self.net, cfg.compile)  # checkpoints and the EMA use self.model
        self.signal = None  # set by SIGINT/SIGTERM handlers
        self.last_ckpt = self.last_samples = None  # (step, path) train() last wrote
        self.metrics = None  # the run's MetricsLog while train() runs (rank 0)
        self.tensorboard = None  # its TensorBoardLog then, with --tensorboard (rank 0)

    # -- setup --
    def _warn_slow_settings(self):
        """One line on stderr for settings that run but are far slower than the alternative."""
        if self.rank != 0:
            return
        warn = lambda m: print(f"fastddpm.train: warning: {m}", file=sys.stderr)  # noqa: E731
        cores = usable_cpus()
        if self.cfg.threads > cores:
            warn(f"--threads {self.cfg.threads} is more than the {cores} CPU cores this process may "
                 "use; oversubscribed compute threads wait on each other and can run orders of "
                 f"magnitude slower: use --threads {cores} or fewer (0: torch's default)")
        if self.device.type == "cpu" and self.precision == "fp16":
            warn("--precision fp16 on the CPU has no fast kernels and runs many times slower than "
                 "fp32: use --precision fp32 (or bf16 on a CPU with native bf16 support)")

    def _autocast(self):
        return autocast(self.device, self.precision)

    # -- the step --
    def draw(self, step):
        """Timesteps, noise and flips of global step `step` for this rank's slice."""
        B, b = self.cfg.batch_size, self.cfg.batch_size // self.world
        S, C = self.cfg.image_size, self.in_channels
        g = self._gen.manual_seed(distributed.mix_seed(self.cfg.seed, step, "batch"))
        t = torch.randint(0, self.diffusion.num_timesteps, (B,), generator=g, device=self.device)
        noise = torch.randn((B, C, S, S), generator=g, device=self.device)
        flip = torch.rand((B,), generator=g, device=self.device) < 0.5
        sl = slice(self.rank * b, (self.rank + 1) * b)
        return t[sl], noise[sl], flip[sl]

    def train_step(self, batch_uint8, t, noise, flip, lr):
        """One optimizer step on this rank's uint8 batch; no host synchronisation."""
        x0 = data_mod.to_model_input(batch_uint8, self.device, flip if self.cfg.flip else None)
        if self.cfg.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: earlier graph outputs are done
        self.opt.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.loss(x0, t, noise)
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.opt)
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=True)
        finite = torch.isfinite(gnorm)  # grads are all-reduced: the same on every rank
        for group in self.opt.param_groups:
            group["lr"] = lr
        if self.scaler.is_enabled():
            self.scaler.step(self.opt)  # skips on the device when the grads were not finite
            self.scaler.update()
        else:
            self.opt.found_inf = (~finite).float()  # fused Adam: no update where found_inf == 1
            try:
                self.opt.step()
            finally:
                del self.opt.found_inf
        self._ema_update(finite)
        nf = (~finite).long()
        c = self._counters
        c[0] += nf
        c[1] = (c[1] + 1) * nf
        c[2] = torch.maximum(c[2], c[1])
        loss = loss.detach().double()
        lossf = torch.isfinite(loss)
        self._window += torch.stack([torch.where(lossf, loss, 0.0), torch.where(finite, gnorm.double(), 0.0),
                                     (lossf & finite).double()])

    # -- what a subclass may replace (fastddpm.training.distill): the loss, the learning rate --
    def loss(self, x0, t, noise):
        """The training loss of a batch: L_simple at the timesteps `t` that draw() chose."""
        return self.diffusion.training_loss(self.net, x0, t, noise, check_t=False)  # t drawn in range

    def lr_at(self, step):
        """The learning rate of the update after `step` updates (lr_at)."""
        return lr_at(self.cfg, step)

    @torch.no_grad()
    def _ema_update(self, finite):
        """ema -= (1 - decay) * (ema - w), as tf.train.ExponentialMovingAverage; skipped steps keep it."""
        rate = torch.where(finite, 1.0 - self.cfg.ema_decay, 0.0).float()
        diff = torch._foreach_sub(self.ema_params, self.params)
        torch._foreach_mul_(diff, rate)
        torch._foreach_sub_(self.ema_params, diff)

    # -- state --
    def state_dict(self):
        """The checkpoint dict (see fastddpm.checkpoint); call on every rank (gathers RNG states)."""
        rngs = distributed.gather(distributed.rng_state(), self.world)
        digests = distributed.gather(params_digest(self.model), self.world)
        sampler = data_mod.ShardedBatchSampler(len(self.dataset), self.cfg.batch_size, self.cfg.seed,
                                               self.step, self.step)
        epoch, position = sampler.position(self.step)
        counters = self._counters.tolist()
        return {
            "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "step": self.step,
            "config": self.config_dict(),
            "model": _contiguous(self.model.state_dict()),
            "ema": _contiguous(self.ema.state_dict()),
            "train_state": {
                "optimizer": _contiguous(self.opt.state_dict()),
                "scaler": self.scaler.state_dict(),
                "rng": rngs,
                "data": {"seed": self.cfg.seed, "epoch": epoch, "position": position,
                         "steps_per_epoch": sampler.steps_per_epoch, "global_batch": self.cfg.batch_size,
                         "size": len(self.dataset), "image_shape": list(self.dataset.image_shape),
                         "fingerprint": self.fingerprint, "source": self.dataset.source},
                "counters": {"skipped": counters[0], "streak": counters[1]},
                "world_size": self.world,
                "param_digest_per_rank": digests,
            },
        }

    def config_dict(self):
        """The effective config: network, diffusion, the TrainConfig (device and precision as
        given, None meaning automatic) and what they resolved to in this run."""
        return {"model": self.model_config.to_dict(), "diffusion": self.diffusion.config,
                "train": self.cfg.to_dict(),
                "runtime": {"device": str(self.device), "precision": self.precision,
                            "memory_format": str(self.memory_format).removeprefix("torch."),
                            "world_size": self.world, "torch": torch.__version__}}

    def _load(self, ckpt):
        where = f"checkpoint at step {ckpt.get('step')}"
        cfg = ckpt.get("config") or {}
        if cfg.get("model") != self.model_config.to_dict():
            raise CheckpointError(f"{where}: its network {cfg.get('model')} differs from this run's "
                                  f"{self.model_config.to_dict()}")
        ts = ckpt["train_state"]
        d = ts["data"]
        if (d["size"], list(d["image_shape"]), d["fingerprint"]) != (
                len(self.dataset), list(self.dataset.image_shape), self.fingerprint):
            raise CheckpointError(f"{where}: it was trained on other data ({d['source']}: {d['size']} "
                                  f"images {d['image_shape']}, fingerprint {d['fingerprint']}); now "
                                  f"{self.dataset.source}: {len(self.dataset)} images "
                                  f"{list(self.dataset.image_shape)}, fingerprint {self.fingerprint}")
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ts["optimizer"])
        # Checkpoints hold contiguous tensors; fused Adam reads its state in the
        # parameter's memory order (a channels_last parameter with contiguous
        # moments is updated wrongly, silently), so give each moment p's strides.
        for p, st in self.opt.state.items():
            for k, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
        if self.scaler.is_enabled() and ts.get("scaler"):
            self.scaler.load_state_dict(ts["scaler"])
        self.step = int(ckpt["step"])
        self._counters = torch.tensor([ts["counters"]["skipped"], ts["counters"]["streak"],
                                       ts["counters"]["streak"]], dtype=torch.int64, device=self.device)
        rngs = ts["rng"]
        if self.rank < len(rngs):
            distributed.set_rng_state(rngs[self.rank])
        else:  # more ranks than the run that wrote it: fresh streams for the new ranks
            distributed.seed_rngs(distributed.mix_seed(self.cfg.seed, self.step, "resume"), self.rank)

    # -- reading the counters (every log_every steps) --
    def read_window(self):
        """Host copy of the window stats (summed over ranks) and counters; resets the window."""
        w = distributed.all_reduce_sum(self._window.clone(), self.world)
        loss_sum, gn_sum, n = w.tolist()
        skipped, streak, max_streak = self._counters.tolist()
        self._window.zero_()
        n_local = n / self.world
        return {"loss": loss_sum / n if n else float("nan"), "grad_norm": gn_sum / self.world / n_local
                if n_local else float("nan"), "skipped": int(skipped), "streak": int(streak),
                "max_streak": int(max_streak)}

    def check_finite_streak(self, stats=None):
        """Raise TrainingDiverged after --max-nonfinite consecutive skipped steps."""
        if stats is None:
            skipped, streak, max_streak = self._counters.tolist()
            stats = {"skipped": skipped, "streak": streak, "max_streak": max_streak}
        if stats["max_streak"] >= self.cfg.max_nonfinite:
            raise TrainingDiverged(
                f"training stopped at step {self.step}: {stats['max_streak']} consecutive steps had a "
                f"non-finite loss or gradient (--max-nonfinite {self.cfg.max_nonfinite}; {stats['skipped']} "
                f"skipped in all; precision {self.precision}"
                + (f", loss scale {self.scaler.get_scale():g}" if self.scaler.is_enabled() else "")
                + "). Skipped steps do not change the weights; the last checkpoint is intact. "
                "Try a lower --lr, --precision bf16/fp32, or a larger --grad-clip warm-up.")

    def stop_requested(self, sync):
        """Whether a SIGINT/SIGTERM arrived (on any rank: agreed at sync points under torchrun)."""
        if self.world == 1:
            return self.signal is not None
        if not sync:
            return False
        signum = distributed.agree_stop(self.signal, self.device)
        if signum and self.signal is None:
            self.signal = signum
        return bool(signum)

    # -- what runs between steps: rank 0's writes, the run folder, samples, FID --
    def on_rank0(self, fn, *args):
        """fn(*args) on rank 0 only, every rank learning whether it failed (distributed.on_rank0)."""
        return distributed.on_rank0(self.rank, self.world, fn, *args)

    def save(self):
        """Checkpoint (all ranks take part, rank 0 writes); returns the path."""
        state = self.state_dict()
        path = os.path.join(self.cfg.out, ckpt_io.checkpoint_name(self.step))
        self.on_rank0(self._write_checkpoint, state, path)
        return path

    def _write_checkpoint(self, state, path):
        ckpt_io.atomic_save(state, path)  # a failed write is a CheckpointError naming the file
        self.folder.prune(self.cfg.keep, self.step)

    def stop_check(self):
        """For sampling and scoring between steps (sample grids, in-training FID): a
        callable that raises _SamplingStopped once a SIGINT/SIGTERM has arrived, so the
        stop comes at the next network call, not minutes later. None under torchrun,
        where the ranks agree on a stop at sync points."""
        return None if self.world > 1 else self._raise_if_signalled

    def _raise_if_signalled(self):
        if self.signal is not None:
            raise _SamplingStopped

    def write_samples(self):
        """A PNG grid of EMA samples (rank 0); returns the path or None."""
        if self.rank != 0 or self.cfg.sample_n <= 0:
            return None
        with before_each_call(self.stop_check(), self.ema):
            x = sample(self.ema, self.diffusion, self.cfg.sample_n, batch_size=self.cfg.sample_batch,
                       seed=self.cfg.seed, device=self.device, precision=self.precision, progress=False,
                       sampler=self.cfg.sample_sampler, steps=grid_steps(self.cfg), restart=grid_restart(self.cfg),
                       threshold=self.cfg.sample_threshold, cuda_graphs=self.graph_runner)
        path = os.path.join(self.cfg.out, f"samples-{self.step:08d}.png")
        images = to_uint8(x)
        files.write_atomic(path, lambda f: save_grid(images, f))  # a reader never sees half a PNG
        if self.tensorboard is not None:
            self.tensorboard.image("samples", make_grid(images), self.step)
        self.draw_curves()
        return path

    def draw_curves(self):
        """Redraw OUT/curves.png from metrics.jsonl (rank 0, at each sample grid and at the
        end). The curves are derived data (`python -m fastddpm.plot` redraws them), so a
        failure costs one warning line, never the run."""
        if self.rank != 0:
            return
        try:
            curves.write_run_curves(self.cfg.out)
        except Exception as e:  # noqa: BLE001 - a plot must not stop training
            print(f"fastddpm.train: warning: {os.path.join(self.cfg.out, curves.CURVES)} not drawn: "
                  f"{type(e).__name__}: {e}", file=sys.stderr)

    def record_fid(self, bar=None):
        """In-training FID of the EMA model (evaluate.score_model; every rank samples a
        share), called by train(): rank 0 appends {"step", "fid", "fid_n", "fid_seconds",
        "fid_sampler"} to metrics.jsonl and shows it on the progress bar `bar`."""
        cfg = self.cfg
        steps = fid_steps(cfg)
        r = evaluate.score_model(self.ema, self.diffusion, cfg.fid_n, cfg.fid_ref, batch_size=cfg.sample_batch,
                                 seed=cfg.seed, device=self.device, precision=self.precision, rank=self.rank,
                                 world=self.world, sampler=cfg.fid_sampler, steps=steps,
                                 cuda_graphs=self.graph_runner, check_stop=self.stop_check())
        rec = {"step": self.step, "fid": r["fid"], "fid_n": r["n"], "fid_seconds": r["seconds"],
               "fid_sampler": f"{cfg.fid_sampler}-{steps}"}
        self.on_rank0(self._log, rec)
        if self.rank == 0 and bar is not None:
            postfix = getattr(bar, "postfix", None)  # a disabled bar (--no-progress) has none
            bar.set_postfix_str(f"{postfix + ', ' if postfix else ''}fid={r['fid']:.2f}", refresh=False)
            bar.write(f"step {self.step}: FID {r['fid']:.3f} ({r['n']} EMA samples, {r['seconds']:.0f} s)")

    def prepare_out(self):
        """Claim the run folder (rank 0; once; see RunFolder.claim): lock it, check it,
        write config.json and cut metrics.jsonl to the step this run starts from."""
        if self.rank == 0:
            self.folder.claim(self.config_dict(), self.resume_path, self.step)

    def close(self):
        """Close the TensorBoard log and release the run folder's lock."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        self.folder.close()

    # -- the loop --
    def train(self):
        """Run to cfg.steps. Returns a summary dict; raises TrainingDiverged, Stopped, DataError
        (an unreadable image, after saving), CheckpointError or OSError (a failed write); any
        other error between steps propagates after a checkpoint of the steps done."""
        cfg = self.cfg
        self.on_rank0(self.prepare_out)
        sampler = data_mod.ShardedBatchSampler(len(self.dataset), cfg.batch_size, cfg.seed,
                                               self.step, cfg.steps, self.rank, self.world)
        loader = data_mod.make_loader(self.dataset, sampler, cfg.workers, self.device.type == "cuda",
                                       seed=cfg.seed)
        start_step, t_start = self.step, time.perf_counter()
        self.last_ckpt = self.last_samples = None
        self.metrics = self.on_rank0(self.folder.metrics_log)  # rank 0: metrics.jsonl
        if cfg.tensorboard and self.rank == 0 and self.tensorboard is None:
            self.tensorboard = TensorBoardLog(cfg.out)  # open until close(): the final grid goes there too
        bar = tqdm(total=cfg.steps, initial=self.step, disable=self.rank != 0 or not cfg.progress,
                   desc="train", unit="step", dynamic_ncols=True, smoothing=0.05)
        stats = {"loss": float("nan"), "skipped": int(self._counters[0])}
        it = iter(loader)
        clock, in_step = _Clock(), False
        try:
            while self.step < cfg.steps:
                try:
                    batch = next(it)
                except data_mod.DataError as e:
                    raise self._data_error(e, start_step) from None
                except (RuntimeError, StopIteration):
                    if self.signal is not None:  # a worker died of the stop signal too: the stop
                        break
                    raise
                t, noise, flip = self.draw(self.step)
                in_step = True  # an error from here to the increment leaves a half-done step
                self.train_step(batch, t, noise, flip, self.lr_at(self.step))
                self.step += 1
                in_step = False
                clock.steps += 1
                bar.update(1)
                at_log = self.step % cfg.log_every == 0 or self.step == cfg.steps
                if at_log:
                    stats = self._log_window(clock, sampler, t_start, bar)
                if self.stop_requested(sync=at_log):
                    path = self.save()
                    bar.close()
                    raise Stopped(self.signal, self.step, path)
                pause = time.perf_counter()
                self._periodic(bar)
                clock.paused += time.perf_counter() - pause
        except Exception as e:
            if not in_step:  # between steps the state is consistent: keep the steps done
                self._save_after_error(e, start_step)
            raise
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
            del it
        return self._finish(start_step, t_start, clock, stats)

    def _log_window(self, clock, sampler, t_start, bar):
        """At a log step: the window's stats (read from the device: synchronises) into
        metrics.jsonl (rank 0) and the progress bar; TrainingDiverged past --max-nonfinite."""
        cfg = self.cfg
        stats = self.read_window()
        dt = clock.lap()
        ips = clock.steps * cfg.batch_size / dt if dt > 0 else float("nan")
        rec = {"step": self.step, "epoch": sampler.position(self.step - 1)[0],
               "loss": stats["loss"], "lr": self.lr_at(self.step - 1),
               "grad_norm": stats["grad_norm"], "images_per_s": ips,
               "loss_scale": self.scaler.get_scale() if self.scaler.is_enabled() else 1.0,
               "skipped_steps": stats["skipped"], "nonfinite_streak": stats["streak"],
               "window_steps": clock.steps, "elapsed_s": time.perf_counter() - t_start}
        self.on_rank0(self._log, rec)  # rank 0 holds metrics.jsonl
        bar.set_postfix(loss=f"{stats['loss']:.4f}", img_s=f"{ips:.0f}", skipped=stats["skipped"], refresh=False)
        clock.steps = 0
        self.check_finite_streak(stats)
        return stats

    def _log(self, record):
        self.metrics.write(record)
        if self.tensorboard is not None:
            self.tensorboard.record(record)

    def _periodic(self, bar):
        """After a step, what is due at this step: a checkpoint, a sample grid, an
        in-training FID. A stop signal while sampling or scoring stops now, saving the step."""
        cfg = self.cfg
        if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
            self.check_finite_streak()  # never checkpoint past a divergence
            self.last_ckpt = (self.step, self.save())
        try:
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self.last_samples = (self.step, self.on_rank0(self.write_samples))
            if cfg.fid_every and self.step % cfg.fid_every == 0:
                self.record_fid(bar)
        except _SamplingStopped:
            raise self._stop_now() from None

    def _finish(self, start_step, t_start, clock, stats):
        """After the loop: a stop signal's checkpoint and Stopped, or the final checkpoint
        and sample grid (unless this step has them) and the summary."""
        cfg = self.cfg
        if self.signal is not None and self.step < cfg.steps:
            path = self.save()
            raise Stopped(self.signal, self.step, path)
        if self._checkpoint_of_this_step() is None:
            self.last_ckpt = (self.step, self.save())
        if cfg.sample_n and (self.last_samples is None or self.last_samples[0] != self.step):
            try:
                self.last_samples = (self.step, self.on_rank0(self.write_samples))
            except _SamplingStopped:  # the checkpoint is written: stop now, not minutes later
                raise self._stop_now() from None
        if self.last_samples is None or self.last_samples[0] != self.step:
            self.draw_curves()  # else the grid just drew them
        steps_done = self.step - start_step
        return {"step": self.step, "steps": steps_done, "seconds": time.perf_counter() - t_start,
                "train_seconds": clock.train_time,
                "images_per_s": steps_done * cfg.batch_size / clock.train_time if clock.train_time > 0
                else float("nan"),
                "loss": stats["loss"], "skipped": stats["skipped"], "checkpoint": self.last_ckpt[1],
                "samples": self.last_samples[1] if self.last_samples else None}

    # -- stopping early --
    def _checkpoint_of_this_step(self):
        """The checkpoint train() wrote at the current step, or None."""
        return self.last_ckpt[1] if self.last_ckpt and self.last_ckpt[0] == self.step else None

    def _stop_now(self):
        """Stopped at the current step, saving it unless train() already did."""
        return Stopped(self.signal, self.step, self._checkpoint_of_this_step() or self.save())

    def _data_error(self, e, start_step):
        """A DataError met while training, after saving the steps done (single process)."""
        path = self._checkpoint_of_this_step()
        if path is None and self.world == 1 and self.step > start_step:
            path = self.save()
        then = (f"checkpoint {path} written; repair or replace the file (removing it makes other data, "
                f"a new run), then continue with --resume {self.cfg.out}" if path else
                f"no step trained since step {start_step}, nothing new saved; repair or replace the file")
        return data_mod.DataError(f"{e} (training stopped at step {self.step}; {then})")

    def _save_after_error(self, e, start_step):
        """Checkpoint the steps done before an unexpected error between steps (logging, a
        sample grid, in-training FID) propagates, and say so in a note on e. Not for errors
        that handle their own checkpoint (a stop, a divergence, a failed write, bad data), and
        single process only: under torchrun the other ranks would wait in the save's
        collectives."""
        if (isinstance(e, (Stopped, TrainingDiverged, CheckpointError, data_mod.DataError))
                or self.world > 1 or self.step == start_step):
            return
        path = self._checkpoint_of_this_step()
        if path is None:
            try:
                self.check_finite_streak()  # never checkpoint past a divergence
                path = self.save()
            except Exception as e2:
                e.add_note(f"fastddpm.train: no checkpoint written at step {self.step}: {e2}")
                return
        e.add_note(f"fastddpm.train: checkpoint {path} written at step {self.step}; continue with "
                   f"--resume {self.cfg.out}")


class _Clock:
    """Training time per log window: wall time less the pauses between steps
    (checkpoints, sample grids, in-training FID)."""

    def __init__(self):
        self.t0, self.paused, self.train_time = time.perf_counter(), 0.0, 0.0
        self.steps = 0  # steps in the current window

    def lap(self):
        """End the window: its training seconds."""
        dt = time.perf_counter() - self.t0 - self.paused
        self.t0, self.paused = time.perf_counter(), 0.0
        self.train_time += dt
        return dt
