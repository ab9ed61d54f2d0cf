"""Maximal couplings against closed-form answers: the output law is p and P(keep the draft) = 1 − TV(p, q)."""
import math

import pytest
import torch
from scipy import stats as sps

from specflow.sampling import keyed
from specflow.sampling.coupling import (IsoGaussian, maximal_coupling, reflection_coupling, residual_sample,
                                        torch_draw)

R = 20000


def _tv_1d(mp, sp, mq, sq):
    z = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    pd = torch.distributions.Normal(mp, sp).log_prob(z).exp()
    qd = torch.distributions.Normal(mq, sq).log_prob(z).exp()
    return 0.5 * ((pd - qd).abs().sum() * (z[1] - z[0])).item()


def _binomial_close(k, n, prob):
    return abs(k / n - prob) < 5 * math.sqrt(prob * (1 - prob) / n) + 1e-9


def test_reflection_coupling_law_and_acceptance():
    g = torch.Generator().manual_seed(0)
    m_hat = torch.tensor([0.8, -0.3, 0.1], dtype=torch.float64).expand(R, 3)
    m = torch.zeros(R, 3, dtype=torch.float64)
    c = torch.full((R,), 0.5, dtype=torch.float64)
    eps, u = torch.randn(R, 3, generator=g, dtype=torch.float64), torch.rand(R, generator=g, dtype=torch.float64)
    out = reflection_coupling(m_hat, m, c, eps, u)
    delta = m_hat[0].norm().item() / 0.5
    assert _binomial_close(out.accepted.sum().item(), R, 2 * sps.norm.cdf(-delta / 2))  # 1 − TV
    for i in range(3):  # every coordinate ~ N(0, c²), and the projection on m̂ − m
        assert sps.kstest(out.x[:, i].numpy() / 0.5, "norm").pvalue > 1e-3
    e = m_hat[0] / m_hat[0].norm()
    assert sps.kstest((out.x @ e).numpy() / 0.5, "norm").pvalue > 1e-3
    torch.testing.assert_close(out.x[out.accepted], (m_hat + 0.5 * eps)[out.accepted])


def test_reflection_coupling_point_mass():
    m_hat = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    m = torch.tensor([[1.0, 2.0], [0.5, 0.0]], dtype=torch.float64)
    out = reflection_coupling(m_hat, m, torch.zeros(2, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64),
                              torch.rand(2, dtype=torch.float64))
    assert out.accepted.tolist() == [True, False]
    torch.testing.assert_close(out.x, m)


@pytest.mark.parametrize("keyed_draw", [False, True])
@pytest.mark.parametrize("mq,sq", [(0.0, 0.6), (0.7, 1.3), (-0.4, 0.9)])
def test_maximal_coupling_law_and_acceptance(mq, sq, keyed_draw):
    g = torch.Generator().manual_seed(1)
    p = IsoGaussian(torch.full((R, 1), 0.2, dtype=torch.float64), torch.ones(R, dtype=torch.float64))
    q = IsoGaussian(torch.full((R, 1), mq, dtype=torch.float64), torch.full((R,), sq, dtype=torch.float64))
    y = q.sample(torch.randn(R, 1, generator=g, dtype=torch.float64))
    u = torch.rand(R, generator=g, dtype=torch.float64)
    if keyed_draw:
        keys = torch.randint(2**62, (R,), generator=g)
        step = torch.zeros(R, dtype=torch.long)
        draw = lambda rows, a: (keyed.normal(keys[rows], step[rows], 2 * a, (1,)),
                                keyed.uniform(keys[rows], step[rows], 2 * a + 1, 1)[..., 0])
    else:
        draw = torch_draw(g, (1,), y)
    out = maximal_coupling(y, p, q, u, draw)
    assert _binomial_close(out.accepted.sum().item(), R, 1 - _tv_1d(0.2, 1.0, mq, sq))
    assert sps.kstest(out.x[:, 0].numpy(), "norm", args=(0.2, 1.0)).pvalue > 1e-3
    torch.testing.assert_close(out.x[out.accepted], y[out.accepted])


def test_maximal_coupling_in_several_dims_is_p():
    g = torch.Generator().manual_seed(2)
    D = 4
    p = IsoGaussian(torch.zeros(R, D, dtype=torch.float64), torch.full((R,), 0.5, dtype=torch.float64))
    q = IsoGaussian(torch.full((R, D), 0.1, dtype=torch.float64), torch.full((R,), 0.4, dtype=torch.float64))
    y = q.sample(torch.randn(R, D, generator=g, dtype=torch.float64))
    out = maximal_coupling(y, p, q, torch.rand(R, generator=g, dtype=torch.float64), torch_draw(g, (D,), y))
    assert 0.05 < out.accepted.double().mean() < 0.95
    r2 = (out.x.pow(2).sum(1) / 0.25).numpy()  # ‖x‖²/c² ~ χ²_D under p
    assert sps.kstest(r2, "chi2", args=(D,)).pvalue > 1e-3


def test_residual_sampling_bound_is_an_error():
    p = IsoGaussian(torch.zeros(3, 2, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    q = IsoGaussian(torch.full((3, 2), 1e-7, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="max_attempts=16.*1/TV"):
        residual_sample(p, q, torch_draw(torch.Generator().manual_seed(0), (2,), p.mean), max_attempts=16)


def test_keyed_numbers_are_pure_functions_of_their_counters():
    keys = torch.tensor([3, 3, 4, 2**61 + 5])
    step = torch.tensor([0, 1, 0, 7])
    a = keyed.normal(keys, step, torch.arange(4), (2, 3))
    assert a.shape == (4, 4, 2, 3)
    torch.testing.assert_close(keyed.normal(keys[2:], step[2:], torch.arange(4), (2, 3)), a[2:])  # row-wise
    assert not torch.allclose(a[0], a[1]) and not torch.allclose(a[0], a[2])
    u = keyed.uniform(torch.arange(2000), torch.zeros(2000, dtype=torch.long), torch.arange(3), 50).flatten()
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    z = keyed.normal(torch.arange(2000), torch.zeros(2000, dtype=torch.long), torch.arange(3), (50,)).flatten()
    assert sps.kstest(z.numpy(), "norm").pvalue > 1e-3
