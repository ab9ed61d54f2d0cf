"""What a sampling run cost, counted honestly for the whole batch (DESIGN.md §3)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from specflow.sampling.opcount import host_side


@dataclass
class SampleStats:
    """Counts for one ``sample()`` call.

    sequential_nfe: target forward calls on the critical path (one batched call = 1): GPU latency.
    total_nfe:      target rows evaluated / batch size: compute per sample.
    draft_nfe:      draft rows evaluated / batch size.
    acceptance_rate: accepted / proposed draft steps, summed over samples (nan if nothing was proposed).
    """

    sequential_nfe: int = 0
    total_nfe: float = 0.0
    draft_nfe: float = 0.0
    acceptance_rate: float = math.nan
    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    wall_time_s: float = 0.0
    baseline_steps: int = 0
    arm_counts: dict = field(default_factory=dict)  # arm → times played (speculative: windows as chosen, a
    # choice cut at the grid's end counted as chosen; sfm/rca/fastflow: the lengths played)

    def as_dict(self) -> dict:
        d = asdict(self)
        arms = d.pop("arm_counts")
        d.update({f"arm_{k}": int(v) for k, v in sorted(arms.items())})
        return d


@dataclass
class SampleResult:
    samples: Tensor
    stats: SampleStats


class Evaluator:
    """Calls a velocity model on some rows of the batch, checks what comes back, and counts it.

    Every target (or draft) forward goes through here, so the stats cannot drift from the truth.
    """

    def __init__(self, model, cond: Tensor | None, batch: int, stats: SampleStats, kind: str = "target",
                 keep_features: bool = False):
        self.model, self.cond, self.batch, self.stats, self.kind = model, cond, batch, stats, kind
        self.calls, self.rows = 0, 0
        self.pending: list | None = None  # deferred output checks (see defer_checks), oldest first
        # Drafters that read the target's trunk (medusa) need v = output(h), h = features(x, t, cond), and h.
        self.keep_features, self.features = keep_features, None
        has_trunk = callable(getattr(model, "features", None)) and callable(getattr(model, "output", None))
        if keep_features and not has_trunk:
            raise ValueError(f"this drafter reads the {kind}'s trunk features, so the {kind} must expose "
                             f"features(x, t, cond) and output(h) (the specflow.nets UNet/MLP, as returned by "
                             f"specflow.load_target); got {type(model).__name__}, e.g. a "
                             f"plain function — use another drafter there")

    def __call__(self, x: Tensor, t: Tensor, rows: Tensor | None = None, *, step=None, **context) -> Tensor:
        """v = model(x, t, cond[rows], **context); ``rows`` maps each row of x to its sample (default: all, in
        order). With ``keep_features``, ``self.features`` holds the trunk features of these rows afterwards.
        ``step`` labels the call in error messages: an int, or a tensor with each row's grid step."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        cond = self.cond
        if cond is not None and rows is not None:
            cond = cond[rows]
        args = (x, t.to(x.dtype)) if cond is None else (x, t.to(x.dtype), cond)
        if self.keep_features:
            self.features = self.model.features(*args)
            v = self.model.output(self.features)
        else:
            v = self.model(*args, **context)
        self.calls += 1
        self.rows += x.shape[0]
        if not isinstance(v, Tensor) or v.shape != x.shape:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(
                f"{self.kind} model returned {got} for input {tuple(x.shape)} at step {_fmt_step(step)}, "
                f"t={_fmt_t(t)}; a velocity model must return a tensor shaped like x")
        v = v.to(x.dtype)
        finite = torch.isfinite(v).flatten(1).all(1)  # per row, so that an error can name the bad rows
        if self.pending is not None:
            self.pending.append((self.kind, finite, step, t))
        elif not bool(finite.all()):
            raise _nonfinite(self.kind, step, t, finite)
        return v

    def defer_checks(self, pending: list | None = None) -> None:
        """From now on, check outputs for NaN/Inf at the next ``fetch`` instead of at each call: a sampler
        that syncs with the host once per round folds the check into that one copy. A NaN then surfaces one
        round late, still naming the step and t of the call that made it (``finish`` checks what is left).
        Evaluators given the same ``pending`` list (target and draft) are checked together, in call order."""
        self.pending = [] if pending is None else pending

    def raise_pending(self, cause: BaseException) -> None:
        """While ``cause`` propagates out of a run: if a deferred check fails, that NaN is the real error."""
        if self.pending:
            try:
                self.fetch()
            except FloatingPointError as e:
                raise e from cause
            except Exception:  # the device itself failed (e.g. a CUDA error): keep the original error
                pass

    @host_side
    def fetch(self, *tensors: Tensor) -> list[Tensor]:
        """``tensors`` (small device tensors) on the host, copied in ONE transfer that also carries the deferred
        output checks; raises FloatingPointError for the first call that failed, before anything computed from
        its output is returned. Integer/bool tensors travel as int64, mixed with floats as float64."""
        checks = list(self.pending or ())
        if checks:
            self.pending.clear()  # in place: a draft evaluator may share the list
        floats = any(a.is_floating_point() for a in tensors)
        parts = [a.reshape(-1).double() if floats else a.reshape(-1) for a in tensors]  # cat promotes the rest
        if checks:
            parts.append(torch.stack([ok.all() for _, ok, _, _ in checks]))
        host = torch.cat(parts).cpu() if parts else torch.zeros(0)
        n = host.numel() - len(checks)
        for (kind, finite, step, t), ok in zip(checks, host[n:].tolist()):
            if not ok:
                raise _nonfinite(kind, step, t, finite)
        return [h.view(a.shape).to(a.dtype) for h, a in zip(host[:n].split([a.numel() for a in tensors]), tensors)]

    def finish(self) -> None:
        if self.pending:
            self.fetch()
        if self.kind == "target":
            self.stats.sequential_nfe += self.calls
            self.stats.total_nfe += self.rows / self.batch
        else:
            self.stats.draft_nfe += self.rows / self.batch


def _nonfinite(kind: str, step, t: Tensor, finite: Tensor) -> FloatingPointError:
    bad = ~finite.cpu()  # name the rows that failed, not the whole ragged call
    return FloatingPointError(
        f"{kind} model returned NaN/Inf at step {_fmt_step(step, bad)}, t={_fmt_t(t.cpu()[bad])}; check the "
        f"checkpoint (was training stable?) and the input noise, or run in float32 instead of half precision")


def _fmt_step(step, rows: Tensor | None = None) -> str:
    if isinstance(step, Tensor):  # each row's step
        step = step.cpu() if rows is None else step.cpu()[rows]
        lo, hi = int(step.min()), int(step.max())
        return str(lo) if lo == hi else f"{lo}..{hi}"
    return str(step)


def _fmt_t(t: Tensor) -> str:
    t = t.detach().flatten().float().cpu()
    return f"{t[0].item():.4f}" if bool((t == t[0]).all()) else f"[{t.min().item():.4f}..{t.max().item():.4f}]"
