"""Drafters: cheap guesses of the target's velocity at states the target has not evaluated yet.

One small protocol serves the exact speculative sampler and the deterministic leap samplers (sfm, rca):

    d = make_drafter("extrapolate"); d.reset(x)            # per-sample buffers for a batch like x
    d.observe(rows, x, t, v, h, final=True)                # a paid target evaluation at (x, t) for those rows
                                                           # (h: its trunk features if ``needs_features``;
                                                           # final=False: another observation of the same
                                                           # round follows, derived state may wait for it)
    v_hat = d(y, s, rows, j, net, step=None)               # draft velocity at drafted state y, time s,
                                                           # j-th step of the current window (step: each
                                                           # row's grid step, for error messages)
``rows`` maps each row of y to its sample; ``rows=None`` in ``__call__`` means every sample in order, and a
bool mask over all samples in ``observe`` means a row per sample of which the masked ones are taken (the
hot path of the speculative sampler: no gathers, no host syncs, capturable in a CUDA graph). ``memory``: how
many of a sample's latest target evaluations the drafter reads (frozen and medusa 1, extrapolate 2); a
sampler may skip older ones within a round.
Drafters work in x1_hat space (the predicted data changes slowly along the path, the velocity does not):
v̂(y, s) = (x̂1(s) − y) / (1 − s). Drafted states are never at s = 1 (a velocity is read at a step's start).
``net`` is the draft-network Evaluator for drafters that need one (``needs_network``), else None.
A drafter with ``needs_features`` makes the sampler evaluate its target as ``output(features(x, t, cond))``
and pass the features of every observed row to ``observe`` (samplers never special-case drafter names).
New drafters register with ``@register_drafter``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from specflow.path import expand, per_sample, x1_hat

DRAFTERS: dict[str, type["Drafter"]] = {}


def register_drafter(cls):
    DRAFTERS[cls.name] = cls
    return cls


def make_drafter(name: str) -> "Drafter":
    if name not in DRAFTERS:
        raise ValueError(f"unknown drafter {name!r}; valid: {', '.join(sorted(DRAFTERS))}")
    return DRAFTERS[name]()


class Drafter:
    name = "base"
    needs_network = False
    network: str | None = None  # the kind of trained draft it reads (a draft checkpoint's ``drafter``)
    needs_features = False
    predicts_x1 = True  # v̂ comes from predict_x1(s, rows), independent of y: samplers may fold it into
    #                     their step's coefficients (drafters that read y, e.g. networks, set False)
    memory = 1  # how many of the latest target evaluations per sample a round must show it (see observe)

    def reset(self, like: Tensor) -> None:
        B = like.shape[0]
        self.x1 = like.new_zeros(like.shape)  # latest target x1_hat per sample
        self.t = like.new_full((B,), -1.0)  # its time; −1: not observed yet

    def observe(self, rows: Tensor, x: Tensor, t: Tensor, v: Tensor, h: Tensor | None = None,
                final: bool = True) -> None:
        t = t.to(x.dtype)
        _put(self.x1, rows, x1_hat(x, t, v))
        _put(self.t, rows, t)

    def predict_x1(self, s: Tensor, rows: Tensor | None) -> Tensor:
        raise NotImplementedError

    def __call__(self, y: Tensor, s: Tensor, rows: Tensor | None, j: int, net=None, step=None) -> Tensor:
        s = s.to(y.dtype)
        return (self.predict_x1(s, rows) - y) / (1 - expand(s, y))


def _take(a: Tensor, rows: Tensor | None) -> Tensor:
    """Rows of a per-sample buffer; ``rows=None`` (or a mask) means every sample, in order (no gather)."""
    return a if rows is None or rows.dtype == torch.bool else a[rows]


def _put(buf: Tensor, rows: Tensor, val: Tensor) -> None:
    """buf[rows] = val, in place. ``rows`` is a LongTensor of samples, or a bool mask over all samples with
    ``val`` holding a row per sample: a dense update without a host sync (the CUDA-graph path)."""
    if rows.dtype == torch.bool:
        buf.copy_(torch.where(per_sample(rows, buf), val, buf))
    else:
        buf[rows] = val


@register_drafter
class Frozen(Drafter):
    """Reuse the last target prediction of the data (training-free, De Bortoli et al. 2025)."""

    name = "frozen"

    def predict_x1(self, s, rows):
        return _take(self.x1, rows)


@register_drafter
class Extrapolate(Drafter):
    """First-order finite difference in t of the last two target x1_hat predictions (frozen until two exist)."""

    name = "extrapolate"
    memory = 2

    def reset(self, like):
        super().reset(like)
        self.x1_prev, self.t_prev = self.x1.clone(), self.t.clone()
        self.intercept, self.slope = self.x1.clone(), self.x1.clone()  # x̂1(s) = intercept + s·slope

    def observe(self, rows, x, t, v, h=None, final=True):
        _put(self.x1_prev, rows, _take(self.x1, rows))
        _put(self.t_prev, rows, _take(self.t, rows))
        super().observe(rows, x, t, v)
        if not final:  # the line is rebuilt once, after the round's last observation
            return
        dt = self.t - self.t_prev  # the line of every sample, rebuilt in place (slope 0 until two distinct
        ok = (self.t_prev >= 0) & (dt > 0)  # observations exist)
        inv = torch.where(ok, 1 / dt.clamp_min(torch.finfo(dt.dtype).tiny), 0.0)
        torch.mul(self.x1 - self.x1_prev, expand(inv, self.x1), out=self.slope)
        torch.addcmul(self.x1, expand(self.t, self.slope), self.slope, value=-1, out=self.intercept)

    def predict_x1(self, s, rows):
        slope = _take(self.slope, rows)
        return torch.addcmul(_take(self.intercept, rows), expand(s, slope), slope)


@register_drafter
class Model(Drafter):
    """A small distilled velocity network passed as ``sample(..., draft=net)``."""

    name = "model"
    needs_network = True
    network = "model"
    predicts_x1 = False

    def __call__(self, y, s, rows, j, net=None, step=None):
        return net(y, s.to(y.dtype), rows, step=j if step is None else step)


@register_drafter
class Anchored(Drafter):
    """A small network's *change* of x̂1 added to the target's last prediction (a control variate):
    x̂1(y, s) = x̂1_T(x_k, t_k) + [x̂1_S(y, s) − x̂1_S(x_k, t_k)], with (x_k, t_k) the sample's last paid target
    evaluation and S the network passed as ``draft=``. The draft is exact at (x_k, t_k) and errs only where the
    small net mis-predicts how x̂1 moves, not where it mis-predicts x̂1 itself (its larger error at D = 784).
    Costs one extra draft row per sample per new anchor (counted in draft_nfe by the network's Evaluator)."""

    name = "anchored"
    needs_network = True
    network = "model"
    predicts_x1 = False

    def reset(self, like: Tensor) -> None:
        super().reset(like)
        self.x = like.new_zeros(like.shape)  # the anchor state x_k per sample
        self.offset = like.new_zeros(like.shape)  # x̂1_T(x_k) − x̂1_S(x_k): valid where ``fresh``
        self.fresh = torch.zeros(like.shape[0], dtype=torch.bool, device=like.device)

    def observe(self, rows, x, t, v, h=None, final=True):
        super().observe(rows, x, t, v)
        _put(self.x, rows, x)
        if rows.dtype == torch.bool:
            self.fresh &= ~rows
        else:
            self.fresh[rows] = False

    def __call__(self, y, s, rows, j, net=None, step=None):
        s = s.to(y.dtype)
        rows = torch.arange(y.shape[0], device=y.device) if rows is None else rows
        step = j if step is None else step
        seen = self.t[rows] >= 0
        due = seen & ~self.fresh[rows]  # anchors the net has not been evaluated at yet
        stale = rows[due]
        if stale.numel():
            ta = self.t[stale]
            va = net(self.x[stale], ta, stale, step=step if isinstance(step, int) else step[due])
            self.offset[stale] = self.x1[stale] - x1_hat(self.x[stale], ta, va)
            self.fresh[stale] = True
        v = net(y, s, rows, step=step)
        # never-evaluated samples keep the net's own guess (offset 0 there): v̂ = v_S + offset/(1 − s)
        off = torch.where(per_sample(seen, y), self.offset[rows], 0.0)
        return v + off / (1 - expand(s, y))


@register_drafter
class Medusa(Drafter):
    """Heads on the target's trunk (``specflow.nets.heads.MedusaHeads``) passed as ``sample(..., draft=heads)``.

    From the features h_k of the last paid target evaluation of a sample, at (x_k, t_k) with prediction
    x̂1_k, the heads guess x̂1 at any later drafted state: x̂1(y, s) = heads(h_k, x_k, x̂1_k, y; t_k, s).
    Before a sample's first evaluation there are no features: the frozen guess (x̂1 = 0) is used.
    """

    name = "medusa"
    needs_network = True
    network = "medusa"
    predicts_x1 = False
    needs_features = True

    def reset(self, like: Tensor) -> None:
        super().reset(like)
        self.x = like.new_zeros(like.shape)  # the state of the last paid evaluation, per sample
        self.h = None  # (B, *feature shape), allocated at the first observation

    def observe(self, rows, x, t, v, h=None, final=True):
        if h is None:
            raise ValueError("the medusa drafter observed a target evaluation without its features; the sampler "
                             "must pass them (Evaluator(keep_features=True) and drafter.observe(..., h))")
        super().observe(rows, x, t, v)
        if self.h is None:
            self.h = h.new_zeros((self.x.shape[0], *h.shape[1:]))
        _put(self.x, rows, x)
        _put(self.h, rows, h)

    def __call__(self, y, s, rows, j, net=None, step=None):
        s = s.to(y.dtype)
        rows = torch.arange(y.shape[0], device=y.device) if rows is None else rows
        v = (self.x1[rows] - y) / (1 - expand(s, y))  # frozen guess, kept for samples never evaluated yet
        seen = (self.t[rows] >= 0).nonzero().squeeze(1)
        if seen.numel():
            r = rows[seen]
            v[seen] = net(y[seen], s[seen], r, step=j if step is None else step[seen], features=self.h[r],
                          x_src=self.x[r], t_src=self.t[r], x1_src=self.x1[r])
        return v
