"""The CUDA-graph contract, checked on the CPU: ``graphs.EMULATE`` records each piece's aten ops at its
capture (tensors held by reference, Python frozen) and replays the record, as a CUDA graph would. A sampler
whose pieces obey the contract replays exactly what it runs eagerly; controls that break it (a tensor
rebound between pieces, a piece that syncs) are caught. The real CUDA graphs and the torch.compile'd round
are checked against eager at the end (GPU-only tests, run by benchmarks/gpu_check.sh; no scipy here, which
the device machine may lack)."""
import dataclasses
import subprocess
import sys

import pytest
import torch

from specflow.data.toy import GaussianMixture
from specflow.sampling import build_sampler, graphs
from specflow.sampling.base import SAMPLERS
from specflow.sampling.speculative import Speculative

GM = GaussianMixture.default(dim=16)
X0 = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))


def _runs(monkeypatch, name, **options):
    out = []
    for emulate in (False, True):
        monkeypatch.setattr(graphs, "EMULATE", emulate)
        out.append(build_sampler(name, steps=50, **options).sample(GM, X0, generator=torch.Generator().manual_seed(3)))
    return out


def _stats(r):
    return (r.stats.proposed, r.stats.accepted, r.stats.rounds, r.stats.sequential_nfe, r.stats.total_nfe,
            r.stats.arm_counts)


@pytest.mark.parametrize("name,options", [
    ("speculative", dict(drafter="frozen", window=8)), ("speculative", dict(drafter="extrapolate", window=4)),
    ("speculative", dict(drafter="frozen", window="bandit")),
    ("sfm", dict(drafter="extrapolate", leap=4)), ("sfm", dict(drafter="frozen", leap="bandit", mu=1.0)),
    ("sfm", dict(drafter="frozen", leap="bandit", mu=1.0, check="local"))], ids=str)
def test_replayed_pieces_match_the_eager_run(monkeypatch, name, options):
    eager, replayed = _runs(monkeypatch, name, **options)
    assert torch.equal(eager.samples, replayed.samples)
    assert _stats(eager) == _stats(replayed)


@dataclasses.dataclass
class _Rebinding(Speculative):
    """Graph-unsafe on purpose: between the pieces (eager code) the state becomes a new tensor, so the
    replayed pieces keep reading and writing the old one."""

    name = "_rebinding"

    def _evaluate(self, f, r, c, p, idx):
        super()._evaluate(f, r, c, p, idx)
        c.x = c.x.clone()


def test_control_a_piece_that_reads_a_rebound_tensor_is_caught(monkeypatch):
    monkeypatch.setitem(SAMPLERS, "_rebinding", _Rebinding)
    eager, replayed = _runs(monkeypatch, "_rebinding", drafter="frozen", window=8)
    safe, _ = _runs(monkeypatch, "speculative", drafter="frozen", window=8)
    assert torch.equal(eager.samples, safe.samples)  # eagerly the rebinding is harmless …
    assert not torch.equal(replayed.samples, eager.samples)  # … replayed, it is not


def test_a_piece_that_waits_for_the_device_is_refused(monkeypatch):
    """A CUDA capture refuses host syncs; the emulation does too (control for the contract's third rule)."""
    monkeypatch.setattr(graphs, "EMULATE", True)

    @dataclasses.dataclass
    class _Peeking(Speculative):
        name = "_peeking"

        def _settle(self, c, r, jj, drafter, keys):
            super()._settle(c, r, jj, drafter, keys)
            c.k[c.k > 1000] = 0  # boolean-mask indexing: a nonzero, i.e. a sync

    monkeypatch.setitem(SAMPLERS, "_peeking", _Peeking)
    with pytest.raises(RuntimeError, match="must not wait for the device"):
        build_sampler("_peeking", steps=50).sample(GM, X0, generator=torch.Generator().manual_seed(3))


def _cuda_mixture():
    gm = GaussianMixture.default(dim=16)
    gm.means, gm.stds, gm.weights = gm.means.cuda(), gm.stds.cuda(), gm.weights.cuda()
    return gm


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name,options", [
    ("speculative", dict(drafter="frozen", window=8)), ("speculative", dict(drafter="extrapolate", window=4)),
    ("speculative", dict(drafter="frozen", window="bandit")),
    ("sfm", dict(drafter="extrapolate", leap=4)), ("sfm", dict(drafter="frozen", leap="bandit", mu=1.0)),
    ("sfm", dict(drafter="frozen", leap="bandit", mu=1.0, check="local"))], ids=str)
def test_cuda_graphs_replay_the_eager_round_exactly(name, options):
    gm = _cuda_mixture()
    x0 = torch.randn(256, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    runs = [build_sampler(name, steps=50, cuda_graphs=g, **options).sample(
        gm, x0, generator=torch.Generator("cuda").manual_seed(3)) for g in (False, True)]
    assert torch.equal(runs[0].samples, runs[1].samples)
    assert _stats(runs[0]) == _stats(runs[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_compiled_cuda_graphs_match_the_eager_round():
    gm = _cuda_mixture()
    x0 = torch.randn(256, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(0), dtype=torch.float64)
    runs = [build_sampler("speculative", steps=50, drafter="extrapolate", window=4, compile=c).sample(
        gm, x0, generator=torch.Generator("cuda").manual_seed(3)) for c in (False, True)]
    torch.testing.assert_close(runs[1].samples, runs[0].samples, rtol=0, atol=1e-10)
    assert runs[0].stats.accepted == runs[1].stats.accepted and runs[0].stats.rounds == runs[1].stats.rounds


_COMPILED_VS_EAGER = """
import warnings, torch
from specflow.data.toy import GaussianMixture
from specflow.sampling import build_sampler
gm = GaussianMixture.default(dim=4)
x0 = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)  # a compiler failure falls back with a RuntimeWarning
    runs = [build_sampler("speculative", steps=8, drafter="extrapolate", window=2, compile=c).sample(
        gm, x0, generator=torch.Generator().manual_seed(1)) for c in (False, True)]
torch.testing.assert_close(runs[1].samples, runs[0].samples, rtol=0, atol=1e-10)
stats = [(r.stats.proposed, r.stats.accepted, r.stats.rounds) for r in runs]
assert stats[0] == stats[1], stats
assert stats[0][1] < stats[0][0], stats  # rejections (the coupling) were exercised
print("ok")
"""


def test_compiled_round_matches_the_eager_round():
    """compile=True fuses the same arithmetic: in float64 the chain takes the same accept/reject decisions and
    lands within rounding of the eager samples (a wrong fusion, e.g. a dropped in-place update, would not).
    A compiler failure, which falls back to eager, is an error here. In its own process: torch.compile starts
    threads that would break later fork-based (ddp_fork) tests."""
    run = subprocess.run([sys.executable, "-c", _COMPILED_VS_EAGER], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
