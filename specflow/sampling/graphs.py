"""CUDA graphs for the fixed-shape pieces of a sampler's round: many small kernels, one launch.

A speculative round launches ~100 small kernels around one model call; on a GPU their launch cost, not
their arithmetic, is what a round spends outside the model. ``Graphs`` captures a piece the second time its
key (e.g. the window length) comes up and replays it after that:

    graphs = Graphs(enabled=x.is_cuda)
    out = graphs(("draft", Lmax), lambda: draft(state))   # eager 1st time, captured 2nd, replayed after

The first use runs eagerly (it warms up lazy library state, which must not happen during a capture); the
second captures and then replays once, so every call does the work exactly once. The piece must be
deterministic in its Python control flow for a given key, must not synchronise with the host (no
``.item()``, ``nonzero``, ``bool(tensor)``), must read its inputs from tensors that stay the same objects
(update state in place), and its outputs are the captured tensors, overwritten by every replay. Keys
with the same ``group`` (one round's pieces, always replayed in capture order) share a memory pool; other
groups get their own, so replaying groups in any order is safe. Disabled (CPU), it just calls the function.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable

import torch


class Graphs:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.seen: set = set()
        self.captured: dict = {}  # key -> (graph, outputs of the capture)
        self.pools: dict = {}  # group -> memory pool

    def __call__(self, key: Hashable, fn: Callable, group: Hashable = None):
        if not self.enabled:
            return fn()
        if key in self.captured:
            graph, out = self.captured[key]
            graph.replay()
            return out
        if key not in self.seen:
            self.seen.add(key)
            return fn()
        graph = torch.cuda.CUDAGraph()
        if group not in self.pools:
            self.pools[group] = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pools[group]):
            out = fn()
        self.captured[key] = (graph, out)
        graph.replay()  # the capture only recorded the kernels
        return out
