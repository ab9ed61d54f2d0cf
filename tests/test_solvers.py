"""Plain solvers against the exact flow of Gaussian data, whose ODE map is x1 = μ + s·x0."""
import re

import pytest
import torch

from specflow.data.toy import GaussianMixture
from specflow.path import time_grid
from specflow.sampling import build_sampler

MU, S = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64), 0.3


def _err(name, steps, schedule="uniform"):
    gm = GaussianMixture(MU, S)
    x0 = torch.randn(256, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = build_sampler(name, steps=steps, schedule=schedule).sample(gm.velocity, x0)
    return (res.samples - (MU + S * x0)).abs().max().item(), res.stats


@pytest.mark.parametrize("schedule", ["uniform", "quadratic", "edm"])
@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2), ("ab2", 2)])
def test_convergence_order(name, order, schedule):
    e1, _ = _err(name, 20, schedule)
    e2, _ = _err(name, 40, schedule)
    assert abs(torch.log2(torch.tensor(e1 / e2)).item() - order) < 0.3, (e1, e2)


@pytest.mark.parametrize("schedule", ["uniform", "quadratic", "edm"])
def test_ab2_is_exact_for_a_velocity_linear_in_t(schedule):
    """AB2 integrates v = a + b·t exactly after its first (Euler) step, whose error is b·h0²/2 — on any grid,
    if its variable-step coefficients are right (the convergence order cannot tell: on a smooth grid the
    uniform-step formula is second order too)."""
    a, b = torch.tensor([[0.3, -1.0]], dtype=torch.float64), 2.0
    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x1 = build_sampler("ab2", steps=13, schedule=schedule).sample(lambda x, t: a + b * t[:, None], x0).samples
    h0 = float(time_grid(13, dtype=torch.float64, schedule=schedule)[1])
    torch.testing.assert_close(x1, x0 + a + b / 2 - b * h0**2 / 2, rtol=0, atol=1e-13)


