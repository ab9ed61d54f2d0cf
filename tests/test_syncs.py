"""Host syncs per round: a GPU sampler loses time whenever the host waits for the device, so the samplers
promise a fixed number of waits — none for the plain solvers, one per round (``Evaluator.fetch``) for
``speculative`` and ``sfm``. This runs on the CPU: every aten op that would make the host wait for a CUDA
device (reading a value, nonzero, boolean-mask indexing, …) is counted unless it runs in host-side code by
design (the round's plan, the bandit, the model itself). A control shows the counter sees a hidden sync.
"""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from specflow.data.toy import GaussianMixture
from specflow.sampling import build_sampler, sfm, speculative
from specflow.sampling.stats import Evaluator

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
           aten.masked_select.default, aten.equal.default, aten.repeat_interleave.Tensor,
           aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default}


class SyncCounter(TorchDispatchMode):
    """Counts the ops that sync a CUDA device with the host, outside ``host()`` blocks, and the fetches."""

    def __init__(self):
        super().__init__()
        self.syncs, self.fetches, self.paused = [], 0, 1  # counting starts inside the sampler's _run

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused and (func in SYNCING or _bool_indexing(func, args)):
            self.syncs.append(str(func))
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def host(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def wrap(self, fn, fetch=False):
        def wrapped(*a, **k):
            if fetch:
                self.fetches += 1
            with self.host():
                return fn(*a, **k)
        return wrapped

    def watch(self, fn):
        def watched(*a, **k):
            self.paused -= 1
            try:
                return fn(*a, **k)
            finally:
                self.paused += 1
        return watched


def _bool_indexing(func, args) -> bool:  # x[mask] and x[mask] = y find their rows with a nonzero
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return False
    return any(i is not None and i.dtype == torch.bool for i in args[1])


GM = GaussianMixture.default(dim=4, seed=0)


def _count(monkeypatch, name, model=GM.velocity, **options):
    counter = SyncCounter()
    monkeypatch.setattr(Evaluator, "fetch", counter.wrap(Evaluator.fetch, fetch=True))
    monkeypatch.setattr(speculative._Plan, "__init__", counter.wrap(speculative._Plan.__init__))
    monkeypatch.setattr(speculative.Speculative, "_play_bandit", counter.wrap(speculative.Speculative._play_bandit))
    monkeypatch.setattr(sfm.SFM, "_plan", counter.wrap(sfm.SFM._plan))
    sampler = build_sampler(name, steps=24, **options)
    sampler._run = counter.watch(sampler._run)  # not the shell's one-off input checks
    noise = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    with counter:
        res = sampler.sample(counter.wrap(model), noise, generator=torch.Generator().manual_seed(1))
    return counter, res.stats


@pytest.mark.parametrize("name", ["euler", "heun", "ab2", "sde", "rca"])
def test_plain_solvers_never_wait_for_the_device(monkeypatch, name):
    counter, _ = _count(monkeypatch, name)
    assert counter.syncs == [] and counter.fetches == 1  # the deferred NaN checks, once, at the end


@pytest.mark.parametrize("options", [dict(drafter="frozen", leap=4), dict(drafter="extrapolate", leap="bandit")],
                         ids=str)
def test_sfm_syncs_once_per_round(monkeypatch, options):
    counter, stats = _count(monkeypatch, "sfm", **options)
    assert stats.rounds > 3
    assert counter.syncs == []
    assert counter.fetches == stats.rounds + 1  # one per round, and the one that finds every sample done


@pytest.mark.parametrize("options", [dict(drafter="frozen", window=8), dict(drafter="extrapolate", window=4),
                                     dict(drafter="extrapolate", window="bandit"),
                                     dict(drafter="frozen", window=8, row_bucket=16)], ids=str)
def test_speculative_syncs_once_per_round(monkeypatch, options):
    counter, stats = _count(monkeypatch, "speculative", **options)
    assert stats.rounds > 3
    assert counter.syncs == []
    assert counter.fetches == stats.rounds + 1  # one per round, and the one that finds every sample done


def test_counter_sees_a_hidden_sync(monkeypatch):
    """Control: a round that reads one device value on the host is caught."""
    settle = speculative.Speculative._settle

    def settle_and_peek(self, c, *a):
        settle(self, c, *a)
        int(c.k.max())

    monkeypatch.setattr(speculative.Speculative, "_settle", settle_and_peek)
    counter, stats = _count(monkeypatch, "speculative", drafter="frozen", window=8)
    assert len(counter.syncs) == stats.rounds

