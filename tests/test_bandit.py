"""The shared bandit: learns the best arm per context, is reproducible, round-trips its state, rejects bad input."""
import pytest
import torch

from specflow.sampling.bandit import Bandit, time_bucket

ARMS = (1, 2, 4, 8)
# Per-context mean reward of each arm: the best arm differs by context (8, 1, 4).
MEANS = torch.tensor([[0.1, 0.3, 0.5, 0.9],
                      [0.9, 0.5, 0.3, 0.1],
                      [0.2, 0.5, 0.8, 0.6]], dtype=torch.float64)


def run(b: Bandit, rounds: int, batch: int = 12, seed: int = 1, noise: float = 0.3, scale: float = 1.0):
    """Play ``rounds`` batched rounds on the synthetic Gaussian problem; return all chosen arms."""
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for _ in range(rounds):
        ctx = torch.randint(0, 3, (batch,), generator=g)
        arm = b.select(ctx)
        a = torch.tensor([ARMS.index(int(v)) for v in arm])
        r = scale * (MEANS[ctx, a] + noise * torch.randn(batch, generator=g, dtype=torch.float64))
        b.update(ctx, arm, r)
        chosen.append(arm)
    return torch.cat(chosen)


@pytest.mark.parametrize("policy", ["ucb1", "thompson"])
@pytest.mark.parametrize("scale", [1.0, 100.0])  # the exploration adapts to the reward's units
def test_converges_to_best_arm_per_context(policy, scale):
    b = Bandit(ARMS, contexts=3, policy=policy, seed=0)
    run(b, rounds=300, scale=scale)
    assert b.best().tolist() == [8, 1, 4]
    # Most pulls went to the best arm of each context (it is exploited, not merely identified).
    best_idx = torch.tensor([3, 0, 2])
    share = b.counts[torch.arange(3), best_idx] / b.counts.sum(1)
    assert bool((share > 0.5).all()), share  # uniform play would give 0.25


def test_wrong_credit_is_caught():
    """Control: crediting rewards to the wrong context makes the bandit learn the wrong arms."""
    b = Bandit(ARMS, contexts=3, seed=0)
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        ctx = torch.randint(0, 3, (12,), generator=g)
        arm = b.select(ctx)
        a = torch.tensor([ARMS.index(int(v)) for v in arm])
        b.update((ctx + 1) % 3, arm, MEANS[ctx, a])
    assert b.best().tolist() != [8, 1, 4]


def test_ucb_tries_every_arm_first_lowest_first():
    b = Bandit(ARMS, contexts=1)
    seen = []
    for _ in range(4):
        arm = b.select(torch.zeros(1, dtype=torch.long))
        seen.append(int(arm))
        b.update(torch.zeros(1, dtype=torch.long), arm, torch.zeros(1))
    assert seen == list(ARMS)


@pytest.mark.parametrize("policy", ["ucb1", "thompson"])
def test_same_seed_same_choices(policy):
    a = run(Bandit(ARMS, 3, policy, seed=7), rounds=60)
    b = run(Bandit(ARMS, 3, policy, seed=7), rounds=60)
    assert torch.equal(a, b)
    if policy == "thompson":  # the seed matters: another one explores differently
        c = run(Bandit(ARMS, 3, policy, seed=8), rounds=60)
        assert not torch.equal(a, c)


@pytest.mark.parametrize("policy", ["ucb1", "thompson"])
def test_state_round_trip(policy):
    b = Bandit(ARMS, 3, policy, seed=3)
    run(b, rounds=40)
    state = b.state_dict()
    fresh = Bandit(ARMS, 3, policy, seed=99)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.counts, b.counts)
    assert torch.equal(run(fresh, rounds=20, seed=5), run(b, rounds=20, seed=5))


@pytest.mark.parametrize("kwargs,match", [
    (dict(arms=(1, 2, 8)), "saved for"),
    (dict(arms=ARMS, policy="thompson"), "saved for"),
    (dict(arms=ARMS, contexts=2), "saved for"),
])
def test_state_for_other_bandit_is_an_error(kwargs, match):
    state = Bandit(ARMS, 3).state_dict()
    kwargs.setdefault("contexts", 3)
    with pytest.raises(ValueError, match=match):
        Bandit(**kwargs).load_state_dict(state)


