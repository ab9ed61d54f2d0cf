"""Tally: batches of different sizes and DDP ranks combine to the numbers of one run."""
from __future__ import annotations

import math

import pytest
import torch

from specflow.generate import generate, sample_indices
from specflow.nets.mlp import MLP
from specflow.sampling import SampleStats, build_sampler
from specflow.tally import Tally


def _st(seq, total, draft, proposed, accepted, rounds, wall, arms):
    return SampleStats(sequential_nfe=seq, total_nfe=total, draft_nfe=draft, proposed=proposed, accepted=accepted,
                       rounds=rounds, wall_time_s=wall, baseline_steps=8, arm_counts=arms)


# Two batches of sizes 3 and 1 with different costs: an unweighted mean would give other numbers.
A = _st(4, 10.0, 2.0, 9, 6, 3, 1.5, {1: 2, 2: 1})
B = _st(8, 2.0, 6.0, 3, 0, 5, 0.5, {2: 4})


def test_batches_of_different_sizes_merge_by_hand():
    t = Tally()
    t.add(A, 3)
    t.add(B, 1)
    st = t.stats()  # generate(): the whole run
    assert (st.sequential_nfe, st.rounds, st.proposed, st.accepted) == (12, 8, 12, 6)
    assert st.total_nfe == (3 * 10 + 2) / 4 and st.draft_nfe == (3 * 2 + 6) / 4
    assert st.acceptance_rate == 0.5 and st.wall_time_s == 2.0 and st.baseline_steps == 8
    assert st.arm_counts == {1: 2, 2: 5}
    s = t.summary()  # the callback's log: sequential_nfe and rounds per batch, sample-weighted
    assert s == {"sequential_nfe": (3 * 4 + 8) / 4, "total_nfe": 8.0, "draft_nfe": 3.0, "wall_time_s": 2.0,
                 "rounds": (3 * 3 + 5) / 4, "speedup": 8 / 5, "acceptance_rate": 0.5, "arm_1": 2.0, "arm_2": 5.0}
    assert math.isnan(Tally().stats().acceptance_rate) and "acceptance_rate" not in Tally().summary()


def test_two_rank_vectors_reduce_like_one_tally():
    arms = [1, 2, 4]  # 4 never drawn: the vector still has a slot for it, the same on every rank
    r0, r1, one = Tally(), Tally(), Tally()
    r0.add(A, 3)
    r1.add(B, 1)
    one.add(A, 3)
    one.add(B, 1)
    vecs = torch.stack([r0.to_vector(arms), r1.to_vector(arms)])  # what all_gather hands every rank
    both = Tally.from_vectors(vecs, arms)
    assert both.wall_time_s == 1.5  # ranks run in parallel: max, not the sum (2.0) of one rank's batches
    both.wall_time_s = one.wall_time_s
    one.arms[4] = 0  # the callback logs every arm of the sampler, drawn or not
    assert both.summary() == one.summary() and both.stats() == one.stats()
    assert Tally.from_vectors(r0.to_vector(arms), arms).summary() == {**r0.summary(), "arm_4": 0.0}  # (k,) too


def test_generate_split_into_batches_matches_one_batch():
    """Speculative with a fixed window is per-sample, so per-sample cost and acceptance do not depend on the
    batching, while the sequential calls of consecutive batches add up."""
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=16, depth=2).eval()
    make = lambda: build_sampler("speculative", steps=12, window=3)
    whole = generate(net, make(), n=7, batch_size=7, seed=3).stats
    split = generate(net, make(), n=7, batch_size=3, seed=3).stats  # batches 3, 3, 1
    _, parts = sample_indices(net, make(), range(7), (2,), 3, batch_size=3)
    assert split.sequential_nfe == sum(p.sequential_nfe for p in parts) > whole.sequential_nfe
    assert split.rounds == sum(p.rounds for p in parts)
    assert split.total_nfe == pytest.approx(whole.total_nfe, rel=1e-12)
    assert split.draft_nfe == pytest.approx(whole.draft_nfe, rel=1e-12)
    assert (split.proposed, split.accepted) == (whole.proposed, whole.accepted) and whole.proposed > 0
    assert split.acceptance_rate == whole.acceptance_rate and split.baseline_steps == whole.baseline_steps == 12
    one = Tally()
    one.add(parts[2], 1)
    assert one.stats() == parts[2]  # a single batch comes back unchanged
