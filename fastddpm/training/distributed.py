"""torchrun, and the process's random number generators: the one module of
training/ that calls torch.distributed. A single process is rank 0 of a world
of 1, where every function here is a plain call (no process group).

Work that rank 0 alone does (claiming the run folder, writing a checkpoint, a
sample grid or metrics.jsonl) runs through on_rank0, which tells every rank
whether it failed: the others stop with PeerFailed (one line each) instead of
failing later in a collective that rank 0 has left. A stop signal is agreed at
sync points (agree_stop): every rank stops at the same step."""
import hashlib
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fastddpm.runtime import local_rank


class PeerFailed(RuntimeError):
    """Under torchrun: rank 0 failed in work only it does (its run folder, a checkpoint
    write, a sample grid, metrics.jsonl); the other ranks stop with this instead of
    failing later in a collective that rank 0 has left."""


def init():
    """(rank, world) from torchrun's environment; initialises the process group
    (nccl on CUDA, else gloo). (0, 1) outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    rank = int(os.environ["RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return rank, world


def close(world):
    """Leave the process group init() joined."""
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def on_rank0(rank, world, fn, *args):
    """fn(*args) on rank 0 only; under torchrun every rank then learns (one broadcast,
    which also makes it a barrier) whether it raised: rank 0 re-raises its error, the
    other ranks raise PeerFailed. Returns fn's value on rank 0, None elsewhere."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn(*args)
        except Exception as e:  # noqa: BLE001  (re-raised below, after the others know)
            error = e
    if world > 1:
        box = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(box, src=0)
        if rank != 0 and box[0] is not None:
            raise PeerFailed(f"rank 0 failed: {box[0]}")
    if error is not None:
        raise error
    return result


def agree_stop(signum, device):
    """Under torchrun, at a sync point: the stop signal any rank received (the
    largest number), 0 when none did."""
    flag = torch.tensor([0 if signum is None else int(signum)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def gather(obj, world):
    """[obj of rank 0, ..., obj of rank world-1] on every rank (picklable objects)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor, world):
    """Sum `tensor` over the ranks, in place; returns it."""
    if world > 1:
        dist.all_reduce(tensor)
    return tensor


def data_parallel(model, device, world):
    """`model` wrapped in DistributedDataParallel under torchrun (gradients
    all-reduced in backward), itself in a single process."""
    if world == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def mix_seed(seed, step, stream):
    """A 63-bit seed for (seed, step, stream)."""
    h = hashlib.blake2b(f"{seed}/{step}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def rng_state():
    """The process's RNG states as tensors and plain ints (checkpoints load with
    weights_only=True, which refuses numpy arrays and arbitrary objects)."""
    version, internal, gauss = random.getstate()
    _, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                        "gauss": gauss},
             "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what rng_state() returned."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    np.random.set_state(("MT19937", npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_rngs(seed, rank):
    """Seed the process's Python, numpy and torch RNGs for this rank (dropout draws from torch's)."""
    s = mix_seed(seed, rank, "process")
    random.seed(s)
    np.random.seed(s % 2 ** 32)
    torch.manual_seed(s)
