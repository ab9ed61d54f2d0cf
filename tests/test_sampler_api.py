"""The sampler API as every caller sees it: options, bad input, honest counts, determinism, learned state."""
import pytest
import torch

from specflow.data.toy import GaussianMixture
from specflow.sampling import SAMPLERS, build_sampler
from specflow.sampling.noise import NoiseTable, on_device, per_sample_generators, seeded_on

GM = GaussianMixture.default(dim=2)




class Counting:
    """Wraps a velocity model and counts calls and rows, independently of the sampler's own stats."""

    def __init__(self, f):
        self.f, self.calls, self.rows = f, 0, 0

    def __call__(self, x, t, cond=None):
        self.calls += 1
        self.rows += x.shape[0]
        return self.f(x, t)


def _noise(n, dim=2, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="speculative"):
        build_sampler("speculativ")
    with pytest.raises(ValueError, match=r"valid: .*drafter.*window.*draft_eta"):
        build_sampler("speculative", windw=8)
    with pytest.raises(ValueError, match=r"unknown drafter 'nope'; valid: .*extrapolate.*frozen"):
        build_sampler("speculative", drafter="nope")
    with pytest.raises(ValueError, match="policy"):
        build_sampler("speculative", window="bandit", policy="greedy")
    assert "speculative" in SAMPLERS


