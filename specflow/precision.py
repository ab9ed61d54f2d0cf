"""Sampling in reduced precision: the network under ``torch.autocast``, the sampler in float32.

    model = autocast(net, "bf16")        # "32" returns net itself

The network's matmuls and convolutions run in bfloat16 (or float16) — where a GPU spends its time — while the
sampler keeps its state, noise and coefficients in the noise's dtype (float32), to which the velocity is cast
back. A float16 overflow shows up as a NaN, which the sampler reports with its step and t.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


class Autocast:
    """``net`` called under ``torch.autocast(dtype)`` on the device of its input; other attributes pass through
    (``in_channels``, ``num_classes``, ``specflow``, …), and so do a trunk's ``features`` / ``output``.

    An ``nn.Module`` is run from a copy whose Linear/Conv weights are already in ``dtype``: autocast would
    otherwise cast every weight again at every call (frozen weights are not cached) — a quarter of the kernels
    of a UNet call — to the same values. The copy is a snapshot: wrap again after the weights change."""

    def __init__(self, net, dtype: torch.dtype):
        self.net, self.dtype = net, dtype
        self.fast = _low_precision_copy(net, dtype)

    def _run(self, fn, x: Tensor, *args, **kwargs):
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            return fn(x, *args, **kwargs)

    def __call__(self, x: Tensor, *args, **kwargs):
        return self._run(self.fast, x, *args, **kwargs).to(x.dtype)  # e.g. guidance combines in float32

    def to(self, *args, **kwargs) -> "Autocast":
        """Both nets moved to another device, still wrapped (a dtype would undo the pre-cast weights)."""
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None:
            self._refuse(dtype)
        kw = {} if memory_format is None else {"memory_format": memory_format}  # channels_last keeps the dtype
        return self._each(lambda m: m.to(device, non_blocking=non_blocking, **kw))

    def forward(self, x: Tensor, *args, **kwargs):
        return self(x, *args, **kwargs)

    # Module methods that return the module return the wrapper (not the inner copy: autocast stays on); those
    # that change the dtype are refused. Others reach the low-precision copy through __getattr__.
    def cuda(self, device=None) -> "Autocast":
        return self.to(torch.device("cuda", device) if isinstance(device, int) else device or "cuda")

    def cpu(self) -> "Autocast":
        return self.to("cpu")

    def train(self, mode: bool = True) -> "Autocast":
        return self._each(lambda m: m.train(mode))

    def eval(self) -> "Autocast":
        return self.train(False)

    def requires_grad_(self, requires_grad: bool = True) -> "Autocast":
        return self._each(lambda m: m.requires_grad_(requires_grad))

    def apply(self, fn) -> "Autocast":
        return self._each(lambda m: m.apply(fn))

    def share_memory(self) -> "Autocast":
        return self._each(lambda m: m.share_memory())

    def to_empty(self, *, device, recurse: bool = True) -> "Autocast":
        return self._each(lambda m: m.to_empty(device=device, recurse=recurse))

    def float(self):
        self._refuse(torch.float32)

    def double(self):
        self._refuse(torch.float64)

    def half(self):
        self._refuse(torch.float16)

    def bfloat16(self):
        self._refuse(torch.bfloat16)

    def type(self, dst_type):
        self._refuse(dst_type)

    def _refuse(self, dtype):
        raise ValueError(f"Autocast(...) to {dtype} would change the weights' dtype; wrap the net again with "
                         f"specflow.precision.autocast at the precision you want")

    def _each(self, fn) -> "Autocast":
        for name in ("net", "fast"):
            if isinstance(self.__dict__[name], nn.Module):
                fn(self.__dict__[name])
        return self

    def __getattr__(self, name):  # only reached for attributes Autocast itself lacks
        if name.startswith("__") or "fast" not in self.__dict__:
            raise AttributeError(name)
        attr = getattr(self.__dict__["fast"], name)
        if name in ("features", "output") and callable(attr):  # a trunk (medusa drafters read its features)
            return lambda *args, **kwargs: self._run(attr, *args, **kwargs)
        return attr


def _low_precision_copy(net, dtype: torch.dtype):
    if not isinstance(net, nn.Module):
        return net
    memo = {}  # Linear/Conv parameters (what autocast runs in dtype anyway) enter the copy already cast:
    for m in net.modules():  # no transient float32 duplicate of them
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            for p in m.parameters(recurse=False):
                memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
    return copy.deepcopy(net, memo)


def autocast(net, precision: str | int = "32"):
    """``net`` to be sampled at ``precision``: "32" (as is), "bf16" or "16" (autocast); ints 32 / 16 as in
    Lightning's ``precision``."""
    dtype = PRECISIONS[check_precision(precision)]
    return net if dtype is None else Autocast(net, dtype)


def check_precision(precision: str | int, device: torch.device | None = None) -> str:
    """``precision`` as a key of PRECISIONS, or a ValueError that names the valid ones (and, given the device,
    a GPU without bfloat16)."""
    key = str(precision)
    if key not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)} "
                         f"(bf16 needs a GPU that has it, e.g. A100/H100; 16 may overflow to NaN)")
    if key == "bf16" and device is not None and torch.device(device).type == "cuda" and \
            not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision bf16 on {torch.cuda.get_device_name(device)}, which has no bfloat16: "
                         f"use --precision 16 or 32")
    return key