def test_sde_with_eta_zero_is_euler_and_counts():
    e_euler, st = _err("euler", 16)
    gm = GaussianMixture(MU, S)
    x0 = torch.randn(256, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = build_sampler("sde", steps=16, eta=0.0).sample(gm.velocity, x0).samples
    b = build_sampler("euler", steps=16).sample(gm.velocity, x0).samples
    torch.testing.assert_close(a, b)
    assert st.sequential_nfe == 16 and st.total_nfe == 16 and _err("heun", 8)[1].sequential_nfe == 16


def test_sde_reaches_point_mass_data_from_any_grid():
    # Point-mass data: the ancestral chain is exact, so every sample lands on the point.
    gm = GaussianMixture(torch.tensor([[0.7, -0.2]]), 0.0)
    x0 = torch.randn(64, 2, dtype=torch.float64)
    out = build_sampler("sde", steps=5).sample(gm.velocity, x0, generator=torch.Generator().manual_seed(0)).samples
    torch.testing.assert_close(out, gm.means.expand(64, 2))


def test_sde_seeded_generator_reproduces():
    gm = GaussianMixture.default()
    x0 = torch.randn(32, 2, dtype=torch.float64)
    run = lambda: build_sampler("sde", steps=10).sample(gm, x0, generator=torch.Generator().manual_seed(3)).samples
    assert run().equal(run())


def test_bad_sampler_input():
    gm = GaussianMixture.default()
    with pytest.raises(ValueError, match="euler"):
        build_sampler("eulr")
    with pytest.raises(ValueError, match="valid: .*eta"):
        build_sampler("sde", etta=1)
    with pytest.raises(ValueError, match="steps"):
        build_sampler("euler", steps=0)
    with pytest.raises(ValueError, match="eta"):
        build_sampler("sde", eta=2.0)
    with pytest.raises(ValueError, match="cond"):
        build_sampler("euler", steps=2).sample(gm, torch.randn(4, 2), cond=torch.zeros(3, dtype=torch.long))
    with pytest.raises(FloatingPointError, match=r"step 1, t=0\.5"):
        build_sampler("euler", steps=2).sample(lambda x, t: torch.where(t[:, None] > 0.2, float("nan"), 0.0) * x, torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"returned \(4, 3\).*step 0"):
        build_sampler("euler", steps=2).sample(lambda x, t: torch.zeros(4, 3), torch.randn(4, 2))


@pytest.mark.parametrize("name,step", [("euler", 4), ("ab2", 4), ("sde", 4), ("heun", 3), ("speculative", r"\d+")])
def test_deferred_nan_check_names_the_first_bad_call(name, step):
    """The NaN check waits for the sampler's next host sync (or the end), yet names the call that failed:
    NaN from t = 0.4 on (grid of 10 steps) is reported at t = 0.4, not at a later step."""
    calls = []

    def nan_from_04(x, t):
        calls.append(float(t.max()))
        return torch.where(t[:, None] > 0.35, float("nan"), 1.0) * x

    with pytest.raises(FloatingPointError, match=rf"NaN/Inf at step {step}(\.\.\d+)?, t=(0\.4000|\[0\.4000)"):
        build_sampler(name, steps=10).sample(nan_from_04, torch.randn(4, 2))
    assert max(calls) > 0.4  # the check was deferred: the run went on past the bad call


class _Draft(torch.nn.Module):
    def forward(self, x, t, cond=None):
        return torch.zeros_like(x)


@pytest.mark.parametrize("name,options", [
    ("euler", {}), ("heun", {}), ("ab2", {}), ("sde", {}), ("fastflow", dict(mu=0.01)),
    ("speculative", dict(window="bandit", policy="thompson")), ("speculative", dict(draft_eta=0.5)),
    ("speculative", dict(drafter="model")), ("sfm", dict(leap="bandit", mu=1.0)), ("sfm", dict(drafter="model")),
    ("rca", dict(drafter="model")), ("rca", {}), ("rca", dict(leap="bandit", mu=1.0))], ids=str)
@pytest.mark.parametrize("strict", [False, True], ids=["nan-in-nan-out", "model-raises-on-nan-input"])
def test_nan_in_some_rows_is_reported_at_its_rows(name, options, strict):
    """NaN only for samples with x[0] > 0 from t > 0.35 (grid of 20): every sampler reports the target's
    FloatingPointError at those rows' steps and times — also when the check was deferred and the model then
    raised its own error on the NaN input, and whatever a drafter or a bandit did with the NaN meanwhile."""
    gm = GaussianMixture.default()

    def model(x, t):
        if strict and not bool(torch.isfinite(x).all()):
            raise RuntimeError("this model rejects NaN input")
        return torch.where((t[:, None] > 0.35) & (x[:, :1] > 0), float("nan"), 1.0) * gm(x, t)

    draft = _Draft() if options.get("drafter") == "model" else None
    with pytest.raises(FloatingPointError) as err:
        build_sampler(name, steps=20, **options).sample(model, torch.randn(64, 2, generator=torch.Generator().manual_seed(0)),
                                                        draft=draft)
    m = re.match(r"target model returned NaN/Inf at step (\d+)(?:\.\.\d+)?, t=\[?(\d+\.\d+)",
                 str(err.value))
    assert m, str(err.value)
    assert int(m[1]) >= 7 and float(m[2]) >= 0.4 - 1e-6, str(err.value)  # the bad rows only, not the whole call


class _NaNDraft(torch.nn.Module):
    def forward(self, x, t, cond=None):
        return torch.where(t[:, None] > 0.35, float("nan"), 0.0) * x


@pytest.mark.parametrize("name,options", [("speculative", dict(drafter="model", window=4)),
                                          ("sfm", dict(drafter="model", leap=4))], ids=str)
def test_a_draft_nan_names_its_grid_step(name, options):
    """The draft network's NaN is blamed on the draft, at the grid step of its t (not its place in a window)."""
    with pytest.raises(FloatingPointError, match="draft model returned NaN") as err:
        build_sampler(name, steps=20, **options).sample(GaussianMixture.default(), torch.randn(8, 2), draft=_NaNDraft())
    m = re.search(r"at step (\d+)(?:\.\.(\d+))?, t=\[?(\d+\.\d+)(?:\.\.(\d+\.\d+))?", str(err.value))
    assert m and int(m[1]) == round(float(m[3]) * 20) and float(m[3]) > 0.35, str(err.value)
