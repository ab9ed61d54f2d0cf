"""Classifier-free guidance as a velocity wrapper with the shared signature ``model(x, t, cond=None)``.

    v_w(x, t, y) = v(x, t, ∅) + w·(v(x, t, y) − v(x, t, ∅))

w = 0 is the unconditional model, w = 1 the plain conditional one, w > 1 trades diversity for fidelity.
The null class ∅ is the index ``num_classes`` of the net's label embedding (what label dropout trains).
This module imports torch only, so samplers can use it without Lightning.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Guided:
    """A guided velocity callable; build it with ``guidance(net, scale)``."""

    net: nn.Module
    scale: float
    null_class: int

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            return self.net(x, t, None)  # unconditional pass-through
        null = torch.full_like(cond, self.null_class)
        if self.scale == 1.0:
            return self.net(x, t, cond)
        if self.scale == 0.0:
            return self.net(x, t, null)
        # One batched call of 2B rows: [conditional; unconditional].
        v = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]))
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + self.scale * (v_cond - v_uncond)


class GuidedTrunk(Guided):
    """A guided net whose trunk drafters can read (medusa): ``features`` runs the conditional and the
    unconditional pass as one batch and returns both, (B, 2, *h) — a sample's row holds its two branches —
    and ``output`` turns them into the guided velocity, so ``output(features(x, t, y))`` is ``self(x, t, y)``,
    bit for bit: the branches are combined in x's dtype (float32 under ``specflow.precision.autocast``, whose
    net returns bfloat16 from its trunk), as the plain call does."""

    def features(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """The trunk features of the guided call at (x, t, cond). Unlike the plain call, which falls back to the
        unconditional net without labels, a two-branch scale (neither 0 nor 1) needs ``cond``: the
        unconditional features alone are not what ``output`` combines, so ``cond=None`` raises a ValueError.
        ``generate(..., guidance=w)`` always passes labels (it refuses guidance without them)."""
        self._dtype = x.dtype  # output() combines (and returns) in it, as Autocast.__call__ casts back to it
        if self.scale in (0.0, 1.0):  # one branch, as __call__
            null = None if cond is None else torch.full_like(cond, self.null_class)
            return self.net.features(x, t, cond if self.scale == 1.0 else null)
        if cond is None:  # output() expects both branches
            raise ValueError(f"guidance {self.scale} needs class labels (cond): the guided trunk runs a "
                             f"conditional and an unconditional branch; pass cond, or sample without guidance")
        h = self.net.features(torch.cat([x, x]), torch.cat([t, t]),
                              torch.cat([cond, torch.full_like(cond, self.null_class)]))
        return h.unflatten(0, (2, x.shape[0])).transpose(0, 1)

    def output(self, h: Tensor) -> Tensor:
        """The guided velocity from ``features(x, ...)``, in x's dtype: call it after that ``features`` call
        (as the sampler's Evaluator does), which is where the dtype comes from."""
        if self.scale in (0.0, 1.0):
            v = self.net.output(h)
            return v.to(self.__dict__.get("_dtype", v.dtype))
        v = self.net.output(h.transpose(0, 1).flatten(0, 1))
        v_cond, v_uncond = v.to(self.__dict__.get("_dtype", v.dtype)).chunk(2)
        return v_uncond + self.scale * (v_cond - v_uncond)


@dataclass
class GuidedHeads:
    """Medusa heads (``specflow.nets.heads``) drafting the guided velocity: the heads run on the conditional and
    the unconditional features of ``GuidedTrunk`` as one batch and their velocities are combined like the
    target's. Both branches start from the guided x̂1 the target predicted at the source (the one the sampler
    keeps): an approximation, which costs acceptance, never exactness — the target verifies every step."""

    heads: nn.Module
    scale: float

    def __call__(self, y: Tensor, s: Tensor, cond: Tensor | None = None, *, features: Tensor, x_src: Tensor,
                 t_src: Tensor, x1_src: Tensor) -> Tensor:
        if self.scale in (0.0, 1.0):  # the trunk ran one branch
            return self.heads(y, s, cond, features=features, x_src=x_src, t_src=t_src, x1_src=x1_src)
        two = lambda a: torch.cat([a, a])  # noqa: E731
        s = torch.as_tensor(s, device=y.device).expand(y.shape[0])
        v = self.heads(two(y), two(s), None, features=features.transpose(0, 1).flatten(0, 1), x_src=two(x_src),
                       t_src=two(t_src), x1_src=two(x1_src))
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + self.scale * (v_cond - v_uncond)

    def __getattr__(self, name):  # e.g. ``specflow`` (what load_draft knows) passes through
        if name.startswith("__") or "heads" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["heads"], name)


def guidance(net: nn.Module, scale: float) -> Guided:
    """Wrap a class-conditional ``net`` (with ``num_classes`` and a null class) into a guided velocity (with
    its trunk, when the net exposes ``features``/``output``)."""
    num_classes = getattr(net, "num_classes", None)
    if num_classes is None:
        raise ValueError(f"guidance(scale={scale}) needs a class-conditional net (net.num_classes is None); "
                         f"train with model.net.num_classes and label_dropout > 0, or sample without guidance")
    if not scale >= 0.0:
        raise ValueError(f"guidance scale must be >= 0 (1 = plain conditional), got {scale}")
    trunk = callable(getattr(net, "features", None)) and callable(getattr(net, "output", None))
    return (GuidedTrunk if trunk else Guided)(net, float(scale), int(num_classes))


def guide_draft(draft, scale: float):
    """The draft of a guided target, guided the same way: Medusa heads through ``GuidedHeads`` (they read the
    guided trunk's two branches), a draft net like the target (drafts learn the null class: label_dropout)."""
    if callable(getattr(draft, "predict_x1", None)):  # heads on the target's trunk
        if not scale >= 0.0:
            raise ValueError(f"guidance scale must be >= 0 (1 = plain conditional), got {scale}")
        return GuidedHeads(draft, float(scale))
    return guidance(draft, scale)
