"""CUDA graphs for the fixed-shape pieces of a sampler's round: many small kernels, one launch.

A speculative round launches ~100 small kernels around one model call; on a GPU their launch cost, not
their arithmetic, is what a round spends outside the model. ``Graphs`` captures a piece the second time its
key (e.g. the window length) comes up and replays it after that:

    graphs = for_tensor(x, enabled=True)                  # CUDA graphs on CUDA tensors, else a plain call
    out = graphs(("draft", Lmax), lambda: draft(state))   # eager 1st time, captured 2nd, replayed after

The first use runs eagerly (it warms up lazy library state, which must not happen during a capture); the
second captures and then replays once, so every call does the work exactly once. The piece must be
deterministic in its Python control flow for a given key, must not synchronise with the host (no
``.item()``, ``nonzero``, ``bool(tensor)``), must read its inputs from tensors that stay the same objects
(update state in place), and its outputs are the captured tensors, overwritten by every replay. Keys
with the same ``group`` (one round's pieces, always replayed in capture order) share a memory pool; other
groups get their own, so replaying groups in any order is safe. Disabled (CPU), it just calls the function.

The contract is easy to break silently (a piece that reads a tensor the sampler rebinds replays the old one),
and CI has no GPU, so ``emulate=True`` keeps the same contract on the CPU: the second use records the
piece's aten ops (tensors it reads held by reference, Python control flow frozen, just as in a capture)
and later uses replay the record instead of the Python, writing into the first outputs in place.
Tests switch it on with ``graphs.EMULATE = True``; a sampler that passes them replays what it ran eagerly.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from specflow.sampling.opcount import waits_for_device

EMULATE = False  # on CPU tensors, emulate capture and replay (tests); CUDA tensors always use CUDA graphs


def for_tensor(x: torch.Tensor, enabled: bool) -> "Graphs":
    """CUDA graphs for pieces working on tensors like ``x`` where asked for (emulated on the CPU if EMULATE)."""
    return Graphs(enabled and (x.is_cuda or EMULATE), emulate=not x.is_cuda)


class Graphs:
    def __init__(self, enabled: bool, emulate: bool = False):
        self.enabled, self.emulate = enabled, emulate
        self.seen: set = set()
        self.captured: dict = {}  # key -> (graph, outputs of the capture)
        self.pools: dict = {}  # group -> memory pool

    def __call__(self, key: Hashable, fn: Callable, group: Hashable = None):
        if not self.enabled:
            return fn()
        if key in self.captured:
            graph, out = self.captured[key]
            if self.emulate:
                for dst, src in zip(_tensors(out), graph.replay(_tensors(out))):
                    dst.copy_(src)
            else:
                graph.replay()
            return out
        if key not in self.seen:
            self.seen.add(key)
            return fn()
        if self.emulate:  # record = capture; recording also runs the piece once
            with _Record() as graph:
                out = fn()
            self.captured[key] = (graph, out)
            return out
        graph = torch.cuda.CUDAGraph()
        if group not in self.pools:
            self.pools[group] = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pools[group]):
            out = fn()
        self.captured[key] = (graph, out)
        graph.replay()  # the capture only recorded the kernels
        return out


def _tensors(out) -> list:
    """The tensors of a piece's output (None, a tensor, a dataclass of tensors, or a list/tuple of them)."""
    if out is None:
        return []
    if isinstance(out, torch.Tensor):
        return [out]
    if dataclasses.is_dataclass(out):
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    return [t for o in out for t in _tensors(o)]


class _Record(TorchDispatchMode):
    """The aten ops a piece runs, with the tensors they read held by reference; ``replay`` runs them again,
    each reading the replay's own results where the record read an earlier op's (a CPU CUDA-graph)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if waits_for_device(func, args):  # what a CUDA capture refuses
            raise RuntimeError(f"a captured piece must not wait for the device, but it ran {func}; move it out "
                               f"of the piece (plan on the host) or use a fixed-shape form (torch.where)")
        out = func(*args, **(kwargs or {}))
        self.ops.append((func, args, kwargs or {}, out))  # keeps every recorded tensor alive: ids stay unique
        return out

    def replay(self, outputs: list) -> list:
        now: dict = {}  # id(recorded result) -> this replay's result

        def sub(a):
            return now.get(id(a), a) if isinstance(a, torch.Tensor) else a
        for func, args, kwargs, out in self.ops:
            res = func(*tree_map(sub, args), **tree_map(sub, kwargs))
            for o, r in zip(tree_leaves(out), tree_leaves(res)):
                if isinstance(o, torch.Tensor):
                    now[id(o)] = r
        return [sub(t) for t in outputs]
