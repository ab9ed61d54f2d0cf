"""Image DataModules. Every one yields ``(x, y)``: x float in [−1, 1] shaped (C, H, W), y long class labels.

Each sets ``image_size``, ``in_channels`` and ``num_classes`` in ``__init__`` so the CLI can link them to the
model. Nothing here downloads anything unless a module is explicitly built with ``download=True``.
"""
from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision import transforms as T
from torchvision.datasets import CIFAR10, ImageFolder


def _loader(ds: Dataset, batch_size: int, shuffle: bool, num_workers: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if v < 1:
            raise ValueError(f"{name} must be ≥ 1; got {v}")


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's 8×8 handwritten digits (1797 images, 10 classes, 1 channel) — embedded, never downloads.

    Pixel values 0..16 map to x = v/8 − 1 ∈ [−1, 1]. At ``image_size=16`` the images are bilinearly upsampled
    (align_corners=False), which keeps values in [−1, 1] and gives smoother strokes than nearest-neighbour
    blocks. The train/val split is a fixed permutation drawn from ``seed``; ``val_fraction=0`` means no
    validation set (``val_dataloader`` returns an empty list).
    """

    SIZES = (8, 16)

    def __init__(self, image_size: int = 8, batch_size: int = 128, val_fraction: float = 0.1,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        if image_size not in self.SIZES:
            raise ValueError(f"DigitsDataModule image_size must be one of {self.SIZES}; got {image_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1); got {val_fraction}")
        _check_positive(batch_size=batch_size)
        self.image_size, self.in_channels, self.num_classes = image_size, 1, 10
        self.batch_size, self.val_fraction, self.num_workers, self.seed = batch_size, val_fraction, num_workers, seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All 1797 digits: x (N, 1, S, S) float32 in [−1, 1], y (N,) long."""
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no network

        d = load_digits()
        x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # (N, 1, 8, 8)
        if self.image_size != 8:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return x, torch.as_tensor(d.target, dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = self.images()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(round(self.val_fraction * len(x)))
        val, train = perm[:n_val], perm[n_val:]
        self.train_set, self.val_set = TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        return _loader(self.train_set, self.batch_size, True, self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        return _loader(self.val_set, self.batch_size, False, self.num_workers) if len(self.val_set) else []

    def reference_set(self) -> Dataset:
        """The training images as FID's reference (``specflow.metrics.reference_images``): no augmentation here."""
        return self.train_set


def _image_transform(image_size: int, flip: bool, crop: bool) -> T.Compose:
    ops = [T.Resize(image_size), T.CenterCrop(image_size)] if crop else []
    ops += [T.RandomHorizontalFlip()] if flip else []
    return T.Compose([*ops, T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])  # [0, 1] → [−1, 1]


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 from a local ``root`` holding ``<root>/cifar-10-batches-py/`` (torchvision's python version).

    Train = the 50k training images (random horizontal flips if ``random_flip``), val = the 10k test images.
    ``image_size`` other than 32 resizes (e.g. 16 for quick runs). Downloads only with ``download=True``.
    """

    FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]

    def __init__(self, root: str, download: bool = False, image_size: int = 32, batch_size: int = 128,
                 num_workers: int = 4, random_flip: bool = True):
        super().__init__()
        if not 8 <= image_size <= 64:
            raise ValueError(f"CIFAR10DataModule image_size must lie in [8, 64] (native 32); got {image_size}")
        _check_positive(batch_size=batch_size)
        self.root, self.download = str(root), download
        self.image_size, self.in_channels, self.num_classes = image_size, 3, 10
        self.batch_size, self.num_workers, self.random_flip = batch_size, num_workers, random_flip
        if not download:
            self._check_root()

    def _check_root(self) -> None:
        folder = Path(self.root) / "cifar-10-batches-py"
        missing = [f for f in self.FILES if not (folder / f).is_file()]
        if missing:
            why = "it does not exist" if not folder.is_dir() else f"missing: {', '.join(missing)}"
            raise FileNotFoundError(
                f"CIFAR-10 not found under root={self.root!r}: expected {folder}/ holding "
                f"{', '.join(self.FILES)} ({why}). Point root at the folder that contains "
                f"cifar-10-batches-py/, or set `download: true` (--data.download true) to fetch it there.")

    def prepare_data(self) -> None:
        if self.download:
            CIFAR10(self.root, train=True, download=True)
            CIFAR10(self.root, train=False, download=True)

    def setup(self, stage: str | None = None) -> None:
        self._check_root()
        crop = self.image_size != 32
        self.train_set = CIFAR10(self.root, train=True, transform=_image_transform(self.image_size, self.random_flip, crop))
        self.val_set = CIFAR10(self.root, train=False, transform=_image_transform(self.image_size, False, crop))

    def train_dataloader(self) -> DataLoader:
        return _loader(self.train_set, self.batch_size, True, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return _loader(self.val_set, self.batch_size, False, self.num_workers)

    def reference_set(self) -> Dataset:
        """The training images without random flips: FID's reference, as published CIFAR-10 statistics use it."""
        return CIFAR10(self.root, train=True, transform=_image_transform(self.image_size, False, self.image_size != 32))


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LAYOUT = "<root>/<class>/<image> or <root>/train/<class>/<image> (optionally <root>/val/<class>/<image>)"


def _classes(folder: Path) -> list[str]:
    """Sorted class folders of ``folder``, each of which must hold at least one image."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist; expected layout {LAYOUT}")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    empty = [c for c in classes
             if not any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in os.scandir(folder / c))]
    if not classes or empty:
        what = "no class folders" if not classes else f"class folders without images: {empty[:5]}"
        raise FileNotFoundError(f"image folder {str(folder)!r} has {what}; expected layout {LAYOUT} "
                                f"with images ending in {', '.join(IMG_EXTENSIONS)}")
    return classes


class _ClassFolder(ImageFolder):
    """ImageFolder whose label indices come from a given class list (the training folder's), not its own dirs."""

    def __init__(self, root: str, classes: list[str], **kwargs):
        self.fixed_classes = classes
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self.fixed_classes, {c: i for i, c in enumerate(self.fixed_classes)}


class ImageFolderDataModule(pl.LightningDataModule):
    """ImageNet-style folders: class labels are the sorted class-folder names of the training folder.

    Layout: if ``<root>/train/`` exists it is the training folder and ``<root>/val/`` (if present) the
    validation folder; otherwise ``<root>`` itself holds the class folders and there is no validation set
    unless ``val_dir`` names one (its classes are matched to the training classes by name). Images are
    converted to RGB, resized (shorter side) and center-cropped to ``image_size`` (32 or 64 typically),
    flipped at random for training if ``random_flip``. Without a validation folder ``val_dataloader`` returns
    an empty list and Lightning skips validation.
    """

    def __init__(self, root: str, image_size: int = 64, batch_size: int = 128, num_workers: int = 4,
                 random_flip: bool = True, val_dir: str | None = None):
        super().__init__()
        if not 8 <= image_size <= 256:
            raise ValueError(f"ImageFolderDataModule image_size must lie in [8, 256] (typically 32 or 64); "
                             f"got {image_size}")
        _check_positive(batch_size=batch_size)
        root_path = Path(root)
        self.train_dir = root_path / "train" if (root_path / "train").is_dir() else root_path
        default_val = root_path / "val" if self.train_dir != root_path and (root_path / "val").is_dir() else None
        self.val_dir = Path(val_dir) if val_dir is not None else default_val
        self.classes = _classes(self.train_dir)
        if val_dir is not None and not self.val_dir.is_dir():
            raise FileNotFoundError(f"val_dir {val_dir!r} does not exist; expected <val_dir>/<class>/<image>")
        self.root = str(root)
        self.image_size, self.in_channels, self.num_classes = image_size, 3, len(self.classes)
        self.batch_size, self.num_workers, self.random_flip = batch_size, num_workers, random_flip

    def _folder(self, folder: Path, flip: bool, allow_empty: bool) -> Dataset:
        return _ClassFolder(str(folder), self.classes, transform=_image_transform(self.image_size, flip, crop=True),
                            allow_empty=allow_empty)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self._folder(self.train_dir, self.random_flip, allow_empty=False)
        self.val_set = None if self.val_dir is None else self._folder(self.val_dir, False, allow_empty=True)

    def train_dataloader(self) -> DataLoader:
        return _loader(self.train_set, self.batch_size, True, self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else _loader(self.val_set, self.batch_size, False, self.num_workers)

    def reference_set(self) -> Dataset:
        """The training images resized and center-cropped, without random flips: FID's reference."""
        return self._folder(self.train_dir, False, allow_empty=False)
