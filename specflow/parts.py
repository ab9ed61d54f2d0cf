"""A sampling run kept as parts, one file per batch, each written whole: a long run (50 000 samples for an FID)
resumes where it stopped, and several processes — GPUs, nodes — share one run without talking to each other.

    OUT/parts/b000017.npz    batch 17: samples, labels, its stats, the run's settings, the process that made it,
                             and the sampler's learned state after it (bandits), so that a resumed run goes on
                             as the uninterrupted one

Process r of W takes batches r, r + W, r + 2W, …; with per-sample random streams (``generate``) batch b is
the same whichever process makes it — unless the sampler learns as it goes (a bandit): then batch b depends on
the batches its process made before, and a run resumes only with the same number of processes (sample.py
keys it). Every part records the settings of its run (``key``): parts of another run
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

    def present(self) -> tuple[list[int], list[int]]:
        """(batches written, batches whose part is damaged), after checking that every part belongs to this run
        (else ValueError). Parts are written atomically, so a damaged one was damaged from outside: it is
        made again, by whichever process finds it."""
        found, damaged = [], []
        for p in sorted(self.folder.glob("b*.npz")) if self.folder.is_dir() else ():
            m = _NAME.fullmatch(p.name)
            if m is None:
                continue
            b = int(m.group(1))
            try:
                with np.load(p) as z:
                    key = json.loads(str(z["key"]))
            except Exception as e:
                print(f"note: part {p} is unreadable ({type(e).__name__}); it will be sampled again")
                damaged.append(b)
                continue
            if key != self.key:
                diff = differing(key, self.key)
                raise ValueError(f"{self.folder} holds parts of another run ({p.name} differs in "
                                 f"{', '.join(diff)}: {', '.join(f'{k}={key.get(k)!r}' for k in diff)}); "
                                 f"sample into another --out, or delete {self.folder} to start over")
            if b >= self.count:
                raise ValueError(f"{p} is batch {b} but this run has {self.count} batches: its settings "
                                 f"should have said so; delete {self.folder} to start over")
            found.append(b)
        return found, damaged

    def write(self, b: int, samples: torch.Tensor, labels: torch.Tensor | None, stats: SampleStats,
              state: dict, rank: int = 0) -> Path:
        """Batch b, whole or not at all. ``state``: the sampler's ``state_dict()`` after this batch; ``rank``:
        the process that made it (its wall time runs in parallel with the other processes')."""
        buf = io.BytesIO()
        torch.save(state, buf)
        arrays = dict(samples=samples, key=json.dumps(self.key, sort_keys=True), stats=json.dumps(stats.as_dict()),
                      state=np.frombuffer(buf.getvalue(), dtype=np.uint8), rank=rank)
        if labels is not None:
            arrays["labels"] = labels
        return save_npz_atomic(self.path(b), **arrays)

    def state_before(self, b: int, stride: int) -> dict | None:
        """The sampler state saved by the nearest earlier readable part of this process (b − stride, …)."""
        for a in range(b - stride, -1, -stride):
            try:
                with np.load(self.path(a)) as z:
                    return torch.load(io.BytesIO(z["state"].tobytes()), weights_only=True)
            except Exception:  # missing, or damaged: an older part still tells where the bandit was
                continue
        return None

    def remove(self) -> None:
        """Delete this run's parts, and the folder if nothing else is in it (never a user's other files)."""
        for b in range(self.count):
            self.path(b).unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass

    def merge(self) -> tuple[torch.Tensor, torch.Tensor | None, Tally]:
        """All parts in batch order: samples, labels (None if unconditional) and the stats combined: sums over
        parts, and wall_time_s summed over each process's parts and the max over processes (they ran in
        parallel), as ``Tally`` does for DDP ranks."""
        samples, labels, tally, wall = [], [], Tally(), {}
        for b in range(self.count):
            try:
                with np.load(self.path(b)) as z:
                    samples.append(torch.from_numpy(z["samples"]))
                    labels.append(torch.from_numpy(z["labels"]) if "labels" in z.files else None)
                    st = _stats(json.loads(str(z["stats"])))
                    rank = int(z["rank"]) if "rank" in z.files else -1  # parts from before ranks were kept
            except FileNotFoundError:
                raise ValueError(f"part {self.path(b)} disappeared while merging (another process merged and "
                                 f"removed the parts?): look for {self.folder.parent / 'samples.npz'}, else run "
                                 f"the same command again") from None
            except Exception as e:
                raise ValueError(f"part {self.path(b)} cannot be read ({type(e).__name__}: {e}); delete it and run "
                                 f"the same command again to make it again") from None
            tally.add(st, samples[-1].shape[0])
            wall[rank] = wall.get(rank, 0.0) + st.wall_time_s
        tally.wall_time_s = max(wall.values())
        return torch.cat(samples), None if labels[0] is None else torch.cat(labels), tally


def differing(a: dict, b: dict) -> list[str]:
    """The settings (keys) in which two run keys differ, sorted."""
    return sorted(k for k in {*a, *b} if a.get(k) != b.get(k))


def _stats(d: dict) -> SampleStats:
    """SampleStats from ``as_dict()`` (arm counts as arm_<k>)."""
    arms = {int(k[4:]): int(d.pop(k)) for k in [k for k in d if k.startswith("arm_")]}
    return SampleStats(**d, arm_counts=arms)
