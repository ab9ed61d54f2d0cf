"""What a sampler asks of the device, counted by dispatch: ops that launch kernels (aten ops other than views
and bare allocations; a fused op may still launch a few) and the ops that make the host wait for the
device (syncs). Counting dispatches is device-independent, so a CPU run shows where a
GPU run would launch kernels and where it would stall (CUDA graphs, when they replay, launch fewer).

    counter = OpCounter()
    with counter:
        sampler.sample(counter.exclude(model), noise)   # the model's own ops are not the sampler's
    counter.ops, counter.syncs, counter.calls["Evaluator.fetch"]

Code that works on host tensors by design (a round's plan, the bandit, ``Evaluator.fetch``) is marked
``@host_side``: its calls are counted, its ops are not (on a GPU they never touch the device; a fetch is
one device-to-host copy, i.e. one sync, by design).
"""
from __future__ import annotations

import contextlib
import functools
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# Ops whose CUDA kernels must report a value (or a size) to the host before the host can go on.
NO_KERNEL = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default}
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
           aten.masked_select.default, aten.equal.default, aten.repeat_interleave.Tensor,
           aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default}
_ACTIVE: list["OpCounter"] = []


def host_side(fn):
    """Mark a function that runs on host tensors by design: active OpCounters count its calls, not its ops."""
    name = fn.__qualname__

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if not _ACTIVE:
            return fn(*args, **kwargs)
        counter = _ACTIVE[-1]
        counter.calls[name] += 1
        with counter.paused():
            return fn(*args, **kwargs)
    return wrapped


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.syncs, self.calls = 0, [], Counter()
        self._pause = 0

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._pause:
            self.ops += not (func.is_view or func in NO_KERNEL)
            if func in SYNCING or _mask_indexing(func, args):
                self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def paused(self):
        self._pause += 1
        try:
            yield
        finally:
            self._pause -= 1

    def exclude(self, model):
        """``model`` with its own ops left out of the count."""
        def call(*args, **kwargs):
            with self.paused():
                return model(*args, **kwargs)
        for attr in ("features", "output"):  # trunk access for drafters that read features
            if callable(getattr(model, attr, None)):
                setattr(call, attr, self.exclude(getattr(model, attr)))
        return call


def _mask_indexing(func, args) -> bool:  # x[mask] and x[mask] = y find their rows with a nonzero
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return False
    return any(i is not None and i.dtype == torch.bool for i in args[1])
