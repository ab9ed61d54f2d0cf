"""Every sampler reads a model output only before that model's next call, so it works with models that return
the same buffer every call: CUDA graphs, e.g. ``torch.compile(model, mode="reduce-overhead")``."""
import numpy as np
import pytest
import torch
from torch import nn

from specflow.data.toy import GaussianMixture
from specflow.nets import build_net
from specflow.nets.heads import MedusaHeads
from specflow.sampling import build_sampler
from specflow.sampling.solvers import Heun
from test_drafts import FeatureGMM  # not "tests.test_drafts": flow_matching installs a package named tests


class ReusesOutputs:
    """``net`` as CUDA graphs run it (torch.compile mode="reduce-overhead"): each method returns one buffer per
    output shape, and every invocation may overwrite what any earlier one returned — compiled target and draft
    share one memory pool — so a call NaN-fills every buffer of ``pool`` first: a stale read cannot go
    unnoticed. ``features`` then ``output`` count as one invocation (a trunk compiled as one)."""

    def __init__(self, net, pool: dict):
        self.net, self.pool = net, pool

    def _reuse(self, method: str, out: torch.Tensor, invocation: bool = True) -> torch.Tensor:
        if invocation:
            for buf in self.pool.values():
                buf.fill_(float("nan"))
        key = (id(self), method, out.shape, out.dtype)
        return self.pool.setdefault(key, torch.empty_like(out)).copy_(out)

    def __call__(self, *args, **kwargs):
        return self._reuse("forward", self.net(*args, **kwargs))

    def features(self, *args):
        return self._reuse("features", self.net.features(*args))

    def output(self, h):
        return self._reuse("output", self.net.output(h), invocation=False)


def _mlp_draft(dim=2):
    torch.manual_seed(0)
    net = build_net("mlp", dim=dim, hidden=16, depth=2).double().eval()
    nn.init.normal_(net.out.weight, std=0.3)  # its zero-initialised output would make v ≡ 0
    return net


CASES = [("euler", {}), ("heun", {}), ("ab2", {}), ("sde", {}), ("fastflow", dict(mu=0.01)), ("fastflow", {}),
         ("speculative", dict(drafter="frozen", window=4)), ("speculative", dict(window="bandit")),
         ("speculative", dict(window=3, draft_eta=0.6)), ("speculative", dict(drafter="model", window=4)),
         ("speculative", dict(drafter="medusa", window=4)), ("sfm", dict(leap=4, tol=0.05)),
         ("sfm", dict(leap="bandit", mu=1.0)), ("sfm", dict(drafter="model", leap=3, tol=0.5)),
         ("sfm", dict(drafter="medusa", leap=3)), ("rca", dict(leap=3)), ("rca", dict(drafter="model", leap=2))]


def _sample(sampler, model, draft):
    x0 = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return sampler.sample(model, x0, draft=draft, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name,opts", CASES, ids=str)
def test_a_model_that_reuses_its_output_buffer_gives_the_same_samples(name, opts):
    gm = GaussianMixture.default()
    drafter = opts.get("drafter")
    target = FeatureGMM(gm) if drafter == "medusa" else gm
    draft = {"model": _mlp_draft(), "medusa": MedusaHeads(5, 2, None, hidden=8).double().eval()}.get(drafter)
    s_ref, s_got = build_sampler(name, steps=20, **opts), build_sampler(name, steps=20, **opts)
    ref = _sample(s_ref, target, draft)
    pool = {}
    got = _sample(s_got, ReusesOutputs(target, pool), None if draft is None else ReusesOutputs(draft, pool))
    assert torch.equal(got.samples, ref.samples)
    assert got.stats.as_dict() | {"wall_time_s": 0} == ref.stats.as_dict() | {"wall_time_s": 0}
    assert _same(s_got.state_dict(), s_ref.state_dict())  # what a bandit (and fastflow's μ) learned


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (torch.Tensor, np.ndarray)):
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    return a == b


class _HoldingHeun(Heun):
    """Heun as usually written (d_cur is read after the second call): the control."""

    def _run(self, f, x, grid, draft, generator, stats):
        t, h = grid.to(x.device, x.dtype), grid.diff().tolist()
        for k in range(self.steps):
            d_cur = f(x, t[k], step=k)
            d_prime = f(x.add(d_cur, alpha=h[k]), t[k + 1], step=k)
            x = x.add(d_cur + d_prime, alpha=h[k] / 2)
        return x


def test_control_a_sampler_that_holds_an_output_is_caught():
    gm = GaussianMixture.default()
    ref = _sample(_HoldingHeun(steps=20), gm, None)
    torch.testing.assert_close(ref.samples, _sample(Heun(steps=20), gm, None).samples)  # a correct Heun otherwise
    got = _sample(_HoldingHeun(steps=20), ReusesOutputs(gm, {}), None).samples  # d_cur reads d_prime
    assert (got - ref.samples).abs().max() > 1e-3
