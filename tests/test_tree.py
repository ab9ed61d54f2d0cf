"""Draft trees (``verifier="tree"``): the same law as ``sde``, every branch's rows paid for.

The branch choice is checked alone first, in one dimension against the exact target law with a lossy
control (each branch tried with the plain ratio min(1, P/Q): it over-keeps draft-like points) that must be
caught: at the sizes of the law tests that mistake is too small to see in the output law. Then the whole
sampler by test_speculative's two-sample helper against ``sde``, where a tree that redraws a rejection
from the draft instead of the residual must be caught.
"""
import pytest
import torch
from scipy import stats as sps

import specflow.sampling.tree as tree
from specflow.sampling import build_sampler
from specflow.sampling.block import residual_draw
from specflow.sampling.noise import per_sample_generators
from test_speculative import STEPS, _baseline, _run, assert_same_law_as_sde, same_law, two_sample


def _plain_ratio_choice(ell, dist, log_u):
    """LOSSY: every branch judged by min(1, P/Q), the residual (P − Q)+ as if there were one branch."""
    K = ell.shape[0]
    ok = log_u < ell.clamp(max=0.0)
    first = torch.where(ok.any(0), ok.long().argmax(0), K)
    return first, torch.zeros_like(dist, dtype=torch.float64)


def _one_step(choose, K, d, n=100_000, seed=0):
    """n draws of one step chosen among K candidates from Q = N(0, 1), target P = N(d, 1) (1-D, c = 1)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(K, n, generator=g, dtype=torch.float64)
    ell = d * y - d * d / 2  # log N(y; d, 1) − log N(y; 0, 1)
    chosen, log_a = choose(ell, torch.full((n,), d, dtype=torch.float64), torch.rand(K, n, generator=g).log())
    res = residual_draw(torch.zeros(n, 1, dtype=torch.float64), torch.full((n, 1), d, dtype=torch.float64),
                        torch.ones(n, dtype=torch.float64), log_a, torch.randn(n, 1, generator=g, dtype=torch.float64),
                        torch.rand(n, generator=g, dtype=torch.float64))[:, 0]
    picked = y.gather(0, chosen.clamp(max=K - 1)[None])[0]
    return torch.where(chosen < K, picked, res), chosen


@pytest.mark.parametrize("K,d", [(2, 0.5), (2, 2.0), (3, 1.0), (4, 3.0)])
def test_branch_choice_is_an_exact_draw_from_the_target_step(K, d):
    x, chosen = _one_step(tree.choose_branch, K, d)
    assert sps.kstest(x.numpy(), sps.norm(loc=d).cdf).pvalue > 1e-3
    # more branches are chosen from than the one a single draft would give: 1 − TV = 2Φ(−d/2)
    single = 2 * sps.norm.cdf(-d / 2)
    assert (chosen < K).double().mean().item() > single + 0.02
    lossy, _ = _one_step(_plain_ratio_choice, K, d)
    assert sps.kstest(lossy.numpy(), sps.norm(loc=d).cdf).pvalue < 1e-6


@pytest.mark.parametrize("dim,options", [
    (2, dict(drafter="frozen", window=4)),
    (2, dict(drafter="extrapolate", window=8, branches=3)),
    (8, dict(drafter="extrapolate", window=8)),
    (8, dict(drafter="frozen", window="bandit")),
])
def test_tree_verifier_matches_sde_in_law(dim, options):
    assert_same_law_as_sde(dim, verifier="tree", **options)  # residuals exercised too


def test_after_the_branch_point_the_chosen_branch_is_block_verified_as_a_window_of_its_own():
    """Forcing the steps up to the branch point as kept (weight 1) equals block verification of the sub-window
    that starts at the chosen state: the same steps kept and the same residual weight, row by row. A residual
    drawn with weight 1 instead (the greedy rule's) is the mistake the output-law tests are too weak to see."""
    from specflow.sampling.block import kept_steps
    g = torch.Generator().manual_seed(0)
    Lmax, B = 6, 400
    ell = torch.randn(Lmax, B, generator=g, dtype=torch.float64) * 0.7 - 0.2
    dist = torch.rand(Lmax, B, generator=g, dtype=torch.float64) * 2
    log_u = torch.rand(Lmax, B, generator=g, dtype=torch.float64).log()
    L = torch.randint(1, Lmax + 1, (B,), generator=g)
    bp = torch.randint(0, 2, (B,), generator=g)
    none = torch.rand(B, generator=g) < 0.2
    log_a_none = -torch.rand(B, generator=g, dtype=torch.float64)
    a, log_a = tree.after_branch_point(ell, dist, log_u, L, bp, none, log_a_none)
    for b in range(B):
        Lb, pb = int(L[b]), int(bp[b])
        if pb >= Lb:
            assert a[b] == Lb
            continue
        if none[b]:
            assert a[b] == pb and log_a[b] == log_a_none[b]
            continue
        n = Lb - pb - 1  # the sub-window after the chosen state
        if n == 0:
            assert a[b] == Lb
            continue
        sub = slice(pb + 1, Lb)
        tau, log_p = kept_steps(ell[sub, b:b + 1], dist[sub, b:b + 1], log_u[sub, b:b + 1], torch.tensor([n]),
                                torch.tensor([False]))
        assert a[b] == pb + 1 + tau[0], b
        if tau[0] < n:
            torch.testing.assert_close(log_a[b], log_p[tau[0], 0])
    assert ((log_a < 0) & (a < L) & ~none).sum() >= 10  # near misses carried to the residual: the case that matters


def test_two_sample_helper_catches_a_tree_without_residual(monkeypatch):
    """LOSSY: a rejected draft kept instead of redrawn from the residual."""
    monkeypatch.setattr(tree, "redraw", lambda y, *_: y)
    gm, ref = _baseline(2)
    res = _run(build_sampler("speculative", steps=STEPS, verifier="tree", drafter="frozen", window=8), gm, seed=2)
    assert not same_law(two_sample(res.samples, ref))


def test_tree_pays_every_branch_and_keeps_more_first_steps():
    gm, _ = _baseline(8)
    st = {v: _run(build_sampler("speculative", steps=STEPS, drafter="frozen", window=4, verifier=v), gm,
                  seed=3).stats for v in ("greedy", "tree")}
    # rows: the tree evaluates about two windows a round where greedy evaluates one
    assert st["tree"].total_nfe > 1.5 * st["greedy"].total_nfe
    assert st["tree"].acceptance_rate > st["greedy"].acceptance_rate


def test_tree_sample_is_the_same_alone_or_in_a_batch():
    gm, _ = _baseline(2)
    noise = torch.randn(40, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    idx = [5, 17, 33]
    s = build_sampler("speculative", steps=30, drafter="extrapolate", window=4, verifier="tree", branches=3)
    full = s.sample(gm, noise, generator=per_sample_generators(7, range(40))).samples
    alone = s.sample(gm, noise[idx], generator=per_sample_generators(7, idx)).samples
    torch.testing.assert_close(alone, full[idx], rtol=1e-12, atol=1e-12)
    other = s.sample(gm, noise[idx], generator=per_sample_generators(8, idx)).samples
    assert not other.equal(alone)


@pytest.mark.parametrize("options,message", [
    (dict(verifier="tree", branches=1), "integer >= 2"),
    (dict(verifier="tree", branches=2.5), "integer >= 2"),
    (dict(verifier="greedy", branches=3), "verifier='tree' only"),
    (dict(verifier="tree", drafter="model"), "'frozen', 'extrapolate'"),
    (dict(verifier="tree", draft_eta=0.7), "draft_eta=None"),
    (dict(verifier="tree", compile=True), "compile=False"),
    (dict(verifier="tree", row_bucket=8), "row_bucket=0"),
])
def test_tree_bad_options_are_refused_with_the_reason(options, message):
    with pytest.raises(ValueError, match=message):
        build_sampler("speculative", steps=20, **options)
