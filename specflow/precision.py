"""Sampling in reduced precision: the network under ``torch.autocast``, the sampler in float32.

    model = autocast(net, "bf16")        # "32" returns net itself

The network's matmuls and convolutions run in bfloat16 (or float16) — where a GPU spends its time — while the
sampler keeps its state, noise and coefficients in the noise's dtype (float32), to which the velocity is cast
back. A float16 overflow shows up as a NaN, which the sampler reports with its step and t.
"""
from __future__ import annotations

import torch
from torch import Tensor

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


class Autocast:
    """``net`` called under ``torch.autocast(dtype)`` on the device of its input; other attributes pass through
    (``in_channels``, ``num_classes``, ``specflow``, …), and so do a trunk's ``features`` / ``output``."""

    def __init__(self, net, dtype: torch.dtype):
        self.net, self.dtype = net, dtype

    def _run(self, fn, x: Tensor, *args, **kwargs):
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            return fn(x, *args, **kwargs)

    def __call__(self, x: Tensor, *args, **kwargs):
        return self._run(self.net, x, *args, **kwargs).to(x.dtype)  # e.g. guidance combines in float32

    def __getattr__(self, name):  # only reached for attributes Autocast itself lacks
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(self.__dict__["net"], name)
        if name in ("features", "output") and callable(attr):  # a trunk (medusa drafters read its features)
            return lambda *args, **kwargs: self._run(attr, *args, **kwargs)
        return attr


def autocast(net, precision: str = "32"):
    """``net`` to be sampled at ``precision``: "32" (as is), "bf16" or "16" (autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)} "
                         f"(bf16 needs a GPU that has it, e.g. A100/H100; 16 may overflow to NaN)")
    dtype = PRECISIONS[precision]
    return net if dtype is None else Autocast(net, dtype)
