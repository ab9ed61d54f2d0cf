"""Writing samples to disk atomically (a temp file in the same folder, then ``os.replace``), so a reader or
a crashed run never sees a half-written PNG or .npz."""
from __future__ import annotations

import os
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
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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
