"""The path convention against analytic answers: identities, the Gaussian posterior, the edges."""
import pytest
import torch

from specflow import path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identities_recover_endpoints(dtype):
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(64, 3, 4, 4, generator=g, dtype=dtype), torch.randn(64, 3, 4, 4, generator=g, dtype=dtype)
    t = torch.rand(64, generator=g, dtype=dtype) * 0.98 + 0.01
    xt, v = path.interpolate(x0, x1, t), path.conditional_velocity(x0, x1)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(path.x1_hat(xt, t, v), x1, atol=tol, rtol=tol)
    torch.testing.assert_close(path.x0_hat(xt, t, v), x0, atol=tol, rtol=tol)
    torch.testing.assert_close(path.score(xt, t, v), -x0 / (1 - t).view(-1, 1, 1, 1), atol=10 * tol, rtol=10 * tol)
    assert path.interpolate(x0, x1, 0.0).equal(x0) and path.interpolate(x0, x1, 1.0).equal(x1)


def test_score_at_data_end_is_an_error():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="t = 1"):
        path.score(x, torch.ones(2), x)


def test_time_grid():
    g = path.time_grid(4)
    assert g.dtype == torch.float64 and g.tolist() == [0, 0.25, 0.5, 0.75, 1]
    q = path.time_grid(10, schedule="quadratic")
    assert q[0] == 0 and q[-1] == 1 and bool((q.diff() > 0).all()) and q.diff()[-1] < q.diff()[0]
    e = path.time_grid(10, schedule="edm")  # dense at both ends, t_1 = 1/(1 + σ_1) of Karras's ρ-schedule
    assert e[0] == 0 and e[-1] == 1 and bool((e.diff() > 0).all()) and e.diff()[-1] < e.diff()[4] > e.diff()[1]
    assert abs(e[-2].item() - 1 / 1.002) < 1e-12 and abs(1 / e[1].item() - 1 - (80 ** (1 / 7) + (0.002 ** (1 / 7) - 80 ** (1 / 7)) / 9) ** 7) < 1e-9
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            path.time_grid(bad)
    with pytest.raises(ValueError, match="uniform"):
        path.time_grid(4, schedule="cosine")


def _posterior(t, s, x_t, x1):
    """Gaussian conditioning of the forward Markov chain x_t = (a_t/a_s)·x_s + noise, x_s = a_s·x1 + s_s·ε."""
    a_t, a_s, s_t, s_s = t, s, 1 - t, 1 - s
    cov = (a_t / a_s) * s_s**2  # Cov(x_s, x_t | x1)
    mean = a_s * x1 + cov / s_t**2 * (x_t - a_t * x1)
    var = s_s**2 - cov**2 / s_t**2
    return mean, var


@pytest.mark.parametrize("t,s", [(0.2, 0.5), (0.0, 0.1), (0.7, 0.71), (0.9, 1.0)])
def test_transition_matches_gaussian_posterior(t, s):
    # Point-mass data x1 = a: the exact velocity is (a − x)/(1 − t), so x1_hat = a and the ancestral step
    # must be the posterior q(x_s | x_t, x1 = a). Check its formula, then its samples by Monte Carlo.
    a, x_t = torch.tensor([1.5, -0.5], dtype=torch.float64), torch.tensor([0.3, 0.8], dtype=torch.float64)
    v = (a - x_t) / (1 - t)
    mean, var = _posterior(t, s, x_t, a)
    torch.testing.assert_close(path.transition_mean(x_t[None], t, s, v[None])[0], mean)
    torch.testing.assert_close(path.transition_std(t, s) ** 2, torch.tensor(var, dtype=torch.float64), atol=1e-12, rtol=1e-9)
    n = 200_000
    eps = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xs = path.ancestral_step(x_t.expand(n, 2), t, s, v.expand(n, 2), eps)
    se = max(var, 1e-12) ** 0.5 / n**0.5
    assert (xs.mean(0) - mean).abs().max() < 5 * se + 1e-12
    assert abs(xs.var(0).mean().item() - var) < 5 * var * (2 / n) ** 0.5 + 1e-12


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ancestral_chain_preserves_marginals(eta):
    # With point-mass data every η gives the exact marginal N(s·a, (1 − s)²) after any number of steps.
    a, n = 2.0, 100_000
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 1, generator=g, dtype=torch.float64)
    grid = path.time_grid(7)
    for k in range(5):
        t, s = grid[k], grid[k + 1]
        v = (a - x) / (1 - t)
        x = path.ancestral_step(x, t, s, v, torch.randn(n, 1, generator=g, dtype=torch.float64), eta)
    s = grid[5].item()
    assert abs(x.mean().item() - s * a) < 5 * (1 - s) / n**0.5
    assert abs(x.std().item() - (1 - s)) < 5 * (1 - s) / (2 * n) ** 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transition_edges_are_finite(dtype):
    x, v = torch.randn(4, 3, dtype=dtype), torch.randn(4, 3, dtype=dtype)
    # t = 0 (alpha_t = 0): c = η·σ_s and the mean is s·x1_hat.
    c = path.transition_std(torch.zeros((), dtype=dtype), torch.tensor(0.25, dtype=dtype))
    assert torch.isclose(c, torch.tensor(0.75, dtype=dtype))
    torch.testing.assert_close(path.transition_mean(x, 0.0, 0.25, v), 0.25 * path.x1_hat(x, 0.0, v))
    # s = 1: c = 0 exactly and the mean is x1_hat, even a hair from the end in float32.
    for t in (0.5, 1 - 1e-6):
        assert path.transition_std(torch.tensor(t, dtype=dtype), torch.ones((), dtype=dtype)) == 0
        m = path.transition_mean(x, torch.full((4,), t, dtype=dtype), torch.ones(4, dtype=dtype), v)
        assert torch.isfinite(m).all()
        torch.testing.assert_close(m, path.x1_hat(x, torch.full((4,), t, dtype=dtype), v))
    # η = 0 is the Euler step of the ODE.
    torch.testing.assert_close(path.transition_mean(x, 0.3, 0.4, v, eta=0.0), x + 0.1 * v)


def test_per_sample_times_broadcast_and_shape_errors():
    x = torch.randn(3, 2, 2)
    t = torch.tensor([0.1, 0.5, 0.9])
    assert path.expand(t, x).shape == (3, 1, 1)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        path.expand(torch.zeros(2), x)
