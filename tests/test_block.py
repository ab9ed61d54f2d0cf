"""Block verification (``verifier="block"``): the same law as ``sde``, more steps kept than the greedy rule.

The two-sample helper and its baseline are test_speculative's; a lossy control (a block verifier that keeps
the draft instead of drawing its residual) must be caught by it. The one-step residual sampler is checked
against its exact CDF, where a residual drawn with the wrong weight is caught: at the sizes of the law tests
that mistake (the greedy rule's residual after the block's choice) is too small to see in the output law.
"""
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps
from scipy.integrate import quad

from specflow.sampling import build_sampler
from specflow.sampling.block import kept_steps, residual_draw, residual_log_mass
from specflow.sampling.noise import per_sample_generators
from specflow.sampling.speculative import Speculative
from test_speculative import STEPS, _baseline, _run, assert_same_law_as_sde, same_law, two_sample


@pytest.mark.parametrize("dim,options", [
    (2, dict(drafter="frozen", window=4)),
    (2, dict(drafter="frozen", window=16)),
    (2, dict(drafter="extrapolate", window=8)),
    (8, dict(drafter="extrapolate", window=8)),
    (8, dict(drafter="frozen", window="bandit")),
])
def test_block_verifier_matches_sde_in_law(dim, options):
    assert_same_law_as_sde(dim, verifier="block", **options)  # residuals exercised too


class _KeepDraft(Speculative):
    """LOSSY control: block verification that keeps the rejected draft instead of drawing the residual."""

    def _next_state(self, r, a, L, k, keys):
        rej = a < L
        return r.Y[torch.where(rej, a + 1, L), r.ar], rej


def test_two_sample_helper_catches_a_lossy_block_variant():
    gm, ref = _baseline(2)
    res = _run(_KeepDraft(steps=STEPS, drafter="frozen", window=8, verifier="block"), gm, seed=2)
    p = two_sample(res.samples, ref)
    assert not same_law(p), p


def test_block_keeps_more_steps_per_round_than_greedy():
    gm, _ = _baseline(8)
    kept = {}
    for v in ("greedy", "block"):
        st = _run(build_sampler("speculative", steps=STEPS, drafter="extrapolate", window=8, verifier=v),
                  gm, seed=3).stats
        kept[v] = st.accepted / (st.proposed - st.accepted)  # steps kept per round that ends in a rejection
    assert kept["block"] > 1.03 * kept["greedy"], kept


@pytest.mark.parametrize("log_a,d", [(0.0, 0.3), (math.log(0.4), 1.5), (math.log(0.05), 0.2), (math.log(0.9), 4.0)])
def test_residual_draw_follows_its_exact_law(log_a, d):
    """1-D: u = e·(x − m̂)/c has density ∝ (a·φ(u − d) − φ(u))+; KS against the exact CDF, a wrong a caught."""
    n, D = 20000, 3
    g = torch.Generator().manual_seed(0)
    m_hat = torch.zeros(n, D, dtype=torch.float64)
    m = m_hat.clone()
    m[:, 0] = 2.0 * d  # c = 2: d noise units apart, along the first axis
    c = torch.full((n,), 2.0, dtype=torch.float64)
    x = residual_draw(m_hat, m, c, torch.full((n,), log_a, dtype=torch.float64),
                      torch.randn(n, D, generator=g, dtype=torch.float64),
                      torch.rand(n, generator=g, dtype=torch.float64))
    a, u_star = math.exp(log_a), d / 2 - log_a / d  # a·φ(u − d) = φ(u) at u*

    def log_g(u, log_a=log_a):  # log ∫_u^∞ (a·φ(v − d) − φ(v)) dv for u ≥ u*, by scipy's log tails
        hi = log_a + sps.norm.logsf(u - d)
        return hi + np.log(-np.expm1(np.minimum(sps.norm.logsf(u) - hi, 0.0)))
    log_mass = residual_log_mass(torch.tensor(log_a, dtype=torch.float64), torch.tensor(d, dtype=torch.float64)).item()
    assert abs(log_mass - log_g(u_star)) < 1e-9
    scale = math.exp(-log_mass)  # quadrature of the rescaled density: the mass may be 1e-50
    dens = lambda u: scale * max(a * sps.norm.pdf(u - d) - sps.norm.pdf(u), 0.0)  # noqa: E731
    assert abs(quad(dens, u_star, u_star + 40, epsabs=0, epsrel=1e-10)[0] - 1) < 1e-6

    def cdf(u, log_a=log_a):
        us = d / 2 - log_a / d
        u = np.maximum(np.asarray(u, dtype=np.float64), us)
        return -np.expm1(log_g(u, log_a) - log_g(us, log_a))
    u = (x[:, 0] / 2).numpy()
    assert sps.kstest(u, cdf).pvalue > 1e-3
    # power: the residual of a quarter of the weight is caught (the inverse CDF maps the same uniforms, so the
    # right law's p-value is that of the uniforms themselves)
    assert sps.kstest(u, lambda v: cdf(v, log_a - math.log(4))).pvalue < 1e-6
    perp = x[:, 1:] / 2  # orthogonal to m − m̂: N(0, 1) untouched
    assert sps.kstest(perp.flatten().numpy(), "norm").pvalue > 1e-3


def test_kept_steps_edges():
    L = torch.tensor([3, 3, 1, 0])
    ex = torch.tensor([False, True, False, False])
    zeros = torch.zeros(3, 4, dtype=torch.float64)
    # a perfect draft (log ratio 0, no distance) is kept whole; padding beyond L is never kept
    tau, log_p = kept_steps(zeros, zeros, torch.full((3, 4), -1e-9, dtype=torch.float64), L, ex)
    assert tau.tolist() == [3, 3, 1, 0] and log_p.eq(0).all()
    # a hopeless draft (ratio 0 at every step) keeps nothing but the target's own step
    tau, _ = kept_steps(torch.full((3, 4), -math.inf, dtype=torch.float64), torch.full((3, 4), math.inf,
                        dtype=torch.float64), torch.full((3, 4), -1e-9, dtype=torch.float64), L, ex)
    assert tau.tolist() == [0, 1, 0, 0]


def test_block_sample_is_the_same_alone_or_in_a_batch():
    gm, _ = _baseline(2)
    noise = torch.randn(40, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    idx = [5, 17, 33]
    s = build_sampler("speculative", steps=30, drafter="extrapolate", window=4, verifier="block")
    full = s.sample(gm, noise, generator=per_sample_generators(7, range(40))).samples
    alone = s.sample(gm, noise[idx], generator=per_sample_generators(7, idx)).samples
    torch.testing.assert_close(alone, full[idx], rtol=1e-12, atol=1e-12)
    other = s.sample(gm, noise[idx], generator=per_sample_generators(8, idx)).samples
    assert not other.equal(alone)


@pytest.mark.parametrize("options,message", [
    (dict(verifier="beam"), "valid: greedy, block, tree"),
    (dict(verifier="block", draft_eta=0.7), "draft_eta=None"),
    (dict(verifier="block", compile=True), "compile=False"),
])
def test_block_bad_options_are_refused_with_the_reason(options, message):
    with pytest.raises(ValueError, match=message):
        build_sampler("speculative", steps=20, **options)
