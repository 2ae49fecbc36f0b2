"""Progressive distillation measured (issue 25, item 4): FID of a tiny teacher at
its full ancestral steps, its training-free samplers at 4 and 8 NFE, and its
distilled students at 8, 4, 2 and 1 steps, with the distillation's wall time.
Not a timed test: a script whose stages cache their results, so a long
measurement on a busy machine can be stopped and continued.

    python benchmarks/distill_fid.py --teacher runs/teacher --run runs/distill all

Stages (each skips what its log already holds): `distill` runs (or resumes)
python -m fastddpm.distill and records its wall time; `ref` writes the
reference statistics of --ref-n images of the teacher's training data (the
embedded shapes by default; a seeded subset); `fid` scores each configuration
in priority order (--only LABEL,... picks some) and appends one JSON line per
result to --log; `table` writes --out from the log. `all` = the four.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fastddpm import evaluate, loader  # noqa: E402
from fastddpm.data import open_dataset  # noqa: E402

TEACHER_SAMPLERS = ("ddim", "dpmpp2m", "dpmpp3m", "unipc", "ipndm")


def configs(args):
    """(label, checkpoint, sampler keywords, NFE) in the order they are scored."""
    run = args.run
    student = lambda n: (f"student-{n}", os.path.join(run, f"student-{n:04d}.pt"), {}, n)  # noqa: E731
    teacher = lambda s, n: (f"teacher-{s}-{n}", args.teacher, {"sampler": s, "steps": n}, n)  # noqa: E731
    T = loader.load_for_sampling(args.teacher)[1].num_timesteps
    out = [student(4), (f"teacher-ddpm-{T}", args.teacher, {"sampler": "ddpm", "steps": T}, T)]
    out += [teacher(s, 4) for s in TEACHER_SAMPLERS]
    out += [student(8), student(2), student(1)]
    out += [teacher(s, 8) for s in TEACHER_SAMPLERS]
    if args.convert_iters:
        out.append(student(args.start_steps))  # the conversion round's: the teacher's start grid, re-parameterised
    out.append((f"teacher-ddim-{args.start_steps}-grid", args.teacher, {"sampler": "ddim", "grid": args.start_steps},
                args.start_steps))
    return out


def read_log(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def append_log(path, rec):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


def distill_args(args):
    return ["--start-steps", str(args.start_steps), "--final-steps", str(args.final_steps),
            "--round-iters", str(args.round_iters),
            "--convert-iters", str(args.convert_iters), "--lr", str(args.lr), "--no-progress"]


def stage_distill(args):
    final = os.path.join(args.run, f"student-{args.final_steps:04d}.pt")
    if os.path.exists(final):
        return
    resume = os.path.isdir(args.run) and any(n.startswith("ckpt-") for n in os.listdir(args.run))
    cmd = [sys.executable, "-m", "fastddpm.distill"] + (
        ["--resume", args.run, "--no-progress"] if resume else ["--teacher", args.teacher, "--out", args.run]
        + distill_args(args))
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT)
    append_log(args.log, {"what": "distill", "command": " ".join(cmd[1:]), "rc": rc,
                          "seconds": time.perf_counter() - t0, "load": os.getloadavg()[0],
                          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    if rc != 0:
        raise SystemExit(f"distillation exited {rc}: continue with the same command")


def ref_path(args):
    """Beside the run folder (32 MiB of float64: not for the repository)."""
    return os.path.abspath(args.run).rstrip("/") + f"-ref{args.ref_n}.npz"


def stage_ref(args):
    path = ref_path(args)
    if os.path.exists(path):
        return
    ckpt = loader.load(args.teacher)
    train = (ckpt.get("config") or {}).get("train") or {}
    data = open_dataset(train.get("data"), ckpt["config"]["model"]["image_size"])
    idx = np.random.default_rng(0).permutation(len(data))[:args.ref_n]
    images = data[idx].numpy()
    t0 = time.perf_counter()
    mu, sigma = _moments(images)
    stats = evaluate.Stats(mu, sigma, len(images), source=f"{data.source}, {len(images)} seeded")
    evaluate.save_stats(path, stats)
    append_log(args.log, {"what": "ref", "n": len(images), "source": data.source, "seconds": time.perf_counter() - t0})


def _moments(images):
    from fastddpm.inception import load_inception
    net = load_inception(None, "cpu")
    with torch.no_grad():
        feats = torch.cat([net(torch.from_numpy(u).permute(0, 3, 1, 2)) for u in np.array_split(images, -(-len(images) // 200))])
    f = feats.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def stage_fid(args):
    from fastddpm.training.distill import grid
    done = {r["label"] for r in read_log(args.log) if r.get("what") == "fid" and r.get("n") == args.n}
    todo = configs(args)
    if args.only:  # in the order given
        by_label = {c[0]: c for c in todo}
        todo = [by_label[k] for k in args.only.split(",")]
    for label, path, kw, nfe in todo:
        if label in done or label in {r["label"] for r in read_log(args.log) if r.get("what") == "fid"
                                      and r.get("n") == args.n}:  # another process may have scored it
            continue
        if not os.path.exists(path):
            print(f"skip {label}: {path} missing", flush=True)
            continue
        model, diffusion, ckpt = loader.load_for_sampling(path)
        kw = dict(kw)
        rec = (ckpt.get("config") or {}).get("sampling") or {}
        if "grid" in kw:
            kw["timesteps"] = grid(diffusion.num_timesteps, kw.pop("grid"))
        elif not kw:  # a student: ddim on its recorded grid
            kw = {"sampler": rec["sampler"], "timesteps": rec["timesteps"]}
        r = evaluate.score_model(model, diffusion, args.n, ref_path(args), batch_size=250, seed=0, device="cpu", **kw)
        append_log(args.log, {"what": "fid", "label": label, "nfe": nfe, "fid": r["fid"], "n": r["n"],
                              "seconds": r["seconds"], "sample_seconds": r["sample_seconds"],
                              "load": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})


def stage_table(args):
    log = read_log(args.log)
    fids = {r["label"]: r for r in log if r.get("what") == "fid" and r.get("n") == args.n}
    dist = [r for r in log if r.get("what") == "distill"]
    lines = [f"Progressive distillation on the 2-core CPU (benchmarks/distill_fid.py), {time.strftime('%Y-%m-%d')}",
             f"teacher: {args.teacher}; students: {args.run} (start grid {args.start_steps}, --round-iters "
             f"{args.round_iters}, --convert-iters {args.convert_iters}, --lr {args.lr}); FID of n = {args.n} samples (seed 0) against {ref_path(args)}",
             "", "| model | sampler | NFE | FID | seconds (sampling + Inception) |", "|---|---|---|---|---|"]
    for label, _, kw, nfe in configs(args):
        r = fids.get(label)
        what = "ddim, distilled grid" if label.startswith("student") else kw.get("sampler", "") + (
            " (distillation's start grid)" if "grid" in kw else "")
        lines.append(f"| {label.split('-')[0]} | {what} | {nfe} | "
                     + (f"{r['fid']:.2f} | {r['seconds']:.0f} (load {r['load']:.1f}) |" if r else "not run | |"))
    for teacher_nfe in (4, 8):
        got = [(fids[f"teacher-{s}-{teacher_nfe}"]["fid"], s) for s in TEACHER_SAMPLERS
               if f"teacher-{s}-{teacher_nfe}" in fids]
        if got:
            lines.append(f"best training-free teacher sampler at {teacher_nfe} NFE: {min(got)[1]} ({min(got)[0]:.2f}) "
                         f"of {len(got)} tried")
    for r in dist:
        lines.append(f"distillation: {r['command']} -> exit {r['rc']} in {r['seconds']:.0f} s wall "
                     f"(load {r['load']:.1f}, {r['date']})")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("distill", "ref", "fid", "table", "all"))
    p.add_argument("--teacher", required=True, help="the teacher checkpoint or run folder")
    p.add_argument("--run", required=True, help="the distillation's run folder")
    p.add_argument("--start-steps", type=int, default=32)
    p.add_argument("--final-steps", type=int, default=1)
    p.add_argument("--round-iters", type=int, default=300)  # the tiny run below: 2,500 updates in all
    p.add_argument("--convert-iters", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n", type=int, default=1000, help="samples per FID")
    p.add_argument("--ref-n", type=int, default=1000, help="data images in the reference statistics")
    p.add_argument("--only", default=None, help="comma-separated labels to score, in this order (default all, in priority order)")
    day = time.strftime("%Y-%m-%d")
    p.add_argument("--log", default=os.path.join(ROOT, "benchmarks", "results", f"distill-{day}.jsonl"))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", f"distill-{day}.txt"))
    args = p.parse_args()
    torch.set_num_threads(1)
    stages = ("distill", "ref", "fid", "table") if args.stage == "all" else (args.stage,)
    for s in stages:
        globals()[f"stage_{s}"](args)


if __name__ == "__main__":
    main()
