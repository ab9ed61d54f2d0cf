"""Exactness of the speculative sampler: its output law equals ``sde`` on the same grid.

Two independent sample sets (different seeds) are compared by an energy-distance permutation test, KS tests
on every coordinate and on random projections, and mean/covariance z-tests. A deliberately lossy variant
(accept every draft) must be caught by the same helper: that control proves the test has power.
"""
import math

import pytest
import torch
from scipy import stats as sps

from specflow.data.toy import GaussianMixture
from specflow.sampling import build_sampler
from specflow.sampling.speculative import Speculative

N_SAMPLES, STEPS = 4000, 30




def _energy_pvalue(a, b, n=2000, perms=200, seed=0):
    """Permutation p-value of the energy distance −wᵀDw (w = +1/n on a, −1/m on b), distances blocked."""
    z = torch.cat([a[:n], b[:n]]).double()
    g = torch.Generator().manual_seed(seed)
    w0 = torch.cat([torch.full((n,), 1.0 / n), torch.full((n,), -1.0 / n)]).double()
    idx = torch.stack([torch.arange(2 * n)] + [torch.randperm(2 * n, generator=g) for _ in range(perms)], 1)
    W = w0[idx]  # (2n, perms + 1): column 0 the observed labelling
    quad = torch.zeros(perms + 1, dtype=torch.float64)
    for i in range(0, 2 * n, 1000):
        quad += (W[i:i + 1000] * (torch.cdist(z[i:i + 1000], z) @ W)).sum(0)
    e = -quad
    return (1 + (e[1:] >= e[0]).sum().item()) / (perms + 1)


def two_sample(a, b, seed=0):
    """p-values (Bonferroni-adjusted where several) that a and b share one law."""
    n, D = a.shape
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(D, 8, generator=g, dtype=torch.float64)
    proj_a, proj_b = torch.cat([a, a @ dirs], 1), torch.cat([b, b @ dirs], 1)
    ks = min(sps.ks_2samp(proj_a[:, i].numpy(), proj_b[:, i].numpy()).pvalue for i in range(D + 8)) * (D + 8)
    z_mean = ((a.mean(0) - b.mean(0)) / (a.var(0) / n + b.var(0) / n).sqrt()).abs().max().item()
    ca, cb = a - a.mean(0), b - b.mean(0)
    pa, pb = ca[:, :, None] * ca[:, None], cb[:, :, None] * cb[:, None]  # (n, D, D) products
    z_cov = ((pa.mean(0) - pb.mean(0)) / (pa.var(0) / n + pb.var(0) / n).sqrt()).abs().max().item()
    # two-sided normal tail, Bonferroni over the D (mean) and D² (cov) entries
    p_mean = min(1.0, math.erfc(z_mean / math.sqrt(2)) * D)
    p_cov = min(1.0, math.erfc(z_cov / math.sqrt(2)) * D * D)
    return {"energy": _energy_pvalue(a, b), "ks": min(ks, 1.0), "mean": p_mean, "cov": p_cov}


def same_law(p):
    """The decision: every test passes at a family level of about 1 % (energy's floor is 1/201)."""
    return p["energy"] > 0.005 and p["ks"] > 0.002 and p["mean"] > 0.002 and p["cov"] > 0.002


