"""The sampler shell shared by every algorithm: option validation, input checks, the grid, timing, stats.

A sampler holds its options (dataclass fields) and any learned bandit state, never a model. Subclasses
implement ``_run`` — the algorithm itself, on one screen — and register a name with ``@register``.
"""
from __future__ import annotations

import dataclasses
import time
from typing import ClassVar

import torch
from torch import Tensor

from specflow.path import time_grid
from specflow.sampling.noise import Generators, check_streams
from specflow.sampling.opcount import host_side
from specflow.sampling.stats import Evaluator, SampleResult, SampleStats

SAMPLERS: dict[str, type["Sampler"]] = {}


def register(cls):
    SAMPLERS[cls.name] = cls
    return cls


@dataclasses.dataclass
class Sampler:
    """Base options: ``steps`` (N grid intervals) and the time ``schedule`` ("uniform" | "quadratic" | "edm"), or an
    explicit ``grid`` (N + 1 increasing times from t_0 >= 0 to 1, e.g. ``specflow.adapters``' ``.grid(N)``:
    another library's own schedule), which replaces the schedule."""

    name: ClassVar[str] = "base"
    needs_draft: ClassVar[bool] = False
    needs_features: ClassVar[bool] = False  # the drafter reads the target's trunk features (medusa)
    # The NaN/Inf check of each model output (target and draft) waits for the sampler's next host sync
    # (Evaluator.fetch) or the end of the run, so a round or a step never stops the device just to check.
    # Samplers that read device values on the host between calls keep the check at each call (a NaN must
    # not reach them first); an error raised inside a run is replaced by an unchecked NaN that preceded it.
    defers_checks: ClassVar[bool] = False
    steps: int = 100
    schedule: str = "uniform"
    grid: Tensor | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        time_grid(self.steps, schedule=self.schedule)  # validates steps and schedule early
        if self.grid is not None:
            self.grid = check_grid(self.grid, self.steps)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def sample(self, model, noise: Tensor, cond: Tensor | None = None, draft=None,
               generator: Generators = None) -> SampleResult:
        """Integrate ``model`` from ``noise`` at t = 0 to data at t = 1 on this sampler's grid."""
        if not isinstance(noise, Tensor) or noise.ndim < 2 or not noise.is_floating_point():
            raise ValueError(f"noise must be a floating tensor shaped (B, ...), got "
                             f"{tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__}")
        B = noise.shape[0]
        if cond is not None and (not isinstance(cond, Tensor) or cond.shape[0] != B):
            got = tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
            raise ValueError(f"cond must have one row per sample: noise has batch {B}, cond is {got}")
        if not bool(torch.isfinite(noise).all()):
            raise ValueError("noise contains NaN/Inf; draw it with torch.randn (or specflow.sampling.noise.randn)")
        if not (generator is None or isinstance(generator, torch.Generator) or (
                isinstance(generator, (list, tuple)) and all(isinstance(g, torch.Generator) for g in generator))):
            raise ValueError(f"generator must be None, a torch.Generator or a list of them (one per sample), "
                             f"got {type(generator).__name__}")
        if isinstance(generator, (list, tuple)):
            check_streams(generator, B)
        if self.needs_draft and draft is None:
            raise ValueError(f"sampler {self.name!r} with these options needs a draft network: "
                             f"call sample(..., draft=...) (see specflow.load_draft)")
        stats = SampleStats(baseline_steps=self.steps)
        target = Evaluator(model, cond, B, stats, "target", keep_features=self.needs_features)
        drafter = Evaluator(draft, cond, B, stats, "draft") if draft is not None else None
        if self.defers_checks:
            target.defer_checks()
            if drafter is not None:
                drafter.defer_checks(target.pending)  # one list: checked together, in call order
        grid = _host_grid(self.steps, self.schedule) if self.grid is None else self.grid
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                x = self._run(target, noise, grid, drafter, generator, stats)
        except Exception as e:  # a NaN the run has not checked yet may be the cause (e.g. a model that
            target.raise_pending(e)  # asserts on its input): report the NaN, with this error as context
            raise
        if noise.is_cuda:
            torch.cuda.synchronize(noise.device)
        stats.wall_time_s = time.perf_counter() - t0
        target.finish()
        if drafter is not None:
            drafter.finish()
        if stats.proposed:
            stats.acceptance_rate = stats.accepted / stats.proposed
        return SampleResult(samples=x, stats=stats)

    def _run(self, f: Evaluator, x: Tensor, grid: Tensor, draft: Evaluator | None,
             generator: Generators, stats: SampleStats) -> Tensor:
        """The algorithm: integrate from x (t = 0) over ``grid`` (float64, on the host; move what the device
        needs, read the rest without a sync), calling the target only through ``f``. A model output (target
        or draft) is read only before the next model call, or copied: CUDA-graphed models (torch.compile
        mode="reduce-overhead") return the same buffers every call, and compiled target and draft share one
        memory pool. (A trunk's ``features`` are read after its ``output`` runs: compile the two as one.)"""
        raise NotImplementedError

    # Learned state (bandits). Stateless samplers have none.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"sampler {self.name!r} has no learned state, got keys {sorted(state)}")


@host_side
def _host_grid(steps: int, schedule: str) -> Tensor:
    """The time grid in float64 on the host: samplers read it without a device sync."""
    return time_grid(steps, dtype=torch.float64, schedule=schedule)


def check_grid(grid, steps: int) -> Tensor:
    """An explicit time grid as the samplers read it (float64, host), or a ValueError naming what is wrong."""
    if not isinstance(grid, Tensor) or grid.ndim != 1 or not grid.is_floating_point():
        got = f"{grid.dtype} tensor shaped {tuple(grid.shape)}" if isinstance(grid, Tensor) else type(grid).__name__
        raise ValueError(f"grid must be a 1-D floating tensor of steps + 1 times, got a {got}")
    g = grid.detach().to("cpu", torch.float64)
    if len(g) != steps + 1:
        raise ValueError(f"grid has {len(g)} times but steps={steps} needs steps + 1 = {steps + 1}; build the "
                         f"sampler with steps=len(grid) - 1")
    increasing = bool((g[1:] > g[:-1]).all())
    if not bool(torch.isfinite(g).all()) or g[0] < 0 or g[-1] != 1 or not increasing:
        raise ValueError(f"grid must increase strictly from t_0 >= 0 to exactly 1 (t = 1 is data), got "
                         f"{g[0].item():.6g} … {g[-1].item():.6g}{'' if increasing else ', not increasing'}")
    return g


def build_sampler(name: str, steps: int = 100, **options) -> Sampler:
    """``build_sampler("speculative", steps=100, drafter="extrapolate", window=8)``.

    Unknown names and options are a ValueError that lists the valid ones.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(sorted(SAMPLERS))}")
    cls = SAMPLERS[name]
    valid = cls.option_names()
    bad = sorted(set(options) - set(valid))
    if bad:
        raise ValueError(f"unknown option(s) {bad} for sampler {name!r}; valid: {', '.join(valid)}")
    return cls(steps=steps, **options)
