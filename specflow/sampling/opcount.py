"""What a sampler asks of the device, counted by dispatch: ops that launch kernels (aten ops other than views
and bare allocations; a fused op may still launch a few) and the host syncs (device values read on the
host). Counting is device-independent, so a CPU run shows where a GPU run would launch kernels and where it
would stall (CUDA graphs, when they replay, launch fewer).

    counter = OpCounter()
    with counter:
        sampler.sample(counter.exclude(model), noise)   # the model's own ops are not the sampler's
    counter.ops, counter.syncs, counter.calls["Evaluator.fetch"]

A sync is a syncing op (``.item()``, ``nonzero``, boolean-mask indexing, …) or a copy to the host
(``.cpu()``, ``.tolist()``, ``.numpy()``, ``host.copy_(device)``) of a device tensor (``.to("cpu")`` is not
seen: on a CPU it cannot be told from ``.to(device)``). On a CPU every tensor is a host tensor, so
the counter tracks which ones stand for host data: those made by code marked ``@host_side`` (a round's plan,
the bandit, ``Evaluator.fetch``) and whatever is computed from them alone. Their ops are not counted and
reading them is not a sync; a ``@host_side`` call is counted by name (a fetch is one sync, by design; its
two or three packing kernels are not in ``ops``).
"""
from __future__ import annotations

import contextlib
import functools
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten
NO_KERNEL = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default}
# Ops whose CUDA kernels must report a value (or a size) to the host before the host can go on.
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
           aten.masked_select.default, aten.equal.default, aten.repeat_interleave.Tensor, aten.bincount.default,
           aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default}
READS = ("cpu", "tolist", "numpy", "item", "__array__")  # Tensor methods that copy to the host
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
        self._pause, self._skip, self._host = 0, 0, WeakIdKeyDictionary()
        self._methods = {}

    def __enter__(self):
        if _ACTIVE:
            raise RuntimeError("OpCounter does not nest: one counter at a time")
        _ACTIVE.append(self)
        for name in READS:  # host copies of CPU tensors are not dispatched: watch the methods themselves
            self._methods[name] = method = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._watch_read(name, method))
        self._methods["to"] = to = torch.Tensor.to
        torch.Tensor.to = self._watch_to(to)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._methods.items():
            setattr(torch.Tensor, name, method)
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    def _watch_read(self, name, method):
        counter = self

        @functools.wraps(method)
        def read(tensor, *args, **kwargs):
            if not (counter._pause or counter._skip) and tensor not in counter._host:
                counter.syncs.append(f"Tensor.{name}")
            with counter.paused():
                return method(tensor, *args, **kwargs)
        return read

    def _watch_to(self, method):
        """``host.to(device)`` is an upload: its result is device data (on a CPU ``.to`` may return the same
        object, so it is copied here, as a GPU would). A device tensor's ``.to(...)`` cannot be told apart from
        a download on a CPU (the device is "cpu" either way): it is taken to stay on the device."""
        counter = self

        def to(tensor, *args, **kwargs):
            out = method(tensor, *args, **kwargs)
            moved = any(isinstance(a, (str, torch.device)) for a in (*args, kwargs.get("device")))
            if moved and tensor in counter._host and not (counter._pause or counter._skip):
                counter._skip += 1
                try:
                    return out.clone() if out is tensor else out
                finally:
                    counter._skip -= 1
            return out
        return to

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._skip:
            return out
        inputs = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if self._pause or (inputs and all(a in self._host for a in inputs)):
            for o in tree_leaves(out):  # host data, and so is what is computed from it alone
                if isinstance(o, torch.Tensor):
                    self._host[o] = True
        else:
            self.ops += not (func.is_view or func in NO_KERNEL)
            if waits_for_device(func, args) or (  # or a device tensor copied into host data
                    func is aten.copy_.default and args[0] in self._host and args[1] not in self._host):
                self.syncs.append(str(func))
        return out

    @contextlib.contextmanager
    def paused(self):
        self._pause += 1
        try:
            yield
        finally:
            self._pause -= 1

    def exclude(self, model):
        """``model`` with its own ops left out of the count (its outputs are device tensors)."""
        def call(*args, **kwargs):
            self._skip += 1
            try:
                return model(*args, **kwargs)
            finally:
                self._skip -= 1
        for attr in ("features", "output"):  # trunk access for drafters that read features
            if callable(getattr(model, attr, None)):
                setattr(call, attr, self.exclude(getattr(model, attr)))
        return call


def waits_for_device(func, args) -> bool:
    """Whether this aten op's CUDA kernel makes the host wait: a syncing op, or boolean-mask indexing
    (x[mask] and x[mask] = y find their rows with a nonzero)."""
    if func in SYNCING:
        return True
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return False
    return any(i is not None and i.dtype == torch.bool for i in args[1])