def _run(sampler, gm, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(N_SAMPLES, gm.dim, generator=g, dtype=torch.float64)
    return sampler.sample(gm, x0, generator=g)


_BASE = {}


def _baseline(dim):
    if dim not in _BASE:
        gm = GaussianMixture.default(dim=dim)
        _BASE[dim] = gm, _run(build_sampler("sde", steps=STEPS), gm, seed=1).samples
    return _BASE[dim]


def assert_same_law_as_sde(dim, **options):
    """``speculative`` with these options against ``sde`` on the same grid; returns the run's stats."""
    gm, ref = _baseline(dim)
    res = _run(build_sampler("speculative", steps=STEPS, **options), gm, seed=2)
    p = two_sample(res.samples, ref)
    assert same_law(p), p
    st = res.stats
    # the drafts are good but not perfect: both acceptance and rejection (hence the coupling) are exercised
    assert 0.3 < st.acceptance_rate < 0.999 and st.proposed - st.accepted > 100, st
    return st


@pytest.mark.parametrize("dim,options", [
    (2, dict(drafter="frozen", window=2)),
    (2, dict(drafter="frozen", window=8)),
    (2, dict(drafter="extrapolate", window=2)),
    (2, dict(drafter="extrapolate", window=8)),
    (2, dict(drafter="frozen", window=8, draft_eta=0.7)),  # general maximal coupling
    (8, dict(drafter="extrapolate", window=8)),
    (8, dict(drafter="frozen", window=4, draft_eta=0.8)),
])
def test_speculative_matches_sde_in_law(dim, options):
    st = assert_same_law_as_sde(dim, **options)
    assert st.sequential_nfe <= st.rounds < STEPS


class _AcceptAll(Speculative):
    """LOSSY control: accepts every draft (the verification is ignored)."""

    def _verify(self, r, ex, L, jj):
        super()._verify(r, ex, L, jj)
        return L.clone()


class _NoReflection(Speculative):
    """Subtly LOSSY control: on rejection, x = m + c·ε with the draft's own ε instead of its mirror image."""

    def _couple(self, m_hat, m, c, eps):
        return m + c.view(-1, *([1] * (eps.ndim - 1))) * eps


@pytest.mark.parametrize("control", [_AcceptAll, _NoReflection])
def test_two_sample_helper_catches_lossy_variants(control):
    gm, ref = _baseline(2)
    res = _run(control(steps=STEPS, drafter="frozen", window=8), gm, seed=2)
    p = two_sample(res.samples, ref)
    assert not same_law(p), p


def test_draft_equal_to_target_reproduces_sde_sample_for_sample():
    gm = GaussianMixture.default(dim=3)
    x0 = torch.randn(300, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = build_sampler("sde", steps=25).sample(gm, x0, generator=torch.Generator().manual_seed(5)).samples
    for window, drafter in ((1, "model"), (3, "model"), (8, "model"), (3, "anchored"), (8, "anchored")):
        res = build_sampler("speculative", steps=25, drafter=drafter, window=window).sample(
            gm, x0, draft=gm, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(res.samples, ref, rtol=1e-10, atol=1e-10)
        assert res.stats.acceptance_rate > 0.999 and res.stats.rounds == math.ceil(25 / window)
        # a last round holding only the target's own (already paid) step makes no call
        assert res.stats.sequential_nfe == res.stats.rounds - (25 % window == 1 or window == 1)


def test_transition_coefficients_match_transition_mean():
    from specflow.path import transition_coefficients, transition_mean, transition_std
    g = torch.Generator().manual_seed(0)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.9
    s = t + torch.rand(64, generator=g, dtype=torch.float64) * (1 - t)
    t[0], s[1] = 0.0, 1.0  # the edges
    x, v = torch.randn(64, 3, generator=g, dtype=torch.float64), torch.randn(64, 3, generator=g, dtype=torch.float64)
    for eta in (1.0, 0.6):
        a, b, c = transition_coefficients(t, s, eta)
        torch.testing.assert_close(a[:, None] * x + b[:, None] * v, transition_mean(x, t, s, v, eta))
        assert c.equal(transition_std(t, s, eta)) and c[1] == 0


def test_row_bucket_pads_the_target_call_and_counts_the_padding():
    gm = GaussianMixture.default(dim=3)
    x0 = torch.randn(10, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    calls = []
    model = lambda x, t, cond=None: calls.append(x.shape[0]) or gm(x, t)  # noqa: E731
    runs = [build_sampler("speculative", steps=20, window=4, row_bucket=b).sample(
        model, x0, generator=torch.Generator().manual_seed(1)) for b in (0, 16)]
    sizes, padded = calls[:runs[0].stats.sequential_nfe], calls[runs[0].stats.sequential_nfe:]
    assert all(n % 16 == 0 for n in padded) and any(n % 16 for n in sizes)
    torch.testing.assert_close(runs[0].samples, runs[1].samples, rtol=0, atol=0)  # padding changes nothing else
    assert runs[1].stats.total_nfe == sum(padded) / 10 > runs[0].stats.total_nfe == sum(sizes) / 10
