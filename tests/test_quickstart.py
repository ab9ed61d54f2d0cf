"""README set-up: exactly two commands, CI runs the second; command (1) end to end on tiny settings (trains,
samples with the baselines and each accelerated sampler, writes table and grid)."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_second():
    """A newcomer runs two commands: (1) the main job on the embedded default, (2) the tests — which CI runs."""
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set-up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    commands = [block.strip() for block in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)]
    assert len(commands) == 2, commands
    assert commands[0] == "pip install -e . && python -m specflow.quickstart"
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [commands[1]] and "pytest" in commands[1]


def test_quickstart_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "specflow.quickstart", "--target-steps", "7", "--draft-steps", "53",
           "--num", "12", "--batch-size", "12", "--steps", "16"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = (tmp_path / "runs/quickstart/table.txt").read_text()
    for name in ("euler", "heun", "ab2", "sde", "speculative medusa", "sfm", "rca L4", "rca bandit", "fastflow"):
        assert name in table
    assert (tmp_path / "runs/quickstart/samplers.png").stat().st_size > 0
    rca_bandit = next(line.split() for line in table.splitlines() if line.startswith("rca bandit"))
    assert float(rca_bandit[3]) < 17  # warmed up (μ calibrated, arms tried): it leaps in the table's run
    # Training ends at the step counts (not at a time), so the table is the same on a faster machine.
    import torch

    def step(ckpt):  # 53 is past the heads' last periodic checkpoint (every 50): the final state is what counts
        return torch.load(tmp_path / ckpt, map_location="cpu", weights_only=True)["global_step"]

    target, heads = "runs/digits/checkpoints/done.ckpt", "runs/digits_medusa/checkpoints/done.ckpt"
    assert (step(target), step(heads)) == (7, 53) and "time cap" not in out.stdout
    # A second run reuses the finished checkpoints instead of training again; --retrain replaces them.
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "reusing" in again.stdout
    cmd[cmd.index("--target-steps") + 1], cmd[cmd.index("--draft-steps") + 1] = "9", "4"
    retrained = subprocess.run([*cmd, "--retrain"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert retrained.returncode == 0 and (step(target), step(heads)) == (9, 4), retrained.stdout[-2000:]
    assert not list((tmp_path / "runs/digits/checkpoints").glob("last-v*.ckpt"))


def test_a_time_capped_training_is_marked_done_and_said(tmp_path, capsys):
    """The time caps are a safety net: a run they stop before its step count is still used, with a note."""
    import torch

    from specflow.quickstart import _finish

    (tmp_path / "a").mkdir()
    torch.save({"global_step": 3}, tmp_path / "a" / "last.ckpt")
    _finish(tmp_path / "a" / "done.ckpt", 10)
    assert "stopped training at step 3 of 10" in capsys.readouterr().out and (tmp_path / "a" / "done.ckpt").is_file()
    torch.save({"global_step": 10}, tmp_path / "a" / "last.ckpt")
    (tmp_path / "a" / "done.ckpt").unlink()
    _finish(tmp_path / "a" / "done.ckpt", 10)
    assert "note" not in capsys.readouterr().out


def test_quickstart_on_fashion_mnist(tmp_path):
    """``--data fashion`` trains configs/fashion.yaml and fashion_medusa.yaml (here on tiny IDX files of the
    test's own) and prints the same table for the 28×28 target."""
    from test_fashion_data import write_set

    write_set(tmp_path / "fm", n_train=40, n_test=20)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "specflow.quickstart", "--data", "fashion", "--data-root", str(tmp_path / "fm"),
           "--target-steps", "3", "--draft-steps", "2", "--num", "8", "--batch-size", "8", "--steps", "16"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = (tmp_path / "runs/quickstart/table.txt").read_text()
    assert table.startswith("fashion target, N = 16") and "speculative medusa" in table
    import torch

    ckpt = torch.load(tmp_path / "runs/fashion/checkpoints/done.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["hyper_parameters"]["net"]["image_size"] == 28


def test_quickstart_fashion_without_the_files_fails_before_training(tmp_path, monkeypatch):
    import pytest

    from specflow.quickstart import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        main(["--data", "fashion", "--data-root", str(tmp_path / "none")])
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit):
        main(["--data-root", str(tmp_path)])  # the digits are embedded: a root is a mistake, said by argparse
