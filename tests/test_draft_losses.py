"""Draft losses priced in what verification pays (``specflow.lit.draft.transition_loss``): z is the distance
between the draft's and the target's transition means in units of the step's noise, −log 2Φ(−z/2) is minus
the log of the measured acceptance, and a draft trained on it accepts more than the training-free one."""
from __future__ import annotations

import math

import pytest
import torch

from specflow.checkpoint import TargetInfo
from specflow.data.toy import GaussianMixture
from specflow.lit.draft import DraftFlow, MedusaFlow, noise_units, transition_loss
from specflow.path import transition_coefficients, transition_mean, x1_hat
from specflow.sampling import build_sampler


def test_z_is_the_transition_means_distance_in_noise_units():
    g = torch.Generator().manual_seed(0)
    N = torch.tensor([100, 50, 20, 100])
    t = torch.tensor([0.0, 0.3, 0.6, 0.97], dtype=torch.float64)
    x, v, v_hat = (torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    s = t + 1.0 / N
    m = torch.stack([transition_mean(x[i:i + 1], t[i], s[i], v[i:i + 1]) for i in range(4)])
    m_hat = torch.stack([transition_mean(x[i:i + 1], t[i], s[i], v_hat[i:i + 1]) for i in range(4)])
    c = transition_coefficients(t, s)[2]
    z = (m_hat - m).flatten(1).norm(dim=1) / c
    err_x1 = x1_hat(x, t[:, None, None, None], v_hat) - x1_hat(x, t[:, None, None, None], v)
    r = noise_units(t, N, cap=None)
    torch.testing.assert_close(transition_loss(err_x1, r, "kl"), (0.5 * z**2).float(), rtol=1e-5, atol=1e-6)  # float32 loss
    # −log P(accept) of two Gaussians N(m̂, c²I), N(m, c²I): P = 1 − TV = 2Φ(−z/2)
    p = 2 * torch.distributions.Normal(0.0, 1.0).cdf(-z / 2)
    torch.testing.assert_close(transition_loss(err_x1, r, "log_accept"), -p.log().float(), rtol=1e-5, atol=1e-6)


def test_log_accept_matches_the_acceptance_rule_by_monte_carlo():
    """Draw y ~ q = N(m̂, c²), accept with min(1, p/q): the rate is exp(−loss) (z = 1.3, 200 000 draws)."""
    g = torch.Generator().manual_seed(1)
    D, c, z = 16, 0.2, 1.3
    m = torch.zeros(D, dtype=torch.float64)
    m_hat = m.clone()
    m_hat[0] = z * c
    y = m_hat + c * torch.randn(200_000, D, generator=g, dtype=torch.float64)
    log_ratio = ((y - m_hat).square().sum(1) - (y - m).square().sum(1)) / (2 * c * c)
    rate = (torch.rand(len(y), generator=g, dtype=torch.float64).log() < log_ratio).double().mean().item()
    want = math.exp(-transition_loss(torch.tensor([[z]], dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                                     "log_accept").item())
    assert abs(rate - want) < 0.004, (rate, want)  # 4 standard errors
    assert abs(rate - 2 * 0.5 * math.erfc(z / 2 / math.sqrt(2))) < 0.004


def test_noise_units_exact_or_capped_and_zero_into_t1():
    N = torch.tensor(100)
    t = torch.tensor([0.5, 0.98, 0.99], dtype=torch.float64)
    exact, capped = noise_units(t, N, cap=None), noise_units(t, N)
    assert exact[1] > 20 and capped[1] == 20 and exact[0] == capped[0] < 20
    assert exact[2] == 0 and capped[2] == 20  # the step into t = 1: c = 0


def test_zero_error_has_zero_loss_and_a_finite_gradient():
    err = torch.zeros(3, 4, requires_grad=True)
    for kind in ("kl", "log_accept"):
        loss = transition_loss(err, torch.ones(3), kind).sum()
        loss.backward()
        assert loss.item() == pytest.approx(0.0, abs=1e-7) and torch.isfinite(err.grad).all()
        err.grad = None


def test_bad_loss_names_are_refused():
    with pytest.raises(ValueError, match=r"loss must be one of \('mse', 'kl', 'log_accept'\)"):
        DraftFlow(arch="mlp", net={"dim": 2}, loss="tv")
    with pytest.raises(ValueError, match=r"weighting must be one of \('x1', 'accept', 'kl', 'log_accept'\)"):
        MedusaFlow(weighting="tv")
    with pytest.raises(ValueError, match="steps must list grid sizes"):
        DraftFlow(arch="mlp", net={"dim": 2}, loss="kl", steps=[1])


class _GMMTarget(torch.nn.Module):
    def __init__(self, gm):
        super().__init__()
        self.gm, self.in_channels, self.image_size, self.num_classes = gm, gm.dim, None, None
        self.specflow = TargetInfo("<gmm>", "gmm-" + str(gm.dim), "gmm", {"dim": gm.dim})  # as load_target sets

    def forward(self, x, t, cond=None):
        return self.gm.velocity(x, t)


def _train_draft(gm, loss: str, N: int, steps: int = 400):
    """DraftFlow's own training_step, ``steps`` Adam steps of a small MLP against the exact mixture velocity."""
    torch.manual_seed(0)
    module = DraftFlow(arch="mlp", net={"dim": gm.dim, "hidden": 64, "depth": 2}, loss=loss, steps=[N],
                       label_dropout=0.0)
    module.attach_target(_GMMTarget(gm))
    opt = torch.optim.Adam(module.draft.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for i in range(steps):
        out = module.training_step((gm.sample(256, g).float(), None), i)
        opt.zero_grad(), out.backward(), opt.step()
    return module.draft.eval().requires_grad_(False).double()


def test_acceptance_priced_draft_beats_the_mse_draft_at_equal_budget():
    """On the 32-d mixture at N = 50 (window 4), 400 steps each: velocity MSE spends the budget on early times,
    where errors are large but cost nothing at verification; −log acceptance spends it where steps are
    decided. Measured: 0.80 vs 0.71 (torch seeds 0, 1, 2: 0.79-0.82 vs 0.71)."""
    N, gm = 50, GaussianMixture.default(dim=32)
    x0 = torch.randn(512, gm.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def acceptance(drafter, net=None):
        s = build_sampler("speculative", steps=N, drafter=drafter, window=4)
        return s.sample(gm.velocity, x0, draft=net, generator=torch.Generator().manual_seed(6)).stats.acceptance_rate

    priced, mse = acceptance("model", _train_draft(gm, "log_accept", N)), acceptance("model", _train_draft(gm, "mse", N))
    assert priced > mse + 0.05, (priced, mse)
    assert priced > acceptance("extrapolate"), priced  # and it learned something a training-free drafter lacks


def test_medusa_heads_train_on_log_accept():
    """MedusaFlow(weighting="log_accept") through its own training_step: the loss is finite (steps into t = 1,
    where r = 0 and c = 0, are left out) and falls."""
    from test_drafts import FeatureGMM

    gm = GaussianMixture.default(dim=4)
    torch.manual_seed(0)
    module = MedusaFlow(hidden=32, depth=2, offsets=4, steps=[20], etas=[1.0], weighting="log_accept")
    module.attach_target(FeatureGMM(gm))
    module.draft.double()
    opt = torch.optim.Adam(module.draft.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for i in range(120):
        loss = module.training_step((gm.sample(256, g), None), i)
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert all(map(math.isfinite, losses))
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10]), (losses[:10], losses[-10:])
