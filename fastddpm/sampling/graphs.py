"""CUDA-graph runner: one captured denoising step replayed for every step.

A step (network forward + ops.sample_step + the in-place advance of the step
index and of the Philox offset, all on the device) is captured once per
(model, batch shape, device, precision, clip, sampler plan) and replayed
plan.steps times per batch; a new batch only refills the captured buffers
(x_T, step = 0, rng, history). Graphs are kept in a small LRU cache (each holds
a memory pool of one forward's activations); a runner kept by the caller keeps
them across sample() calls (the trainer's grids and in-training FIDs). The key
holds the addresses of the model's parameters and buffers, so a model whose
tensors moved (or a new model at a reused id) is captured afresh, never
replayed on freed memory.

Graphed == eager, bit for bit: a replay runs exactly the kernels that one eager
step launches, on the same inputs at the same addresses, and every one of them
is deterministic (our kernels use no atomics; cuDNN/cuBLAS pick their
algorithms by shape, not by timing, unless torch.backends.cudnn.benchmark is
set, which can pick different ones inside and outside a capture). The GPU
tests assert torch.equal.

Capture can fail (out of memory, an op that synchronises): the runner then
says so once and the caller runs the batch eagerly.
"""
from collections import OrderedDict

import torch

from fastddpm.sampling.step import StepState, denoise_step


def _tensor_addresses(model):
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))


class CudaGraphRunner:
    def __init__(self, max_graphs=2, log=print):
        self.max_graphs = max_graphs
        self.log = log
        self.disabled = None          # the reason capture failed, once it has
        self._cache = OrderedDict()   # key -> (graph, state)

    def __len__(self):
        return len(self._cache)

    def run(self, model, plan, shape, device, precision, clip, seed, first_sample, bar=None):
        """Run one batch from captured steps; returns its StepState, or None when
        capture is not possible (the caller then samples eagerly)."""
        if self.disabled is not None:
            return None
        key = (id(model), _tensor_addresses(model), tuple(shape), str(device), precision, bool(clip), plan.key)
        entry = self._cache.get(key)
        if entry is None:
            try:
                entry = self._capture(model, plan, shape, device, precision, clip, seed, first_sample)
            except Exception as e:   # noqa: BLE001 - any capture failure falls back to eager
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                self.disabled = f"{type(e).__name__}: {msg}"
                self.log(f"cuda graphs: capture failed ({self.disabled}); sampling eagerly")
                self._cache.clear()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.empty_cache()
                return None
            self._cache[key] = entry
            while len(self._cache) > self.max_graphs:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        graph, state = entry
        state.reset(seed, first_sample)
        for _ in range(plan.steps):
            graph.replay()
            if bar is not None:
                bar.update(1)
        return state

    def _capture(self, model, plan, shape, device, precision, clip, seed, first_sample):
        state = StepState.allocate(plan, shape, device)
        state.reset(seed, first_sample)
        graph = self._record(lambda: denoise_step(model, state, precision, clip), device)
        return graph, state      # run() resets the state the warm-up step advanced

    @staticmethod
    def _record(step, device):
        """A CUDA graph of one call of `step`, after one warm-up call on a side
        stream (Triton compilation, cuDNN/cuBLAS handles and workspaces must
        exist before capture)."""
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):     # records only: the buffers keep their values
            step()
        return graph
