"""Faults: a training process killed with SIGKILL resumes at its last saved step, and the atomic writers leave an
existing output intact when a write fails half way. (The training NaN guard is tested in test_train.py, the
sampling one in test_sampler_api.py.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from specflow import io as sio
from specflow.cli import main
from specflow.lit.target import TargetFlow

ROOT = Path(__file__).resolve().parents[1]


def _toy_args(root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs/toy.yaml"), "--trainer.default_root_dir", str(root),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.callbacks.dirpath", str(root / "ckpt"),
            "--trainer.callbacks.every_n_train_steps", "1", "--model.net", '{"dim": 2, "hidden": 16, "depth": 2}',
            *extra]


def _saved_step(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except (FileNotFoundError, EOFError, RuntimeError):  # not written yet (an atomic rename makes it whole)
        return -1


def test_sigkill_during_training_then_resume_continues_at_the_saved_step(tmp_path, monkeypatch):
    last = tmp_path / "ckpt" / "last.ckpt"
    log = open(tmp_path / "train.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *_toy_args(tmp_path, "--trainer.max_steps", "1000000")],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while _saved_step(last) < 5:  # a checkpoint exists and training has moved past it
            assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "training never saved step 5"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()

    ckpt = torch.load(last, map_location="cpu", weights_only=True)  # whole, though the writer was killed
    saved = int(ckpt["global_step"])
    assert saved >= 5
    seen = []

    def on_train_start(self):
        ema = {k: v for k, v in self.state_dict().items() if k.startswith("ema.")}
        seen.append((self.global_step, all(torch.equal(v, ckpt["state_dict"][k]) for k, v in ema.items())))

    monkeypatch.setattr(TargetFlow, "on_train_start", on_train_start, raising=False)
    cli = main(_toy_args(tmp_path, "--trainer.max_steps", str(saved + 3), "--ckpt_path", "last"))
    assert seen == [(saved, True)]  # restarted at the saved step, with the saved (EMA) weights
    assert cli.trainer.global_step == saved + 3
    assert _saved_step(last) == saved + 3


# ------------------------------------------------------------------------------------------- atomic writers
def _fail_half_way(exc: BaseException):
    """A writer that puts some bytes into its target, then dies."""
    def write(*args, **kwargs):
        target = next(a for a in args if hasattr(a, "write") or isinstance(a, (str, os.PathLike)))
        if hasattr(target, "write"):
            target.write(b"partial")
        else:
            Path(target).write_bytes(b"partial")
        raise exc
    return write


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failed_npz_write_leaves_the_old_file(tmp_path, monkeypatch, exc):
    path = tmp_path / "out.npz"
    sio.save_npz_atomic(path, samples=torch.ones(3, 2))
    before = path.read_bytes()
    monkeypatch.setattr(np, "savez", _fail_half_way(exc))
    with pytest.raises(type(exc)):
        sio.save_npz_atomic(path, samples=torch.zeros(3, 2))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]  # no temporary file left behind
    monkeypatch.undo()
    sio.save_npz_atomic(path, samples=torch.zeros(3, 2))  # and a later write does replace it
    assert np.load(path)["samples"].sum() == 0


def test_failed_png_write_leaves_the_old_file(tmp_path, monkeypatch):
    import torchvision.utils

    path = tmp_path / "grid.png"
    sio.save_grid_atomic(torch.zeros(4, 1, 8, 8), path)
    before = path.read_bytes()
    monkeypatch.setattr(torchvision.utils, "save_image", _fail_half_way(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        sio.save_grid_atomic(torch.ones(4, 1, 8, 8), path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


def test_written_files_get_the_permissions_of_any_new_file(tmp_path):
    """mkstemp/mkdtemp make private temporaries; outputs on a shared cluster must be readable like any new file
    (umask 022 → 0644 files, 0755 folders), and a failed PNG export leaves no temporary folder."""
    old = os.umask(0o022)
    try:
        npz = sio.save_npz_atomic(tmp_path / "s.npz", samples=torch.zeros(2))
        folder = sio.save_pngs_atomic(torch.zeros(2, 1, 4, 4), tmp_path / "pngs")
    finally:
        os.umask(old)
    assert npz.stat().st_mode & 0o777 == 0o644 and folder.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in folder.iterdir())
    with pytest.raises(ValueError, match="images must be shaped"):
        sio.save_pngs_atomic(torch.zeros(2, 2, 4, 4), tmp_path / "bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pngs", "s.npz"]
