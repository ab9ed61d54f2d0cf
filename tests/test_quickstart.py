"""README command (1) end to end on tiny settings: trains, samples with every sampler, writes table and grid."""
import os
import subprocess
import sys


def test_quickstart_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "specflow.quickstart", "--target-minutes", "0.05", "--draft-minutes", "0.05",
           "--num", "12", "--batch-size", "12", "--steps", "16"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = (tmp_path / "runs/quickstart/table.txt").read_text()
    for name in ("euler", "heun", "ab2", "sde", "speculative medusa", "sfm", "fastflow"):
        assert name in table
    assert (tmp_path / "runs/quickstart/samplers.png").stat().st_size > 0
    # A second run reuses the finished checkpoints instead of training again.
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "reusing" in again.stdout
