"""Writing samples to disk atomically (a temp file in the same folder, then ``os.replace``), so a reader or
a crashed run never sees a half-written PNG or .npz — and in the formats other FID tools read."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def atomic_write(path: str | os.PathLike, suffix: str, write) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``: the file is written
    whole or not at all, and an existing one survives a failed or interrupted write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result should read like any new file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    """The process umask, read without changing it where /proc tells (os.umask sets it, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_grid_atomic(images: Tensor, path: str | os.PathLike, nrow: int | None = None,
                     value_range: tuple[float, float] = (-1.0, 1.0), scale: int = 1) -> Path:
    """Save (B, C, H, W) images in ``value_range`` as one PNG grid; ``scale`` upsamples small images (nearest)."""
    from torchvision.utils import save_image

    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be shaped (B, 1 or 3, H, W), got {tuple(images.shape)}")
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    nrow = nrow or max(1, int(round(images.shape[0] ** 0.5)))
    return atomic_write(path, ".png", lambda tmp: save_image(x, tmp, nrow=nrow, padding=1, format="png"))


def save_npz_atomic(path: str | os.PathLike, **arrays) -> Path:
    """``np.savez`` of tensors/arrays (tensors moved to CPU) written atomically."""
    data = {k: (v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)) for k, v in arrays.items()}

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **data)

    return atomic_write(path, ".npz", write)


def to_uint8(images: Tensor) -> Tensor:
    """Images in [−1, 1], (B, C, H, W) → uint8 (B, H, W, C): round((x + 1)·127.5), clamped — what image files and
    the usual FID tools hold."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be shaped (B, 1 or 3, H, W), got {tuple(images.shape)}")
    return ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def save_adm_npz_atomic(images: Tensor, labels: Tensor | None, path: str | os.PathLike) -> Path:
    """The sample batch format of OpenAI's guided-diffusion evaluator (evaluations/evaluator.py): ``arr_0`` uint8
    (N, H, W, 3), grey images repeated to RGB as its Inception expects; ``arr_1`` the class labels if any."""
    x = to_uint8(images)
    arrays = {"arr_0": x.expand(-1, -1, -1, 3) if x.shape[-1] == 1 else x}
    if labels is not None:
        arrays["arr_1"] = labels
    return save_npz_atomic(path, **arrays)


def check_png_folder(folder: str | os.PathLike) -> Path:
    """``folder`` if ``save_pngs_atomic`` may replace it: absent, or an earlier export (NNNNNN.png files only) —
    never someone's other files; else a ValueError."""
    folder = Path(folder)
    if folder.exists():
        other = ["(a file, not a folder)"] if not folder.is_dir() else sorted(
            p.name for p in folder.iterdir() if not (len(p.stem) == 6 and p.stem.isdigit() and p.suffix == ".png"))
        if other:
            raise ValueError(f"{folder} exists and is not an earlier export ({', '.join(other[:3])}); move it away "
                             f"or export elsewhere")
    return folder


def save_pngs_atomic(images: Tensor, folder: str | os.PathLike) -> Path:
    """One PNG per image, ``folder/000000.png`` …, for folder-based tools (torch-fidelity, clean-fid). Written to
    a temporary folder beside it, then put in its place: a reader sees the old folder or the whole new one."""
    from torchvision.io import write_png

    folder = check_png_folder(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        for i, img in enumerate(to_uint8(images).permute(0, 3, 1, 2)):
            write_png(img.contiguous(), str(tmp / f"{i:06d}.png"))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private
        old = None
        if folder.exists():
            old = folder.parent / f"{tmp.name}.old"
            os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process (a shared run's other merger) put its export there first: same samples
            if not folder.is_dir():
                raise
            shutil.rmtree(tmp)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