@pytest.mark.parametrize("options,match", [
    (dict(steps=0), "steps"), (dict(steps=2.5), "steps"),
    (dict(window=0), "window"), (dict(window=-3), "window"), (dict(window="bandits"), "window"),
    (dict(window=True), "window"), (dict(window=2.0), "window"),
    (dict(eta=0.0), "eta"), (dict(eta=1.5), "eta"), (dict(draft_eta=0.0), "draft_eta"),
    (dict(window="bandit", arms=()), "arms"), (dict(window="bandit", arms=(4, 2)), "arms"),
    (dict(row_bucket=-1), "row_bucket"), (dict(row_bucket=8.0), "row_bucket"),
    (dict(compile=True, drafter="model"), "compile=True.*'frozen' or 'extrapolate'"),
    (dict(compile=True, draft_eta=0.5), "compile=True.*draft_eta=None"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        build_sampler("speculative", **options)


def test_bad_inputs():
    s = build_sampler("speculative", steps=4)
    with pytest.raises(ValueError, match="cond"):
        s.sample(GM, _noise(4), cond=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="per-sample generators"):
        s.sample(GM, _noise(4), generator=per_sample_generators(0, range(3)))
    with pytest.raises(ValueError, match="draft network"):
        build_sampler("speculative", steps=4, drafter="model").sample(GM, _noise(4))


def test_model_errors_name_the_step_and_t():
    nan_late = lambda x, t: torch.where(t[:, None] > 0.6, float("nan"), 1.0) * GM(x, t)
    with pytest.raises(FloatingPointError, match=r"target model returned NaN.*step \d+(\.\.\d+)?, t=.*0\.[6-9]"):
        build_sampler("speculative", steps=10, window=2).sample(nan_late, _noise(8))
    with pytest.raises(ValueError, match=r"returned \(3, 2\) for input \(\d+, 2\) at step 0"):
        build_sampler("speculative", steps=10).sample(lambda x, t: torch.zeros(3, 2), _noise(8))


@pytest.mark.parametrize("options", [dict(drafter="frozen", window=4), dict(drafter="extrapolate", window="bandit"),
                                     dict(drafter="model", window=3), dict(drafter="anchored", window=3),
                                     dict(drafter="frozen", window=6, draft_eta=0.6)])
def test_stats_are_the_true_counts(options):
    B = 64
    target, draft = Counting(GM), Counting(lambda x, t: 0.9 * GM(x, t))
    net = options["drafter"] in ("model", "anchored")
    res = build_sampler("speculative", steps=40, **options).sample(
        target, _noise(B), draft=draft if net else None, generator=torch.Generator().manual_seed(0))
    st = res.stats
    assert st.sequential_nfe == target.calls and st.total_nfe == pytest.approx(target.rows / B)
    assert st.draft_nfe == pytest.approx(draft.rows / B)  # the anchored drafter's anchor rows included
    assert (draft.calls > 0) == net
    assert st.sequential_nfe <= st.rounds and 0 < st.accepted <= st.proposed
    assert st.acceptance_rate == pytest.approx(st.accepted / st.proposed)
    # each sample takes 40 steps: the target's own steps (after an all-accepted round) are not proposals
    assert st.accepted < 40 * B and st.proposed <= 40 * B
    if options["window"] == "bandit":
        assert sum(st.arm_counts.values()) >= st.rounds and set(st.arm_counts) == {2, 4, 8, 16}
        assert all(k.startswith("arm_") for k in st.as_dict() if k not in vars(st))


@pytest.mark.parametrize("options", [dict(window=4), dict(window=4, draft_eta=0.7), dict(window="bandit")])
def test_seeded_generator_reproduces(options):
    run = lambda seed: build_sampler("speculative", steps=20, **options).sample(
        GM, _noise(50), generator=torch.Generator().manual_seed(seed)).samples
    assert run(3).equal(run(3)) and not run(3).equal(run(4))


@pytest.mark.parametrize("options", [dict(drafter="extrapolate", window=4), dict(drafter="frozen", window=8, draft_eta=0.7),
                                     dict(drafter="anchored", window=4)])
def test_per_sample_generators_make_a_sample_independent_of_its_batch(options):
    noise = _noise(40)
    idx = [5, 17, 33]
    s = build_sampler("speculative", steps=30, **options)
    draft = (lambda x, t: 0.9 * GM(x, t)) if s.needs_draft else None
    full = s.sample(GM, noise, generator=per_sample_generators(7, range(40)), draft=draft).samples
    alone = s.sample(GM, noise[idx], generator=per_sample_generators(7, idx), draft=draft).samples
    single = s.sample(GM, noise[5:6], generator=per_sample_generators(7, [5]), draft=draft).samples
    torch.testing.assert_close(alone, full[idx], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(single, full[5:6], rtol=1e-12, atol=1e-12)
    assert noise.equal(_noise(40))  # the caller's noise is never written to


def test_a_generator_on_another_device_seeds_one_on_the_states_device():
    a, b, c = (torch.Generator().manual_seed(s) for s in (3, 3, 4))
    assert on_device(a, torch.device("cpu")) is a  # on the state's device: drawn from directly
    ga, gb, gc = seeded_on("cpu", a), seeded_on("cpu", b), seeded_on("cpu", c)
    assert torch.randn(8, generator=ga).equal(torch.randn(8, generator=gb))  # a function of the stream only
    ga2 = seeded_on("cpu", torch.Generator().manual_seed(3))
    assert not torch.randn(8, generator=gc).equal(torch.randn(8, generator=ga2))
    ref = torch.Generator().manual_seed(3)
    torch.randint(2**63 - 1, (), generator=ref)
    assert torch.rand(4, generator=a).equal(torch.rand(4, generator=ref))  # the stream moved on by one draw


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name,options", [("sde", {}), ("speculative", dict(drafter="extrapolate", window=4))])
def test_cpu_streams_draw_the_noise_table_on_the_gpu(name, options):
    """generate() passes CPU per-sample streams: the table is drawn on the GPU (not made on the CPU and copied),
    reproducibly, and a sample is still the same alone or in its batch."""
    noise, idx = _noise(40).cuda(), [5, 17, 33]
    table = NoiseTable(30, noise, per_sample_generators(7, range(40)), uniforms=True)
    assert table.eps.is_cuda and table.u.is_cuda
    assert table.eps.equal(NoiseTable(30, noise, per_sample_generators(7, range(40))).eps)
    s = build_sampler(name, steps=30, **options)
    full = s.sample(GM, noise, generator=per_sample_generators(7, range(40))).samples
    alone = s.sample(GM, noise[idx], generator=per_sample_generators(7, idx)).samples
    torch.testing.assert_close(alone, full[idx], rtol=1e-12, atol=1e-12)


def test_conditioning_follows_the_rows_of_ragged_calls():
    # Class c shifts the data by offset[c]: a row/cond mix-up would change the samples.
    offset = torch.tensor([[0.0, 0.0], [5.0, -3.0]], dtype=torch.float64)
    model = lambda x, t, cond: GM(x - t[:, None] * offset[cond], t) + offset[cond]
    cond = torch.arange(30) % 2
    ref = build_sampler("sde", steps=20).sample(model, _noise(30), cond=cond,
                                                generator=torch.Generator().manual_seed(1)).samples
    for drafter in ("model", "anchored"):  # the anchored drafter's anchor rows carry their samples' labels too
        res = build_sampler("speculative", steps=20, drafter=drafter, window=5).sample(
            model, _noise(30), cond=cond, draft=model, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(res.samples, ref, rtol=1e-10, atol=1e-10)
    spec = build_sampler("speculative", steps=20, window=5).sample(model, _noise(30), cond=cond).samples
    assert (spec[cond == 1].mean(0) - offset[1]).abs().max() < 1.5  # samples land near their class's data


def test_float32_noise_keeps_its_dtype():
    res = build_sampler("speculative", steps=10).sample(GM, _noise(16).float())
    assert res.samples.dtype == torch.float32 and torch.isfinite(res.samples).all()


def test_bandit_state_learns_across_batches_and_restores():
    s = build_sampler("speculative", steps=30, window="bandit", buckets=2)
    s.sample(GM, _noise(32), generator=torch.Generator().manual_seed(0))
    n1 = s.state_dict()["bandit"]["n"].sum().item()
    s.sample(GM, _noise(32), generator=torch.Generator().manual_seed(1))
    state = s.state_dict()
    assert state["bandit"]["n"].sum().item() > n1 > 0
    s2 = build_sampler("speculative", steps=30, window="bandit", buckets=2)
    s2.load_state_dict(state)
    a = s.sample(GM, _noise(32), generator=torch.Generator().manual_seed(2))
    b = s2.sample(GM, _noise(32), generator=torch.Generator().manual_seed(2))
    assert a.samples.equal(b.samples) and a.stats.arm_counts == b.stats.arm_counts
    with pytest.raises(ValueError, match="bandit state was saved"):
        build_sampler("speculative", window="bandit", buckets=3).load_state_dict(state)
    with pytest.raises(ValueError, match="no learned state"):
        build_sampler("speculative", window=4).load_state_dict(state)
