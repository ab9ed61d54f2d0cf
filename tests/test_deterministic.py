"""Deterministic accelerations sfm / rca / fastflow on the toy mixture's exact velocity, in float64."""
import pytest
import torch

from specflow.data.toy import GaussianMixture
from specflow.sampling import build_sampler
from test_sampler_api import Counting  # one call counter, independent of the Evaluator

GM = GaussianMixture.default(dim=2)


def noise(B=128, dim=2, seed=0):
    return torch.randn(B, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(name, steps, x0, **opts):
    return build_sampler(name, steps=steps, **opts).sample(GM, x0)


def rel(a, b):
    return float((a - b).norm() / b.norm())




@pytest.mark.parametrize("opts", [dict(leap=4), dict(leap="bandit", mu=0.0), dict(leap="bandit", mu=1e3),
                                  dict(leap=4, check="local")], ids=str)
def test_sfm_with_zero_tolerance_is_euler(opts):
    x0 = noise()
    res = run("sfm", 20, x0, tol=1e-12, **opts)
    assert torch.allclose(res.samples, run("euler", 20, x0).samples, atol=1e-10, rtol=0)
    assert res.stats.accepted == 0 and res.stats.proposed > 0  # every leap was checked and rejected


def test_sfm_loose_tolerance_is_not_euler():
    """Control for the test above: accepted leaps do change the result (the check is not a no-op)."""
    x0 = noise()
    res = run("sfm", 20, x0, leap=4, tol=0.5)
    assert res.stats.accepted > 0
    assert not torch.allclose(res.samples, run("euler", 20, x0).samples, atol=1e-6)


def test_sfm_is_ragged_per_sample():
    """Each sample advances on its own: a sample's result does not depend on its batch neighbours."""
    x0 = noise(16)
    batch = run("sfm", 20, x0, leap=4, tol=0.05)
    assert 0 < batch.stats.acceptance_rate < 1  # some samples accept where others reject
    alone = torch.cat([run("sfm", 20, x0[i:i + 1], leap=4, tol=0.05).samples for i in range(16)])
    assert torch.allclose(batch.samples, alone, atol=1e-12, rtol=0)


def test_sfm_beats_euler_cost_at_euler_accuracy():
    x0 = noise(256)
    N = 40
    ref = run("heun", 4 * N, x0).samples
    eu = run("euler", N, x0)
    res = run("sfm", N, x0, leap=2, tol=0.05)
    assert res.stats.total_nfe < 0.8 * N
    assert rel(res.samples, ref) <= 1.05 * rel(eu.samples, ref)


def test_rca_leap_one_is_reused_heun():
    """rca, leap = 1: x_{k+1} = x_k + h(v_k + v(x_k + h v_k))/2 with the endpoint velocity reused as v_{k+1}.
    With one step it is Heun's step exactly; over N steps it is second order at N + 1 calls."""
    x0 = noise()
    assert torch.allclose(run("rca", 1, x0, leap=1).samples, run("heun", 1, x0).samples, atol=1e-12, rtol=0)
    N, h = 10, 0.1
    x, v = x0.clone(), GM(x0, torch.zeros(len(x0), dtype=torch.float64))
    for k in range(N):
        v_next = GM(x + h * v, torch.full((len(x0),), (k + 1) * h, dtype=torch.float64))
        x, v = x + h * (v + v_next) / 2, v_next
    res = run("rca", N, x0, leap=1)
    assert torch.allclose(res.samples, x, atol=1e-12, rtol=0)
    assert res.stats.total_nfe == N + 1
    ref = run("heun", 400, x0).samples
    order = rel(run("rca", 20, x0, leap=1).samples, ref) / rel(run("rca", 40, x0, leap=1).samples, ref)
    euler_order = rel(run("euler", 20, x0).samples, ref) / rel(run("euler", 40, x0).samples, ref)
    assert order > 3.0 and euler_order < 2.5  # second order (ratio ~4); the control is first order (~2)


def test_fastflow_without_skips_is_euler():
    x0 = noise()
    s = build_sampler("fastflow", steps=20, arms=(0,))
    eu = run("euler", 20, x0).samples
    for _ in range(2):  # the calibration batch and a learning batch alike
        res = s.sample(GM, x0)
        assert torch.allclose(res.samples, eu, atol=1e-10, rtol=0) and res.stats.total_nfe == 20


def test_fastflow_reward_steers_the_bandit():
    """μ = 0 makes every skip a loss (reward −MSE < 0 = the reward of not skipping): the bandit learns arm 0.
    A huge μ makes skipping always pay: it learns the longest arm. Wrong credit would not separate them."""
    best = {}
    for mu in (0.0, 1e6):
        s = build_sampler("fastflow", steps=40, arms=(0, 2, 4), buckets=2, mu=mu)
        for i in range(12):
            s.sample(GM, noise(32, seed=i))
        best[mu] = s.bandit.best().tolist()
    assert best[0.0] == [0, 0] and best[1e6] == [4, 4]


def test_fastflow_learns_to_skip_accurately():
    s = build_sampler("fastflow", steps=50)
    for i in range(8):
        s.sample(GM, noise(64, seed=i + 1))
    x0 = noise(64)
    res = s.sample(GM, x0)
    eu = run("euler", 50, x0).samples
    psnr = 10 * torch.log10(4 / ((res.samples - eu) ** 2).mean())
    assert res.stats.total_nfe <= 25 and psnr >= 30, (res.stats.total_nfe, float(psnr))


@pytest.mark.parametrize("name,opts", [("sfm", dict(leap=2, tol=0.05)), ("sfm", dict(leap="bandit", arms=(1, 2), mu=0.0)),
                                       ("sfm", dict(leap="bandit", arms=(1, 2), mu=1e3)),
                                       ("rca", dict(leap=3)), ("fastflow", dict(mu=1e-3))])
def test_nfe_matches_a_counting_wrapper(name, opts):
    x0 = noise(32)
    model = Counting(GM)
    res = build_sampler(name, steps=30, **opts).sample(model, x0)
    assert res.stats.sequential_nfe == model.calls
    assert res.stats.total_nfe == pytest.approx(model.rows / 32)
    assert model.rows / 32 < 30  # it did accelerate (compute per sample; ragged rounds can exceed N)


@pytest.mark.parametrize("name,opts", [("sfm", dict(leap="bandit", tol=0.05, policy="ucb1")),
                                       ("sfm", dict(leap="bandit")), ("fastflow", {})])
def test_bandit_state_round_trips_through_the_sampler(name, opts):
    a = build_sampler(name, steps=30, **opts)
    for i in range(2):
        a.sample(GM, noise(32, seed=i))
    b = build_sampler(name, steps=30, **opts)
    b.load_state_dict(a.state_dict())
    x0 = noise(32, seed=9)
    ra, rb = a.sample(GM, x0), b.sample(GM, x0)
    assert torch.equal(ra.samples, rb.samples) and ra.stats.arm_counts == rb.stats.arm_counts
    fresh_opts = dict(opts, mu=a.mu_) if name == "sfm" else opts  # no calibration batch: the statistics differ
    fresh = build_sampler(name, steps=30, **fresh_opts).sample(GM, x0)  # control: the state mattered
    assert fresh.stats.arm_counts != ra.stats.arm_counts


@pytest.mark.parametrize("name,opts,match", [
    ("sfm", dict(tol=0.0), "tol"), ("sfm", dict(tol=-1), "tol"), ("sfm", dict(leap=0), "leap"),
    ("sfm", dict(arms=()), "empty"), ("sfm", dict(arms=(4, 2)), "increasing"), ("sfm", dict(arms=(0, 2)), "positive"),
    ("sfm", dict(policy="eps"), "ucb1"), ("sfm", dict(drafter="oracle"), "drafter"),
    ("rca", dict(tol=0.1), r"unknown option\(s\) \['tol'\] for sampler 'rca'; valid: steps, schedule, grid, drafter, leap"),
    ("fastflow", dict(arms=()), "empty"), ("fastflow", dict(arms=(0, 4, 2)), "increasing"),
    ("fastflow", dict(arms=(0, 1, 8)), "longer than"), ("fastflow", dict(mu_scale=0), "mu_scale"),
    ("sfm", dict(check="local", tol=0.0), "tol"), ("sfm", dict(check="local", tol="x"), "tol"),
    ("sfm", dict(check="local", tol=1e-320), "too small"), ("sfm", dict(check="local", mu_scale=10.0), "no effect"),
    ("fastflow", dict(mu=float("inf")), "finite"), ("fastflow", dict(mu=-1.0), "mu"), ("fastflow", dict(mu="x"), "mu"),
    ("fastflow", dict(mu_scale="x"), "mu_scale"),
])
def test_bad_options(name, opts, match):
    with pytest.raises(ValueError, match=match):
        build_sampler(name, steps=10, **opts)


@pytest.mark.parametrize("name", ["sfm", "fastflow"])
def test_state_for_another_arm_set_is_an_error(name):
    opts = dict(leap="bandit") if name == "sfm" else {}
    state = build_sampler(name, steps=30, **opts).state_dict()
    other = build_sampler(name, steps=30, arms=(0, 1, 2) if name == "fastflow" else (1, 2), **opts)
    with pytest.raises(ValueError, match="saved for"):
        other.load_state_dict(state)


# --------------------------------------------------------------------------------- fastflow on a second-order base
def test_fastflow_ab2_base_is_ab2_without_skips_and_beats_its_euler_base():
    from specflow.data.toy import GaussianMixture

    gm = GaussianMixture.default(dim=16)
    x0 = torch.randn(256, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ab2 = build_sampler("ab2", steps=20).sample(gm, x0).samples
    no_skip = build_sampler("fastflow", steps=20, base="ab2", arms=(0,), mu=0.0).sample(gm, x0).samples
    assert (ab2 - no_skip).abs().max() < 1e-12
    ref = build_sampler("heun", steps=400).sample(gm, x0).samples
    err = {}
    for base in ("euler", "ab2"):
        s = build_sampler("fastflow", steps=40, base=base)
        for _ in range(3):  # calibrate, then learn
            res = s.sample(gm, x0)
        err[base] = ((res.samples - ref).square().mean().sqrt().item(), res.stats.sequential_nfe)
    assert err["ab2"][1] == err["euler"][1] and err["ab2"][0] < 0.85 * err["euler"][0], err


def test_fastflow_base_is_checked():
    with pytest.raises(ValueError, match="unknown base 'rk4'; valid: euler, ab2"):
        build_sampler("fastflow", steps=20, base="rk4")
    learnt = build_sampler("fastflow", steps=20, base="ab2", mu=0.1).state_dict()
    with pytest.raises(ValueError, match="base='ab2'"):
        build_sampler("fastflow", steps=20).load_state_dict(learnt)


# ------------------------------------------------------------------------------------- sfm on a second-order base
@pytest.mark.parametrize("opts", [dict(leap=1), dict(leap=4, tol=1e-12)])
def test_sfm_ab2_base_without_accepted_leaps_is_ab2(opts):
    gm = GaussianMixture.default(dim=16)
    x0 = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ab2 = build_sampler("ab2", steps=20).sample(gm, x0).samples
    assert (build_sampler("sfm", steps=20, base="ab2", **opts).sample(gm, x0).samples - ab2).abs().max() < 1e-12


def test_sfm_ab2_base_beats_its_euler_base_at_equal_calls():
    """Same leaps, same checks (the check does not depend on the base here): the second-order base leaves a
    several times smaller error against a fine reference."""
    gm = GaussianMixture.default(dim=16)
    x0 = torch.randn(256, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = build_sampler("heun", steps=400).sample(gm, x0).samples
    out = {}
    for base in ("euler", "ab2"):
        res = build_sampler("sfm", steps=40, leap=2, tol=0.05, base=base).sample(gm, x0)
        out[base] = ((res.samples - ref).square().mean().sqrt().item(), res.stats.total_nfe)
    assert abs(out["ab2"][1] - out["euler"][1]) < 1.0 and out["ab2"][0] < 0.3 * out["euler"][0], out


def test_sfm_base_is_checked():
    with pytest.raises(ValueError, match="unknown base 'heun'; valid: euler, ab2"):
        build_sampler("sfm", base="heun")
    learnt = build_sampler("sfm", leap="bandit", base="ab2").state_dict()
    with pytest.raises(ValueError, match="base='ab2'"):
        build_sampler("sfm", leap="bandit").load_state_dict(learnt)
    with pytest.raises(ValueError, match="unknown option"):
        build_sampler("rca", base="ab2")  # rca keeps its own trapezoid


# ------------------------------------------------------------------------------ sfm's leap bandit prices error
def test_sfm_bandit_calibrates_mu_on_a_plain_base_batch():
    """The first batch calibrates μ: base steps only (ab2-N exactly), then the bandit leaps."""
    gm = GaussianMixture.default(dim=16)
    x0 = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = build_sampler("sfm", steps=30, leap="bandit", tol=0.1, base="ab2")
    first = s.sample(gm, x0)
    assert (first.samples - build_sampler("ab2", steps=30).sample(gm, x0).samples).abs().max() < 1e-12
    assert set(first.stats.arm_counts) == {1}
    # μ from the same base steps, computed here: e_k = ‖x_{k+1} − trapezoid‖ / ‖x̂1(x_{k+1})‖ for every step whose
    # end is evaluated (not the last one, to t = 1); μ = mu_scale / (N·median e)
    N, h, x, v_prev, errors = 30, 1 / 30, x0.clone(), None, []
    v = gm(x, torch.tensor(0.0, dtype=torch.float64))
    for k in range(N - 1):
        x_next = x + h * (v if v_prev is None else 1.5 * v - 0.5 * v_prev)
        t_next = torch.tensor((k + 1) * h, dtype=torch.float64)
        v_next = gm(x_next, t_next)
        trap = x + h * (v + v_next) / 2
        errors.append((x_next - trap).norm(dim=1) / (x_next + (1 - t_next) * v_next).norm(dim=1))
        x, v_prev, v = x_next, v, v_next
    expected = 3.0 / (N * float(torch.cat(errors).median()))
    assert s.mu_ == pytest.approx(expected, rel=1e-3), (s.mu_, expected)
    mu = s.mu_
    second = s.sample(gm, x0)
    assert second.stats.total_nfe < 30 and s.mu_ == mu  # it leaps now; μ stays


def _priced_run(steps=50, **opts):
    gm = GaussianMixture.default(dim=64)
    g = torch.Generator().manual_seed(1)
    s = build_sampler("sfm", steps=steps, leap="bandit", base="ab2", **{"tol": 0.2, **opts})
    for _ in range(3):
        s.sample(gm, torch.randn(128, 64, dtype=torch.float64, generator=g))
    x0 = torch.randn(128, 64, dtype=torch.float64, generator=g)
    res = s.sample(gm, x0)
    ref = build_sampler("heun", steps=200).sample(gm, x0).samples
    mean_leap = sum(L * n for L, n in res.stats.arm_counts.items()) / sum(res.stats.arm_counts.values())
    return mean_leap, rel(res.samples, ref), res.stats.total_nfe


def test_sfm_bandit_error_price_buys_accuracy_with_shorter_leaps():
    """A high price of error makes the bandit choose shorter leaps and leave less error than calls alone (μ = 0,
    the control: a reward that ignored e would give the same choices)."""
    calls_leap, calls_err, _ = _priced_run(mu=0.0)
    priced_leap, priced_err, _ = _priced_run(mu_scale=10.0)
    assert priced_leap < 0.8 * calls_leap and priced_err < 0.7 * calls_err, (calls_leap, calls_err, priced_leap,
                                                                              priced_err)


def test_sfm_local_check_bandit_prices_error_at_its_tol():
    """With the local check, tol and μ are on one scale: μ = LOCAL_MU_TOL/tol, no calibration batch (the first
    batch already leaps); priced, the bandit leaves less error than a calls-only bandit (μ = 0, the control) at
    the same tol, for no more calls (at N = 100: 5.5e-4 in 49 calls against 8.6e-4 in 52; at N = 50 the two are
    within a few % of each other on this mixture)."""
    from specflow.sampling.sfm import LOCAL_MU_TOL

    s = build_sampler("sfm", steps=50, leap="bandit", check="local", tol=1e-3, base="ab2")
    assert s.mu_ == pytest.approx(LOCAL_MU_TOL / 1e-3)
    gm = GaussianMixture.default(dim=16)
    first = s.sample(gm, torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert max(first.stats.arm_counts) > 1  # leapt in its first batch: nothing to calibrate
    _, priced_err, priced_nfe = _priced_run(steps=100, check="local", tol=1e-3, policy="thompson")
    _, calls_err, calls_nfe = _priced_run(steps=100, check="local", tol=1e-3, policy="thompson", mu=0.0)
    assert priced_err < 0.8 * calls_err and priced_nfe <= calls_nfe, (priced_err, priced_nfe, calls_err, calls_nfe)
    # accept-all has no tol to derive μ from: calibrated as with the x1 check
    assert build_sampler("sfm", leap="bandit", check="local", tol=float("inf")).mu_ is None


def test_sfm_state_priced_at_another_tol_is_an_error():
    learnt = build_sampler("sfm", steps=20, leap="bandit", check="local", tol=1e-2).state_dict()
    with pytest.raises(ValueError, match="tol with the local check"):
        build_sampler("sfm", steps=20, leap="bandit", check="local", tol=1e-3).load_state_dict(learnt)
    same = build_sampler("sfm", steps=20, leap="bandit", check="local", tol=1e-2)
    same.load_state_dict(learnt)
    assert same.mu_ == learnt["mu"]


@pytest.mark.parametrize("opts,match", [(dict(mu=-1.0), "mu"), (dict(mu=float("nan")), "mu"), (dict(mu="high"), "mu"),
                                        (dict(mu_scale=0), "mu_scale"), (dict(mu_scale=-2.0), "mu_scale")])
def test_sfm_error_price_is_checked(opts, match):
    with pytest.raises(ValueError, match=match):
        build_sampler("sfm", steps=20, leap="bandit", **opts)


def test_sfm_state_for_another_objective_is_an_error():
    learnt = build_sampler("sfm", steps=20, leap="bandit", mu=0.0).state_dict()
    with pytest.raises(ValueError, match="mu=0.0"):
        build_sampler("sfm", steps=20, leap="bandit", mu=5.0).load_state_dict(learnt)
    old = {k: v for k, v in learnt.items() if k != "mu"}  # saved before the objective priced error
    with pytest.raises(ValueError, match="calls only"):
        build_sampler("sfm", steps=20, leap="bandit").load_state_dict(old)
    calibrated = build_sampler("sfm", steps=20, leap="bandit")  # mu=None takes the state's μ
    calibrated.load_state_dict(learnt)
    assert calibrated.mu_ == 0.0
    for other, match in ((dict(check="local"), "check='x1'"), (dict(steps=40), "steps=20"),
                         (dict(base="ab2"), "base='euler'")):
        with pytest.raises(ValueError, match=match):
            build_sampler("sfm", **{"steps": 20, "leap": "bandit", "mu": 0.0, **other}).load_state_dict(learnt)
    with pytest.raises(ValueError, match="expected None or a finite number"):
        build_sampler("sfm", steps=20, leap="bandit").load_state_dict(dict(learnt, mu=-1.0))
    with pytest.raises(ValueError, match="not learnt yet"):
        build_sampler("sfm", steps=20, leap="bandit", mu=2.0).load_state_dict(
            build_sampler("sfm", steps=20, leap="bandit").state_dict())


@pytest.mark.parametrize("opts", [dict(leap=4), dict(leap="bandit"), dict(leap=4, check="local")], ids=str)
def test_sfm_runs_in_bfloat16(opts):
    """Low-precision states: the error estimate is fetched in float32, whatever x's dtype."""
    x0 = noise(64).to(torch.bfloat16)
    s = build_sampler("sfm", steps=20, tol=0.1, **opts)
    for _ in range(2):  # the bandit calibrates, then leaps
        res = s.sample(lambda x, t: GM(x.double(), t.double()).to(x.dtype), x0)
    assert res.samples.dtype == torch.bfloat16 and torch.isfinite(res.samples.float()).all()
    assert res.stats.proposed > 0  # it leapt (bfloat16's rounding makes the checks reject often: not timed here)


# ----------------------------------------------------------------------------------- sfm's local-error check
def test_sfm_local_check_buys_accuracy_at_equal_calls():
    """check="local" (accept a leap when its embedded local error estimate is within tol) against the x̂1 check
    at the same leap and about the same calls: far less error on the toy64 flow (measured: 1.9e-3 vs 5.8e-3 at
    N = 100, benchmarks/RESULTS.md). Control: a loose local tol accepts every leap and loses that accuracy."""
    gm = GaussianMixture.default(dim=64)
    x0 = torch.randn(128, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = build_sampler("heun", steps=400).sample(gm, x0).samples
    out = {}
    for label, opts in {"x1": dict(tol=0.05), "local": dict(tol=3e-3, check="local"),
                        "loose": dict(tol=1.0, check="local")}.items():
        res = build_sampler("sfm", steps=100, leap=4, base="ab2", **opts).sample(gm, x0)
        out[label] = (res.stats.total_nfe, rel(res.samples, ref), res.stats.acceptance_rate)
    (n_x1, e_x1, _), (n_loc, e_loc, _), (_, e_loose, a_loose) = out["x1"], out["local"], out["loose"]
    assert n_loc <= 1.1 * n_x1 and e_loc < 0.5 * e_x1, out
    assert a_loose == 1.0 and e_loose > 2 * e_loc, out


def test_sfm_check_is_checked():
    with pytest.raises(ValueError, match="unknown check 'energy'; valid: x1, local"):
        build_sampler("sfm", steps=20, check="energy")


# ------------------------------------------------------------------------------------------ rca's leap bandit
def test_rca_bandit_calibrates_then_learns_longer_leaps_where_they_are_cheap():
    """rca's bandit: the first batch is plain L = 1 (the one-call predictor–corrector, N + 1 calls) and sets μ;
    after it the bandit leaps, one L per round for the batch, and its calls fall well below that."""
    gm = GaussianMixture.default(dim=64)
    g = torch.Generator().manual_seed(0)
    s = build_sampler("rca", steps=50, leap="bandit")
    first = s.sample(gm, torch.randn(128, 64, dtype=torch.float64, generator=g))
    assert first.stats.sequential_nfe == 51 and s.mu_ > 0 and set(first.stats.arm_counts) == {1}
    for _ in range(4):
        res = s.sample(gm, torch.randn(128, 64, dtype=torch.float64, generator=g))
    assert res.stats.sequential_nfe < 30 and max(res.stats.arm_counts) > 1


def test_rca_bandit_prices_error():
    """Control for the reward: with a much higher price of error the rca bandit takes shorter leaps (more
    calls) than with error almost free (mu_scale=1e-6: the longest leaps)."""
    gm = GaussianMixture.default(dim=64)
    calls = {}
    for mu_scale in (1e-6, 100.0):
        g = torch.Generator().manual_seed(0)
        s = build_sampler("rca", steps=50, leap="bandit", mu_scale=mu_scale)
        for _ in range(5):
            res = s.sample(gm, torch.randn(128, 64, dtype=torch.float64, generator=g))
        calls[mu_scale] = res.stats.sequential_nfe
    assert calls[100.0] > 1.5 * calls[1e-6], calls


def test_rca_bandit_state_round_trips_and_is_checked():
    gm = GaussianMixture.default(dim=16)
    g = torch.Generator().manual_seed(0)
    a = build_sampler("rca", steps=30, leap="bandit")
    for _ in range(3):
        a.sample(gm, torch.randn(64, 16, dtype=torch.float64, generator=g))
    b = build_sampler("rca", steps=30, leap="bandit")
    b.load_state_dict(a.state_dict())
    x0 = torch.randn(64, 16, dtype=torch.float64, generator=g)
    ra, rb = a.sample(gm, x0), b.sample(gm, x0)
    assert torch.equal(ra.samples, rb.samples) and ra.stats.arm_counts == rb.stats.arm_counts
    with pytest.raises(ValueError, match="rca state was learnt with steps=30"):
        build_sampler("rca", steps=40, leap="bandit").load_state_dict(a.state_dict())
    sfm = build_sampler("sfm", steps=30, leap="bandit", policy="thompson")  # same arms and policy: only the
    sfm.sample(gm, torch.randn(64, 16, dtype=torch.float64, generator=g))  # sampler tells them apart
    with pytest.raises(ValueError, match="learnt by 'sfm', not 'rca'"):
        b.load_state_dict(sfm.state_dict())
    with pytest.raises(ValueError, match="learnt by 'rca', not 'sfm'"):
        sfm.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="unknown option"):
        build_sampler("rca", steps=30, leap="bandit", check="local")


def test_sfm_bandit_plays_its_preferred_leap_cut_at_the_grid_end_as_a_fixed_leap_does():
    """A bandit that prefers L = 8 everywhere plays 8, …, 8 and then the 3 steps left, call for call as the fixed
    leap 8 does (bandit.select keeps a tried arm eligible past the room left; an excluded one cost a call:
    2 + 1 instead of 3)."""
    gm = GaussianMixture.default(dim=64)
    g = torch.Generator().manual_seed(0)
    s = build_sampler("sfm", steps=100, leap="bandit", tol=float("inf"), check="local", base="ab2", mu=1.0)
    for _ in range(2):
        s.sample(gm, torch.randn(64, 64, dtype=torch.float64, generator=g))
    x0 = torch.randn(64, 64, dtype=torch.float64, generator=g)
    res = s.sample(gm, x0)
    fixed = build_sampler("sfm", steps=100, leap=8, tol=float("inf"), base="ab2").sample(gm, x0)
    assert res.stats.arm_counts == fixed.stats.arm_counts == {8: 12 * 64, 3: 64}
    assert res.stats.total_nfe == fixed.stats.total_nfe == 14
    assert torch.equal(res.samples, fixed.samples)
