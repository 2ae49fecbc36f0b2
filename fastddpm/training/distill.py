"""Progressive distillation (Salimans & Ho, ICLR 2022, Algorithm 2) on the
Trainer: a student learns to take in ONE deterministic (DDIM) step what its
teacher takes in two; then it becomes the teacher and the step count halves.

The time grids. A run starts from a teacher grid of N0 = 2^k steps (N0 <= T)
and halves it until --final-steps. The grid of N steps is the integer
timesteps s_j = floor(j T / N + 1/2) - 1, j = N..1 (time-uniform, the first
at T - 1; "trailing" spacing rounded half up), followed by the clean end
s_0 (abar = 1). Since s_{2j} of the 2N grid equals s_j of the N grid
(floor(2jT / 2N + 1/2) = floor(jT / N + 1/2)), every halving keeps every
other point: each student step j -> j-1 spans exactly the two teacher steps
2j -> 2j-1 -> 2j-2, all on integer timesteps the network was trained on
(no fractional t is ever asked of it). This is why N0 is a power of two.

The round target (Algorithm 2). For a data image x, a grid point j ~ U{1..N}
and noise e: z = a x + s e at t = s_j (a = sqrt(abar_t), s = sqrt(1 - abar_t));
the teacher's two DDIM steps (eta 0, x0_hat clipped to [-1, 1] as its DDIM
sampler does), to t' = mid point and t'' = s_{j-1}:
    z'  = a' x1 + (s' / s) (z - a x1),     x1 = x0_hat_teacher(z, t)
    z'' = a'' x2 + (s'' / s') (z' - a' x2), x2 = x0_hat_teacher(z', t')
and the x that makes one student DDIM step from (z, t) land on z'':
    x~ = (z'' - (s'' / s) z) / (a'' - (s'' / s) a)   (= z'' at the clean end).
The loss is the truncated-SNR weighted x error max(SNR_t, 1) |x~ - x0_hat_student|^2
(mean over pixels and batch). A conversion round (factor 1) uses x~ = x1: the
student learns the teacher's own one-step DDIM map on the start grid.

Why the student predicts v (or x0), never eps: a few-step sampler must turn
pure noise into an image in one step, at t = T - 1 where a = sqrt(abar) is
~0.007 (the tiny preset) or ~0.006 (the paper's schedule); an eps output
gives x0_hat = (z - s eps_hat) / a, which multiplies every error of eps_hat
by s / a ~ 150. A many-step teacher barely relies on that x0_hat (each of its
steps moves z a little), a 1-4 step student relies on nothing else, and
distillation (which matches x, not eps) cannot even express its target
through it stably. v = a e - s x and x0 stay well conditioned at every t.

How an eps teacher becomes a v student: an eps network's output cannot be
reread as v (v = eps_hat / a - (s / a) z depends on z and t in a way no
layer of the network computes). The student starts from the teacher's
weights anyway (the features are what is worth keeping; at low noise, where
a ~ 1, v ~ eps - s x ~ eps, so the output is already nearly right) and a
conversion round first (--convert-iters, by default one round's iterations
when the parameterisations differ) trains it on the teacher's own one-step
DDIM map on the start grid, so that the first halving starts from a v model
of the same sampler rather than one wrong at high noise. Measured on the tiny
preset teacher (5,000 steps; 64 images per t, 2026-12-07): the eps weights
read as v give x0_hat off the teacher's by an MSE of 0.49 at abar = 0.235 and
0.013 at abar = 0.845 (the teacher's own error against the data: 0.053 and
0.003); after a 200-update conversion (lr 5e-4) 0.13 and 0.004, after 1,000
(lr 1e-3) 0.029 and 0.003. Its loss has a floor (~0.13 there): at the highest
noise the teacher's clipped x0_hat is a near-chaotic function of z that no
student fits, and it barely matters (its DDIM step multiplies it by ~a').

Every round writes its student (EMA weights) to OUT/student-NNNN.pt (NNNN its
steps); its config records the grid (config["sampling"]: sampler ddim,
timesteps, distilled_steps), which fastddpm.sample uses by default. The
resumable checkpoints OUT/ckpt-*.pt (the trainer's) also hold the teacher of
the current round; the next teacher is the finished round's EMA student, and
each round restarts Adam with the learning rate decaying linearly to 0 over
the round.
"""
import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from fastddpm import checkpoint as ckpt_io
from fastddpm.runtime import apply_memory_format, autocast
from fastddpm.training import distributed
from fastddpm.training.trainer import Trainer, _contiguous
from fastddpm.unet import UNet

