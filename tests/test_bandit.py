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


def test_limit_excludes_arms_that_do_not_fit():
    b = Bandit(ARMS, contexts=1)
    ctx = torch.zeros(3, dtype=torch.long)
    for _ in range(10):  # untried arms above the limit are never chosen
        arm = b.select(ctx, limit=torch.tensor([2, 5, 0]))
        assert arm.tolist()[0] <= 2 and arm.tolist()[1] <= 4 and arm.tolist()[2] == 1
        b.update(ctx[:2], arm[:2], torch.ones(2))
    assert int(b.counts[0, 3]) == 0
