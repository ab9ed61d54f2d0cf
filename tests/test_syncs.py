"""Host syncs per round: a GPU sampler loses time whenever the host waits for the device, so the samplers
promise a fixed number of waits — none for the plain solvers and rca with a fixed leap, one per round
(``Evaluator.fetch``) for ``speculative``, ``sfm`` and rca's leap bandit (the correction its reward reads), besides the shell's one check of the input noise. This runs on the CPU:
``OpCounter`` counts every op that would make the host wait for a CUDA device (reading a value, nonzero,
boolean-mask indexing, a copy to the host, …) outside the model and outside ``@host_side`` code. Controls
show the counter sees a hidden sync, however it is written.
"""
import pytest
import torch

from specflow.data.toy import GaussianMixture
from specflow.sampling import build_sampler, speculative
from specflow.sampling.opcount import OpCounter

GM = GaussianMixture.default(dim=4, seed=0)
NOISE_CHECK = 1  # sample() checks the noise for NaN/Inf once, before the run


class _Draft(torch.nn.Module):  # a network drafter: the target's velocity, slightly off
    def forward(self, x, t, cond=None):
        return GM.velocity(x, t) * 1.01


def _count(name, **options):
    sampler = build_sampler(name, steps=24, **options)
    noise = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    counter = OpCounter()
    draft = counter.exclude(_Draft()) if options.get("drafter") == "model" else None
    with counter:
        res = sampler.sample(counter.exclude(GM.velocity), noise, draft=draft,
                             generator=torch.Generator().manual_seed(1))
    return counter, res.stats


@pytest.mark.parametrize("name", ["euler", "heun", "ab2", "sde", "rca"])
def test_plain_solvers_never_wait_for_the_device(name):
    counter, _ = _count(name)
    assert len(counter.syncs) == NOISE_CHECK
    assert counter.calls["Evaluator.fetch"] == 1  # the deferred NaN checks, once, at the end


@pytest.mark.parametrize("name,options", [
    ("speculative", dict(drafter="frozen", window=8)), ("speculative", dict(drafter="extrapolate", window=4)),
    ("speculative", dict(drafter="extrapolate", window="bandit")),
    ("speculative", dict(drafter="frozen", window=8, row_bucket=16)),
    ("speculative", dict(drafter="model", window=4)),
    ("sfm", dict(drafter="frozen", leap=4)), ("sfm", dict(drafter="extrapolate", leap="bandit", mu=1.0)),
    ("sfm", dict(drafter="model", leap=4))], ids=str)
def test_speculative_samplers_sync_once_per_round(name, options):
    counter, stats = _count(name, **options)
    assert stats.rounds > 3
    assert len(counter.syncs) == NOISE_CHECK
    assert counter.calls["Evaluator.fetch"] == stats.rounds + 1  # one per round + the one that finds all done
    assert counter.ops > 10 * stats.rounds  # the counter does see the round's device work


@pytest.mark.parametrize("mu,fetches", [(1.0, "rounds"), (0.0, "none")])
def test_rca_bandit_syncs_once_per_round_when_it_prices_error(mu, fetches):
    counter, stats = _count("rca", leap="bandit", mu=mu)
    assert stats.rounds > 3 and len(counter.syncs) == NOISE_CHECK
    # priced: one fetch per round (the round's NaN checks ride on it); calls only: the one deferred check at the end
    assert counter.calls["Evaluator.fetch"] == (stats.rounds if fetches == "rounds" else 1)


def test_fastflow_syncs_once_per_real_call():
    counter, stats = _count("fastflow", mu=0.01)  # its one sync: the extrapolation error its bandit learns from
    assert len(counter.syncs) == NOISE_CHECK
    assert counter.calls["Evaluator.fetch"] == stats.sequential_nfe - 2  # every call after the first two


@pytest.mark.parametrize("peek", [lambda k: int(k.max()), lambda k: k.tolist(), lambda k: k.cpu(),
                                  lambda k: (k > 3).nonzero(), lambda k: k[k > 3]], ids=["int", "tolist", "cpu",
                                                                                          "nonzero", "mask"])
def test_counter_sees_a_hidden_sync(monkeypatch, peek):
    """Control: a round that reads one device value on the host is caught, whichever way it reads it."""
    settle = speculative.Speculative._settle

    def settle_and_peek(self, c, *a):
        settle(self, c, *a)
        peek(c.k)

    monkeypatch.setattr(speculative.Speculative, "_settle", settle_and_peek)
    counter, stats = _count("speculative", drafter="frozen", window=8)
    assert len(counter.syncs) == NOISE_CHECK + stats.rounds


def test_counter_sees_a_read_of_an_uploaded_tensor(monkeypatch):
    """Control: the rows uploaded from the host plan are device data once uploaded (on a CPU ``.to`` returns
    the same object, the counter copies it), so reading them back is a sync."""
    evaluate = speculative.Speculative._evaluate

    def evaluate_and_peek(self, f, r, c, p, idx):
        evaluate(self, f, r, c, p, idx)
        idx.tolist()

    monkeypatch.setattr(speculative.Speculative, "_evaluate", evaluate_and_peek)
    counter, stats = _count("speculative", drafter="frozen", window=8)
    assert len(counter.syncs) == NOISE_CHECK + stats.rounds
