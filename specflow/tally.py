"""Tally: the SampleStats of many sampler calls (batches, and DDP ranks) combined — one accumulator for what
``generate()`` returns and what the evaluation callback (and benchmarks/fid_proxy.py) reports."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from specflow.sampling.stats import SampleStats


@dataclass
class Tally:
    """SampleStats of batches (and ranks) combined: ``add(stats, batch_size)`` once per sampler call.

    What is kept (all floats, so a rank's tally is one float64 vector):
      added up over batches and ranks: samples, proposed, accepted, arm counts, and sequential_nfe and rounds
          as plain sums (the calls and rounds of all batches run one after another);
      sample-weighted, Σ batch·value, divided by ``samples`` at the end (``w_*``): total_nfe and draft_nfe
          (per sample already, so this is the run's per-sample mean), and the per-batch sequential_nfe, rounds
          and baseline_steps (the mean over samples of what their batch cost);
      wall_time_s: summed over a rank's batches, max over ranks (ranks run in parallel).

    ``stats()``, the whole run as one SampleStats (``generate``): sequential_nfe and rounds summed over batches,
    total_nfe/draft_nfe per sample, baseline_steps the sampler's N, acceptance_rate = accepted / proposed.
    ``summary()``, the logged dict (callback keys ``eval/<label>/<key>``): sequential_nfe and rounds per batch
    (sample-weighted means), total_nfe/draft_nfe per sample, speedup = N / that sequential_nfe,
    acceptance_rate, wall_time_s, arm_<k>.
    Across DDP ranks: ``to_vector(arms)`` on each rank, gather to (W, k), ``from_vectors(..., arms)``.
    """

    samples: float = 0.0
    proposed: float = 0.0
    accepted: float = 0.0
    sequential_nfe: float = 0.0
    rounds: float = 0.0
    w_sequential_nfe: float = 0.0
    w_rounds: float = 0.0
    w_total_nfe: float = 0.0
    w_draft_nfe: float = 0.0
    w_baseline_steps: float = 0.0
    wall_time_s: float = 0.0
    arms: dict = field(default_factory=dict)

    # Reduced by sum across ranks, in vector order; wall_time_s (max) and the arm counts (sum) follow them.
    SUMMED = ("samples", "proposed", "accepted", "sequential_nfe", "rounds", "w_sequential_nfe", "w_rounds",
              "w_total_nfe", "w_draft_nfe", "w_baseline_steps")

    def add(self, st: SampleStats, batch: int) -> None:
        b = float(batch)
        self.samples += b
        self.proposed += st.proposed
        self.accepted += st.accepted
        self.sequential_nfe += st.sequential_nfe
        self.rounds += st.rounds
        for k in ("sequential_nfe", "rounds", "total_nfe", "draft_nfe", "baseline_steps"):
            setattr(self, f"w_{k}", getattr(self, f"w_{k}") + b * float(getattr(st, k)))
        self.wall_time_s += st.wall_time_s
        for a, n in st.arm_counts.items():
            self.arms[int(a)] = self.arms.get(int(a), 0) + int(n)

    def to_vector(self, arms: list[int]) -> Tensor:
        """This tally as float64 (len(SUMMED) + 1 + len(arms),). ``arms`` must be the same list on every rank
        (e.g. the sampler's arms); counts of other arms (a shortened last leap) are left out."""
        vals = [getattr(self, k) for k in self.SUMMED] + [self.wall_time_s] + [self.arms.get(a, 0) for a in arms]
        return torch.tensor(vals, dtype=torch.float64)

    @classmethod
    def from_vectors(cls, vectors: Tensor, arms: list[int]) -> "Tally":
        """Combine per-rank ``to_vector`` outputs, (W, k) or (k,): sums, except wall time (max)."""
        vectors = vectors.reshape(-1, len(cls.SUMMED) + 1 + len(arms)).double()
        n = len(cls.SUMMED)
        total = vectors.sum(0)
        t = cls(**{k: float(v) for k, v in zip(cls.SUMMED, total[:n])})
        t.wall_time_s = float(vectors[:, n].max())
        t.arms = {int(a): int(c) for a, c in zip(arms, total[n + 1:])}
        return t

    def stats(self) -> SampleStats:
        b = max(self.samples, 1.0)
        return SampleStats(sequential_nfe=int(self.sequential_nfe), total_nfe=self.w_total_nfe / b,
                           draft_nfe=self.w_draft_nfe / b,
                           acceptance_rate=self.accepted / self.proposed if self.proposed else math.nan,
                           proposed=int(self.proposed), accepted=int(self.accepted), rounds=int(self.rounds),
                           wall_time_s=self.wall_time_s, baseline_steps=round(self.w_baseline_steps / b),
                           arm_counts=dict(self.arms))

    def summary(self) -> dict[str, float]:
        b = max(self.samples, 1.0)
        out = {"sequential_nfe": self.w_sequential_nfe / b, "total_nfe": self.w_total_nfe / b,
               "draft_nfe": self.w_draft_nfe / b, "wall_time_s": self.wall_time_s}
        if self.w_rounds > 0:  # speculative/leap samplers only
            out["rounds"] = self.w_rounds / b
        if self.w_sequential_nfe > 0:  # baseline steps per sequential call: the latency speed-up over N steps
            out["speedup"] = self.w_baseline_steps / self.w_sequential_nfe
        if self.proposed > 0:
            out["acceptance_rate"] = self.accepted / self.proposed
        if sum(self.arms.values()) > 0:  # a sampler with a fixed window/leap has arms but no bandit
            out.update({f"arm_{a}": float(c) for a, c in sorted(self.arms.items())})
        return out


assert {f.name for f in fields(Tally)} == {*Tally.SUMMED, "wall_time_s", "arms"}  # the vector covers every field
