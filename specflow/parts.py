"""A sampling run kept as parts, one file per batch, each written whole: a long run (50 000 samples for an FID)
resumes where it stopped, and several processes — GPUs, nodes — share one run without talking to each other.

    OUT/parts/b000017.npz    batch 17: samples, labels, its stats, the run's settings, and the sampler's learned
                             state after it (bandits), so that a resumed run goes on as the uninterrupted one

Process r of W takes batches r, r + W, r + 2W, …; with per-sample random streams (``generate``) batch b is the
same whichever process makes it. Every part records the settings of its run (``key``): parts of another run
(another checkpoint, sampler, seed, …) in the same folder are a clear error, never silently mixed in.
``merge`` reads them back in order once all are there.
"""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from specflow.io import save_npz_atomic
from specflow.sampling.stats import SampleStats
from specflow.tally import Tally

_NAME = re.compile(r"b(\d{6})\.npz")


class Parts:
    """The parts of one run in ``folder`` (created on the first write): ``count`` batches, settings ``key``
    (a JSON-able dict)."""

    def __init__(self, folder: str | os.PathLike, key: dict, count: int):
        self.folder, self.count = Path(folder), int(count)
        self.key = json.loads(json.dumps(key, sort_keys=True, default=str))  # as it reads back from a part

    def path(self, b: int) -> Path:
        return self.folder / f"b{b:06d}.npz"

    def present(self) -> list[int]:
        """The batches already written, after checking that every part belongs to this run (else ValueError)."""
        found = []
        for p in sorted(self.folder.glob("b*.npz")) if self.folder.is_dir() else ():
            m = _NAME.fullmatch(p.name)
            if m is None:
                continue
            try:
                with np.load(p) as z:
                    key = json.loads(str(z["key"]))
            except Exception as e:  # written atomically by us, so damaged from outside: make it again
                print(f"note: part {p} is unreadable ({type(e).__name__}); it will be sampled again")
                continue
            if key != self.key:
                diff = sorted(k for k in {*key, *self.key} if key.get(k) != self.key.get(k))
                raise ValueError(f"{self.folder} holds parts of another run ({p.name} differs in "
                                 f"{', '.join(diff)}: {', '.join(f'{k}={key.get(k)!r}' for k in diff)}); "
                                 f"sample into another --out, or delete {self.folder} to start over")
            b = int(m.group(1))
            if b >= self.count:
                raise ValueError(f"{p} is batch {b} but this run has {self.count} batches: its settings "
                                 f"should have said so; delete {self.folder} to start over")
            found.append(b)
        return found

    def write(self, b: int, samples: torch.Tensor, labels: torch.Tensor | None, stats: SampleStats,
              state: dict) -> Path:
        """Batch b, whole or not at all. ``state``: the sampler's ``state_dict()`` after this batch."""
        buf = io.BytesIO()
        torch.save(state, buf)
        arrays = dict(samples=samples, key=json.dumps(self.key, sort_keys=True),
                      stats=json.dumps(stats.as_dict()), state=np.frombuffer(buf.getvalue(), dtype=np.uint8))
        if labels is not None:
            arrays["labels"] = labels
        return save_npz_atomic(self.path(b), **arrays)

    def state_before(self, b: int, stride: int) -> dict | None:
        """The sampler state saved by the nearest earlier part of this process (batches b − stride, …)."""
        for a in range(b - stride, -1, -stride):
            if self.path(a).exists():
                with np.load(self.path(a)) as z:
                    return torch.load(io.BytesIO(z["state"].tobytes()), weights_only=True)
        return None

    def merge(self) -> tuple[torch.Tensor, torch.Tensor | None, Tally]:
        """All parts in batch order: samples, labels (None if unconditional) and the stats combined (sums
        over parts; wall_time_s is the sum too: the compute time of the run, whatever ran in parallel)."""
        samples, labels, tally = [], [], Tally()
        for b in range(self.count):
            with np.load(self.path(b)) as z:
                samples.append(torch.from_numpy(z["samples"]))
                labels.append(torch.from_numpy(z["labels"]) if "labels" in z.files else None)
                tally.add(_stats(json.loads(str(z["stats"]))), samples[-1].shape[0])
        return torch.cat(samples), None if labels[0] is None else torch.cat(labels), tally


def _stats(d: dict) -> SampleStats:
    """SampleStats from ``as_dict()`` (arm counts as arm_<k>)."""
    arms = {int(k[4:]): int(d.pop(k)) for k in [k for k in d if k.startswith("arm_")]}
    return SampleStats(**d, arm_counts=arms)