STUDENT_PREDICTIONS = ("v", "x0")


def grid(T, N):
    """The N-step distillation grid: N integer timesteps, decreasing, from T - 1
    (s_j = floor(j T / N + 1/2) - 1, j = N..1; see the module docstring)."""
    if not 1 <= N <= T:
        raise ValueError(f"a grid of {N} steps needs 1 <= steps <= T = {T}")
    return [(2 * j * T + N) // (2 * N) - 1 for j in range(N, 0, -1)]


def is_power_of_two(n):
    return isinstance(n, int) and n >= 1 and n & (n - 1) == 0


@dataclass
class DistillConfig:
    """A distillation run's own settings (the Trainer's are a TrainConfig)."""
    teacher: str = ""             # the teacher checkpoint as given (absolute path)
    teacher_prediction: str = "eps"
    teacher_clip: bool = True     # the teacher's DDIM steps clip x0_hat (its sampler's setting)
    prediction: str = "v"         # the student's
    start_steps: int = 256
    final_steps: int = 4
    round_iters: int = 1000
    convert_iters: int = 0        # iterations of the conversion round (0: none)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown distillation config keys {sorted(unknown)}")
        return cls(**d)

    def rounds(self):
        """[(kind, student steps, first step, iterations)]: a "convert" round at
        start_steps when convert_iters, then one "distill" round per halving."""
        out, at = [], 0
        if self.convert_iters:
            out.append(("convert", self.start_steps, 0, self.convert_iters))
            at = self.convert_iters
        n = self.start_steps // 2
        while n >= self.final_steps:
            out.append(("distill", n, at, self.round_iters))
            at += self.round_iters
            n //= 2
        return out

    def total_iters(self):
        r = self.rounds()
        return r[-1][2] + r[-1][3]

    def round_of(self, step):
        """Index into rounds() of the round that update `step` (0-based) belongs to."""
        for i, (_, _, first, iters) in enumerate(self.rounds()):
            if step < first + iters:
                return i
        return len(self.rounds()) - 1


def validate_distill(d: DistillConfig, T):
    """Refuse settings that cannot run: a ValueError naming the flag."""
    if d.prediction not in STUDENT_PREDICTIONS:
        raise ValueError(f"--prediction must be v or x0, got {d.prediction!r} (an eps student cannot take "
                         "few steps: see python -m fastddpm.distill --help)")
    if not is_power_of_two(d.start_steps) or d.start_steps > T:
        raise ValueError(f"--start-steps must be a power of two <= T = {T} (so that every halving keeps "
                         f"integer timesteps), got {d.start_steps}")
    if not (isinstance(d.final_steps, int) and 1 <= d.final_steps < d.start_steps
            and d.start_steps % d.final_steps == 0 and is_power_of_two(d.start_steps // d.final_steps)):
        halvings = ", ".join(str(d.start_steps >> k) for k in range(1, int(math.log2(d.start_steps)) + 1))
        raise ValueError(f"--final-steps must be the starting grid's {d.start_steps} steps halved a whole "
                         f"number of times ({halvings}), got {d.final_steps}")
    if d.round_iters < 1:
        raise ValueError(f"--round-iters must be >= 1, got {d.round_iters}")
    if d.convert_iters < 0:
        raise ValueError(f"--convert-iters must be >= 0, got {d.convert_iters}")
    return d


# ---- the round target -----------------------------------------------------------------

def teacher_x0(teacher, diffusion, x, t, clip=True, precision="fp32"):
    """The teacher's x0_hat at (x, t) in x's dtype, clipped to [-1, 1] if clip."""
    with autocast(x.device, precision):
        out = teacher(x, t)
    x0, _ = diffusion.split_prediction(out.to(x.dtype), x, t, check_t=False)  # t from the grid: in range
    return x0.clamp(-1.0, 1.0) if clip else x0


def _col(v, x):
    return v.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def round_target(teacher, diffusion, z, j, coefs, factor=2, clip=True, precision="fp32"):
    """x~ of Algorithm 2 (module docstring) for z (B, ...) at the student grid
    points j (B,) (0-based: j = 0 is grid point 1, the step to the clean end);
    coefs: RoundGrid.coefs (on z's device). factor 1: the conversion target x1."""
    c = coefs.index_select(0, j)
    t, tm = c[:, 0].long(), c[:, 1].long()
    a, s, am, sm, an, sn = (_col(c[:, k], z) for k in range(2, 8))
    x1 = teacher_x0(teacher, diffusion, z, t, clip, precision)
    if factor == 1:
        return x1
    zm = am * x1 + (sm / s) * (z - a * x1)
    x2 = teacher_x0(teacher, diffusion, zm, tm, clip, precision)
    zn = an * x2 + (sn / sm) * (zm - am * x2)
    r = sn / s
    return (zn - r * z) / (an - r * a)


class RoundGrid:
    """The per-grid-point coefficients of one round: coefs (N, 8) float64 rows
    (t, t_mid, a, s, a_mid, s_mid, a_next, s_next) for student grid points
    j = 1..N (row j - 1) with a = sqrt(abar), s = sqrt(1 - abar); the next
    point of j = 1 is the clean end (a = 1, s = 0). Conversion rounds (factor
    1) have no mid point (its columns repeat t)."""

    def __init__(self, alphas_cumprod, N, factor=2):
        abar = np.asarray(alphas_cumprod, dtype=np.float64)
        T = len(abar)
        fine = grid(T, N * factor)[::-1]                   # increasing: fine point i + 1 at fine[i]
        ab = lambda i: 1.0 if i == 0 else abar[fine[i - 1]]  # noqa: E731  fine point i (0: clean)
        rows = []
        for j in range(1, N + 1):
            p, m, q = factor * j, factor * j - 1, factor * (j - 1)
            if factor == 1:
                m = p
            rows.append([fine[p - 1], fine[m - 1], math.sqrt(ab(p)), math.sqrt(1 - ab(p)), math.sqrt(ab(m)),
                         math.sqrt(1 - ab(m)), math.sqrt(ab(q)), math.sqrt(1 - ab(q))])
        self.N, self.factor = N, factor
        self.timesteps = grid(T, N)                        # the student's, decreasing
        self.coefs = torch.tensor(rows, dtype=torch.float64)


# ---- the trainer ------------------------------------------------------------------------

class DistillTrainer(Trainer):
    """The Trainer with the distillation's loss, learning rate, timestep draw and
    rounds. `teacher`: (UNet, GaussianDiffusion) of the teacher checkpoint for a
    new run (its EMA weights start the student); None when resuming (the
    checkpoint holds the round's teacher)."""

    def __init__(self, cfg, dcfg: DistillConfig, student_diffusion, teacher_diffusion, teacher=None,
                 resume=None, rank=0, world=1, log=print, resume_path=None):
        self.dcfg = dcfg
        self.teacher_diffusion_config = teacher_diffusion.config
        self.student_diffusion_config = student_diffusion.config
        self.round = 0
        self.teacher = UNet(cfg.model_config(teacher.config.in_channels if teacher is not None else
                                             resume["config"]["model"]["in_channels"]))
        super().__init__(cfg, resume=resume, rank=rank, world=world, log=log, resume_path=resume_path)
        self.diffusion = student_diffusion.to(self.device)
        self.teacher.requires_grad_(False).eval().to(self.device)
        apply_memory_format(self.teacher, cfg.memory_format, self.device)
        if resume is None:
            state = teacher.state_dict()
            self.teacher.load_state_dict(state)
            self.model.load_state_dict(state)
            self.ema.load_state_dict(state)
        self._set_round(self.round)

    # -- rounds --
    def _set_round(self, r):
        self.round = r
        kind, N, self.round_start, self.round_len = self.dcfg.rounds()[r]
        self.factor = 1 if kind == "convert" else 2
        # round 0 of a conversion reads the teacher's parameterisation; every later teacher is a student
        self.t_diffusion = self._teacher_diffusion(r)
        self.rgrid = RoundGrid(self.diffusion.alphas_cumprod.cpu().numpy(), N, self.factor)
        self.coefs = self.rgrid.coefs.to(self.device)

    def _teacher_diffusion(self, r):
        from fastddpm.diffusion import GaussianDiffusion
        cfg = self.teacher_diffusion_config if r == 0 else self.student_diffusion_config
        return GaussianDiffusion.from_config(cfg).to(self.device)

    def _enter_round(self, r):
        """The finished round's student (its EMA) becomes the teacher and the new
        student; Adam restarts. Deterministic in the state, so a resumed run
        enters a round exactly as an uninterrupted one."""
        self.write_student()  # the finished round's, unless already written
        state = self.ema.state_dict()
        self.teacher.load_state_dict(state)
        self.model.load_state_dict(state)
        self.opt = torch.optim.Adam(self.params, lr=self.lr_at(self.step), fused=True)
        self._set_round(r)

    def student_name(self):
        return f"student-{self.rgrid.N:04d}.pt"

    def write_student(self):
        """OUT/student-NNNN.pt: the current round's student, for sampling (rank 0;
        once per round: an existing file of this run is kept)."""
        path = os.path.join(self.cfg.out, self.student_name())
        if self.rank == 0 and not os.path.exists(path):
            state = {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "step": self.step,
                     "config": self.config_dict(), "model": _contiguous(self.model.state_dict()),
                     "ema": _contiguous(self.ema.state_dict())}
            ckpt_io.atomic_save(state, path)
        return path

    # -- the Trainer's hooks --
    def draw(self, step):
        """Grid points (0-based), noise and flips of global step `step` for this rank's slice."""
        B, b = self.cfg.batch_size, self.cfg.batch_size // self.world
        S, C = self.cfg.image_size, self.in_channels
        N = self.dcfg.rounds()[self.dcfg.round_of(step)][1]
        g = self._gen.manual_seed(distributed.mix_seed(self.cfg.seed, step, "batch"))
        j = torch.randint(0, N, (B,), generator=g, device=self.device)
        noise = torch.randn((B, C, S, S), generator=g, device=self.device)
        flip = torch.rand((B,), generator=g, device=self.device) < 0.5
        sl = slice(self.rank * b, (self.rank + 1) * b)
        return j[sl], noise[sl], flip[sl]

    def train_step(self, batch_uint8, t, noise, flip, lr):
        r = self.dcfg.round_of(self.step)
        if r != self.round:
            self._enter_round(r)
        super().train_step(batch_uint8, t, noise, flip, lr)

    def lr_at(self, step):
        """lr decaying linearly to 0 over each round (Adam restarts each round)."""
        _, _, first, iters = self.dcfg.rounds()[self.dcfg.round_of(step)]
        return self.cfg.lr * (1.0 - (step - first) / iters)

    def loss(self, x0, j, noise):
        """max(SNR, 1) |x~ - x0_hat|^2 at the student grid points j (module docstring)."""
        c = self.coefs.index_select(0, j)
        t = c[:, 0].long()
        a, s = _col(c[:, 2], x0), _col(c[:, 3], x0)
        z = a * x0 + s * noise
        with torch.no_grad():
            target = round_target(self.teacher, self.t_diffusion, z, j, self.coefs, self.factor,
                                  self.dcfg.teacher_clip, self.precision)
        out = self.net(z, t)
        x0_hat, _ = self.diffusion.split_prediction(out.float(), z, t, check_t=False)  # no host sync
        w = (c[:, 2] ** 2 / c[:, 3] ** 2).clamp(min=1.0).float()
        return (w * (x0_hat - target).square().flatten(1).mean(1)).mean()

    def _periodic(self, bar):
        super()._periodic(bar)
        _, _, first, iters = self.dcfg.rounds()[self.round]
        if self.step == first + iters:  # the round's last update: its student, at once
            self.on_rank0(self.write_student)

    # -- state --
    def config_dict(self):
        """The trainer's config with the student's diffusion, its grid (config["sampling"],
        read by fastddpm.sample) and the distillation's settings; the TrainConfig sits in
        config["distill"]["train"], so that fastddpm.train --resume refuses the run."""
        d = super().config_dict()
        d["diffusion"] = dict(self.student_diffusion_config)
        d["distill"] = {**self.dcfg.to_dict(), "train": d.pop("train"),
                        "teacher_diffusion": dict(self.teacher_diffusion_config)}
        d["sampling"] = {"sampler": "ddim", "timesteps": list(self.rgrid.timesteps), "distilled_steps": self.rgrid.N,
                         "clip": True}
        return d

    def state_dict(self):
        state = super().state_dict()
        state["train_state"]["distill"] = {"round": self.round, "teacher": _contiguous(self.teacher.state_dict())}
        return state

    def _load(self, ckpt):
        super()._load(ckpt)
        d = ckpt["train_state"]["distill"]
        self.teacher.load_state_dict(d["teacher"])
        self.round = int(d["round"])