def _risky_and_steady(b: Bandit, rate: bool, decisions: int = 400) -> None:
    """Arm 8 advances 8 steps for 1 call or, rejected half the time, 1 step for 2 calls (rate 4.5/1.5 = 3 steps per
    call, mean ratio 0.5·8 + 0.5·0.5 = 4.25); arm 4 advances 3.5 steps per call, always."""
    g = torch.Generator().manual_seed(0)
    ctx = torch.zeros(decisions, dtype=torch.long)
    ok = torch.rand(decisions, generator=g) < 0.5
    steps, cost = torch.where(ok, 8.0, 1.0).double(), torch.where(ok, 1.0, 2.0).double()
    risky, steady = torch.full((decisions,), 8), torch.full((decisions,), 4)
    if rate:
        b.update(ctx, risky, steps, cost=cost)
        b.update(ctx, steady, torch.full((decisions,), 3.5, dtype=torch.float64), cost=torch.ones(decisions))
    else:
        b.update(ctx, risky, steps / cost)
        b.update(ctx, steady, torch.full((decisions,), 3.5, dtype=torch.float64))


@pytest.mark.parametrize("policy", ["ucb1", "thompson"])
def test_rate_is_total_steps_over_total_cost(policy):
    """A run pays Σ cost for Σ steps: the rate prefers the steady arm; the mean of per-decision ratios (the
    control) prefers the risky one, which advances fewer steps per call."""
    b = Bandit((4, 8), contexts=1, policy=policy)
    _risky_and_steady(b, rate=True)
    assert b.means[0].tolist() == pytest.approx([3.5, 3.0], abs=0.15)
    assert b.select(torch.zeros(200, dtype=torch.long)).float().mean() < 4.5  # mostly the steady arm
    control = Bandit((4, 8), contexts=1, policy=policy)
    _risky_and_steady(control, rate=False)
    assert control.means[0].tolist() == pytest.approx([3.5, 4.25], abs=0.15)
    assert control.select(torch.zeros(200, dtype=torch.long)).float().mean() > 7.5


def test_rate_state_round_trips_and_a_plain_state_loads():
    b = Bandit((4, 8), contexts=1, policy="thompson")
    _risky_and_steady(b, rate=True)
    fresh = Bandit((4, 8), contexts=1, policy="thompson")
    fresh.load_state_dict(b.state_dict())
    assert torch.equal(fresh.means, b.means) and torch.equal(fresh.w, b.w)
    plain = Bandit((4, 8), contexts=1, policy="thompson")  # saved before costs existed: a cost of 1 each
    plain.update(torch.zeros(2, dtype=torch.long), torch.tensor([4, 8]), torch.tensor([1.0, 2.0]))
    old = {k: v for k, v in plain.state_dict().items() if k not in ("w", "scc", "syc")}
    fresh.load_state_dict(old)
    assert fresh.means[0].tolist() == [1.0, 2.0]


@pytest.mark.parametrize("name,opts", [("sfm", dict(leap="bandit", check="local", tol=0.01)),
                                       ("rca", dict(leap="bandit", mu=1.0)),
                                       ("speculative", dict(window="bandit"))])
def test_a_rate_sampler_refuses_a_state_of_averaged_ratios(name, opts):
    from specflow.sampling import build_sampler

    state = build_sampler(name, steps=20, **opts).state_dict()
    build_sampler(name, steps=20, **opts).load_state_dict(state)  # control: its own state loads
    old = {**state, "bandit": {k: v for k, v in state["bandit"].items() if k not in ("w", "scc", "syc")}}
    with pytest.raises(ValueError, match="before its bandit learnt rates"):
        build_sampler(name, steps=20, **opts).load_state_dict(old)


