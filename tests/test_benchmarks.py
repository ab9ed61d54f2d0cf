"""benchmarks/speculative.py (toy table, overhead mode), deterministic.py (toy) and fid_proxy.py (its samplers)
still run, on tiny settings, so that an API change cannot rot them silently."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from specflow.data.toy import GaussianMixture

ROOT = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fid_proxy_lossy_control_accepts_every_draft_and_the_rivals_build():
    fid = _load("fid_proxy")
    samplers = fid.samplers(steps=20, rival_calls=6)
    assert {"RIVAL sde N=6", "RIVAL ab2 N=6", "RIVAL heun N=3"} <= set(samplers)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    st = samplers["LOSSY accept-all"].sample(GaussianMixture.default(), x0).stats
    assert st.acceptance_rate == 1.0 and st.proposed > 0


def test_speculative_benchmark_modes_run(monkeypatch, capsys):
    bench = _load("speculative")
    for argv in (["--dims", "2", "--samples", "200", "--windows", "4", "--steps", "12"],
                 ["--overhead", "--model", "toy", "--batch", "8", "--steps", "12", "--windows", "4",
                  "--repeats", "1", "--only", "speculative", "heun"],
                 ["--overhead", "--model", "toy", "--batch", "8", "--steps", "12", "--windows", "4",
                  "--repeats", "1", "--only", "sde", "--per-sample"]):
        monkeypatch.setattr(sys, "argv", ["speculative.py", *argv])
        bench.main()
    out = capsys.readouterr().out
    assert "sde-12" in out and "heun-" in out  # the toy table with its rivals at speculation's calls
    assert "6 steps" in out and "per-sample CPU generators" in out  # overhead mode: heun-N/2, per-sample seeding


def test_deterministic_benchmark_runs_with_its_equal_cost_baselines(monkeypatch, capsys):
    bench = _load("deterministic")
    monkeypatch.setattr(sys, "argv", ["deterministic.py", "--steps", "12", "--batch", "16", "--models", "toy2",
                                      "--warmup", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert "sfm" in out and "fastflow" in out and "ab2-" in out and "heun-" in out


def test_ladder_predicted_acceptance_matches_the_measured_and_a_lossy_sampler_is_caught(monkeypatch):
    """benchmarks/ladder.py's measuring sampler: the samples are speculative's own, and the acceptance the
    formula 2Φ(−z/2) predicts from the measured z of each proposed step equals the measured one within
    Monte Carlo noise (16-d mixture, 2000 samples). Control: a sampler that accepts every draft is 0.3 off."""
    monkeypatch.syspath_prepend(str(ROOT))
    ladder = _load("ladder")
    from specflow.sampling import build_sampler

    gm = GaussianMixture.default(dim=16)
    x0 = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    run = lambda s: s.sample(gm.velocity, x0, generator=torch.Generator().manual_seed(1))  # noqa: E731
    s = ladder.MeasuringSpeculative(steps=30, drafter="frozen", window=4)
    res, ref = run(s), run(build_sampler("speculative", steps=30, drafter="frozen", window=4))
    assert torch.equal(res.samples, ref.samples)
    st = res.stats
    assert s.count == st.proposed > 5000
    acc, pred = st.acceptance_rate, s.pred_sum / s.count
    se = (acc * (1 - acc) / st.proposed) ** 0.5
    assert 0.3 < acc < 0.95 and abs(acc - pred) < 4 * se + 0.005, (acc, pred, se)

    class AcceptAll(ladder.MeasuringSpeculative):
        def _verify(self, r, ex, L, jj):
            super()._verify(r, ex, L, jj)
            return L.clone()

    lossy = AcceptAll(steps=30, drafter="frozen", window=4)
    st = run(lossy).stats
    assert st.acceptance_rate == 1.0 and st.acceptance_rate - lossy.pred_sum / lossy.count > 0.1


def test_bandits_hindsight_prices_the_same_fixed_runs_at_every_lambda(monkeypatch):
    """benchmarks/bandits.py runs each fixed window once and prices it at every λ: a window of 1 takes one
    sequential call per step (cost 1 at λ = 0), and the cost grows by exactly λ·rows/N."""
    monkeypatch.syspath_prepend(str(ROOT))
    bandits = _load("bandits")
    args = __import__("argparse").Namespace(models=["toy16"], prices=[0.0, 0.5], arms=[1, 4], drafter="frozen",
                                            policy="thompson", steps=12, n=16, seed=0)
    D, by_price = bandits.hindsight("toy16", args)
    (f0, curve0), (f5, curve5) = by_price[0.0], by_price[0.5]
    assert D == 16 and len(curve0) == len(curve5) == bandits.BATCHES
    assert all(abs(c - 1.0) < 1e-12 for c in f0[1]), f0[1]
    rows = [(b - a) / 0.5 * 12 for a, b in zip(f0[4], f5[4])]  # target rows per sample, recovered
    args.seed = 3
    run = bandits._model("toy16", args)[0]
    s = bandits.CountingSpeculative(steps=12, drafter="frozen", window=4)
    st = run(s, None)[1]
    assert abs(rows[3] - st.total_nfe) < 1e-9 and abs(f0[4][3] - s.sample_rounds / 16 / 12) < 1e-12
    assert len(set(rows)) > 1  # each batch its own noise
    assert all(0 < c for c, *_ in curve5)


def test_bandits_plot_is_written_whole(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(ROOT))
    bandits = _load("bandits")
    args = __import__("argparse").Namespace(models=["toy16"], prices=[0.0, 0.2], arms=[2, 4], drafter="frozen",
                                            policy="thompson", steps=12, n=8, seed=0)
    _, by_price = bandits.hindsight("toy16", args)
    out = tmp_path / "plots" / "bandit_toy16.png"
    bandits.plot("toy16", by_price, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert [p.name for p in out.parent.iterdir()] == ["bandit_toy16.png"]  # no temporary file left


def test_deterministic_pool_merges_logs_a_later_row_replacing_an_earlier(tmp_path):
    bench = _load("deterministic")
    head = "### toy64, N = {}, batch 256, cpu, dtype float64\nmethod  total_nfe  seq_nfe  acc  err_eN  err_fine  time\n"
    row = "{:<40}  {}  {}  1.00  1.00e-02 / 40.0dB  {} / 41.0dB  0.50\n"
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text(head.format(25) + row.format("front sfm ab2 L2 accept-all", 13.0, 13, "1.93e-02")
                     + row.format("front sfm ab2 bandit priced thompson accept-all mu10", 9.0, 9, "5.00e-02") + "\n"
                     + head.format(50) + row.format("front sfm ab2 L2 accept-all", 26.0, 26, "3.67e-03") + "\n")
    second.write_text(head.format(25) + row.format("front sfm ab2 bandit priced thompson accept-all mu10", 8.0, 8,
                                                   "4.00e-02") + "\n")
    pooled = bench.pooled_from_log(str(first), str(second))
    assert pooled == {"front sfm ab2 L2 accept-all N25": (13.0, 1.93e-2), "front sfm ab2 L2 accept-all N50": (26.0, 3.67e-3),
                      "front sfm ab2 bandit priced thompson accept-all mu10 N25": (8.0, 4e-2)}
    assert bench.pooled_from_log(str(second), str(first))[
        "front sfm ab2 bandit priced thompson accept-all mu10 N25"] == (9.0, 5e-2)  # the later log wins


def test_deterministic_pool_reads_the_median_column_and_refuses_a_log_without_it(tmp_path):
    bench = _load("deterministic")
    head = "### fashion, N = 25, batch 32, cpu, dtype float32\nmethod  total_nfe  seq_nfe  acc  err_eN  err_fine  time\n"
    row = "{:<40}  13.0  13  1.00  1.00e-02 / 40.0dB  1.93e-02 / 41.0dB  0.50{}\n"
    new, old = tmp_path / "new.txt", tmp_path / "old.txt"
    ab2 = "  ab2-13{}  13.0  13        1.10e-02 / 39.0dB  2.00e-02 / 40.0dB  0.40{}\n"  # no acceptance
    toy = "front sfm ab2 L4 accept-all{}  7.0  7  1.00  3.00e-02  4.00e-02  0.30{}\n"  # no PSNR
    new.write_text(head + row.format("front sfm ab2 L2 accept-all", "  7.50e-03") + ab2.format(" " * 27, "  8.00e-03")
                   + toy.format(" " * 14, "  3.50e-02") + "\n")
    old.write_text(head + row.format("front sfm ab2 L2 accept-all", "") + ab2.format(" " * 27, "")
                   + toy.format(" " * 14, "") + "\n")
    assert bench.pooled_from_log(str(new), metric="median") == {
        "front sfm ab2 L2 accept-all N25": (13.0, 7.5e-3), "  ab2-13 N25": (13.0, 8e-3),
        "front sfm ab2 L4 accept-all N25": (7.0, 3.5e-2)}
    assert bench.pooled_from_log(str(new)) == bench.pooled_from_log(str(old)) == {
        "front sfm ab2 L2 accept-all N25": (13.0, 1.93e-2), "  ab2-13 N25": (13.0, 2e-2),
        "front sfm ab2 L4 accept-all N25": (7.0, 4e-2)}  # the batch's error, with or without the column
    with pytest.raises(ValueError, match="no med_fine column"):
        bench.pooled_from_log(str(old), metric="median")


def test_median_error_is_not_carried_by_one_bad_sample():
    bench = _load("deterministic")
    ref = torch.ones(9, 4)
    out = ref.clone()
    out[:, 0] += 0.01  # every sample 0.5 % off
    out[0] += 10.0  # one sample far off: it carries the batch's error, not the median
    assert bench.median_error(out, ref) == pytest.approx(0.005)
    assert bench.relative_error(out, ref) > 1.0


def test_leap_sensitivity_replays_fixed_schedules_and_the_learnt_one(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT))
    bench = _load("leap_sensitivity")
    monkeypatch.setattr(sys, "argv", ["leap_sensitivity.py", "--models", "toy64", "--steps", "16", "--batch", "8",
                                      "--mu", "100", "--warmup", "1"])
    bench.main()
    out = capsys.readouterr().out.splitlines()
    rows = {line[:28].strip(): line[28:].split() for line in out if line[:1] in "0123456789 b" and "  " in line}
    assert float(rows["1 1 1 1"][0]) == 16.0 and float(rows["2 2 2 2"][0]) == 9.0  # N calls; N/2 + 1
    assert float(rows["4 4 4 4"][7]) == 0.0  # moved: the all-4 schedule is the reference
    assert float(rows["1 1 1 1"][1]) < float(rows["8 8 8 8"][1])  # base steps beat 8-leaps
    nfe, se, price = (np.array([float(r[i]) for r in rows.values()]) for i in (0, 4, 5))
    assert (se > 0).all() and float(rows["1 1 1 1"][4]) < float(rows["8 8 8 8"][4])  # 8-leaps leave more e
    assert np.allclose(price, nfe + 100 * se / 8, atol=0.06)  # the price: NFE + μ·Σe/batch
    by_bucket = np.array([[float(v) for v in r[8:12]] for r in rows.values()])
    assert np.allclose(by_bucket.sum(1), se, atol=3e-3)  # Σe split by the bucket each leap started in
    assert by_bucket[list(rows).index("4 4 4 4"), :3].tolist() == by_bucket[list(rows).index("4 4 4 8"), :3].tolist()
    assert any(line.startswith("rank correlation over these schedules") for line in out)
    assert any(k.startswith("its best:") for k in rows) and "bandit mu100 (learning)" in rows


def test_deterministic_bandit_row_does_not_depend_on_the_rows_before_it(monkeypatch, capsys):
    """A learning row's warm-ups are its own (seed, label): run alone (--only) it prints what it prints after
    other learning rows. Control: its figures do depend on its warm-ups (none: other figures)."""
    bench = _load("deterministic")
    row = "sfm ab2 bandit tol.05"

    def printed(*only, warmup="2"):
        monkeypatch.setattr(sys, "argv", ["deterministic.py", "--steps", "20", "--batch", "16", "--models", "toy64",
                                          "--warmup", warmup, "--only", *only])
        bench.main()
        line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(row + " "))
        return line.split()[len(row.split()):-2]  # its NFE, acceptance and errors (not time and med_fine)

    alone = printed(row)
    assert printed("sfm bandit tol.05", "fastflow", row) == alone
    assert printed(row, warmup="0") != alone