@pytest.mark.parametrize("cost", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_cost_is_an_error(cost):
    with pytest.raises(ValueError, match="costs must be finite and > 0"):
        Bandit(ARMS).update(torch.tensor([0]), torch.tensor([2]), torch.tensor([1.0]), cost=torch.tensor([cost]))


@pytest.mark.parametrize("arms,match", [((), "empty"), ((0, 1), "positive"), ((-1, 2), ">= 0"),
                                        ((1, 2, 2), "increasing"), ((4, 2, 1), "increasing")])
def test_bad_arms(arms, match):
    with pytest.raises(ValueError, match=match):
        Bandit(arms)


def test_bad_policy_and_inputs():
    with pytest.raises(ValueError, match="ucb1, thompson"):
        Bandit(ARMS, policy="greedy")
    b = Bandit(ARMS, contexts=2)
    with pytest.raises(ValueError, match="context"):
        b.select(torch.tensor([2]))
    with pytest.raises(ValueError, match="not arms"):
        b.update(torch.tensor([0]), torch.tensor([3]), torch.tensor([1.0]))
    assert Bandit((0, 1, 2), allow_zero=True).arms == (0, 1, 2)


def test_time_bucket():
    t = torch.tensor([0.0, 0.24, 0.25, 0.99, 1.0], dtype=torch.float64)
    assert time_bucket(t, 4).tolist() == [0, 0, 1, 3, 3]
    with pytest.raises(ValueError, match="buckets"):
        time_bucket(t, 0)


def test_limit_excludes_untried_arms_that_do_not_fit():
    b = Bandit(ARMS, contexts=2)
    ctx = torch.tensor([0, 0, 1])
    for _ in range(10):  # untried arms above the limit are never chosen (context 1 never tries one)
        arm = b.select(ctx, limit=torch.tensor([2, 2, 0]))
        assert arm.tolist()[0] <= 2 and arm.tolist()[1] <= 2 and arm.tolist()[2] == 1
        b.update(ctx[:2], arm[:2], torch.ones(2))
    assert b.counts[0].tolist() == [10, 10, 0, 0] and int(b.counts[1].sum()) == 0


def test_limit_keeps_a_tried_arm_the_caller_cuts():
    # a fixed arm of 8 plays its last leap cut to the room left; the bandit may too, once the arm has a mean
    b = Bandit(ARMS, contexts=1)
    ctx = torch.zeros(4, dtype=torch.long)
    b.update(ctx, torch.tensor(ARMS), torch.tensor([1.0, 2.0, 4.0, 8.0]))
    assert b.select(ctx, limit=torch.tensor([3, 1, 0, 9])).tolist() == [8, 8, 8, 8]
    control = Bandit(ARMS, contexts=1)  # the same limits before any arm is tried: only arms that fit
    assert control.select(ctx, limit=torch.tensor([3, 1, 0, 9])).tolist() == [1, 1, 1, 1]


# ------------------------------------------------------------------------- the speculative window's objective
def test_compute_price_is_checked():
    from specflow.sampling import build_sampler

    for bad in (-0.1, float("nan"), float("inf"), "0.2", True, None):
        with pytest.raises(ValueError, match="compute_price must be a finite number >= 0"):
            build_sampler("speculative", window="bandit", compute_price=bad)
    learnt = build_sampler("speculative", window="bandit", compute_price=0.2).state_dict()
    with pytest.raises(ValueError, match="objective"):
        build_sampler("speculative", window="bandit", compute_price=0.0).load_state_dict(learnt)
    build_sampler("speculative", window="bandit", compute_price=0.2).load_state_dict(learnt)  # same objective
    with pytest.raises(ValueError, match="verifier='tree'"):  # its rows per round are not one branch's
        build_sampler("speculative", window="bandit", compute_price=0.2, verifier="tree")


def test_window_cost_prices_rows():
    from specflow.sampling.bandit import window_cost

    c = window_cost(torch.tensor([5, 3, 9]), 0.5)
    assert torch.allclose(c, torch.tensor([3.5, 2.5, 5.5], dtype=torch.float64))
    assert torch.equal(window_cost(torch.tensor([7]), 0.0), torch.tensor([1.0], dtype=torch.float64))


def test_compute_price_trades_latency_for_compute():
    """Pricing rows moves the learnt windows down: fewer rows per sample, more sequential calls — and λ = 0
    keeps the old objective (steps per call). A bandit that ignored the price would give equal rows."""
    from specflow.data.toy import GaussianMixture
    from specflow.sampling import build_sampler

    gm = GaussianMixture.default(dim=16)
    out = {}
    for lam in (0.0, 1.0):
        s = build_sampler("speculative", steps=40, window="bandit", compute_price=lam)
        for b in range(4):
            g = torch.Generator().manual_seed(b)
            st = s.sample(gm, torch.randn(256, 16, generator=g), generator=g).stats
        mean_arm = sum(a * n for a, n in st.arm_counts.items()) / sum(st.arm_counts.values())
        out[lam] = (st.total_nfe, mean_arm)
    assert out[1.0][0] < 0.85 * out[0.0][0], out
    assert out[1.0][1] < out[0.0][1], out


def test_schedule_reports_the_preferred_arm_per_bucket():
    b = Bandit((1, 2, 4), contexts=3)
    b.update(torch.tensor([0, 0, 1, 1]), torch.tensor([1, 2, 4, 4]), torch.tensor([0.5, 1.0, 2.0, 3.0]))
    assert b.schedule() == {"bucket0/arm": 2.0, "bucket0/reward": 1.0, "bucket1/arm": 4.0, "bucket1/reward": 2.5}
