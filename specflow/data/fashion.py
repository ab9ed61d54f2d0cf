"""Fashion-MNIST from local IDX files: 60 000 + 10 000 greyscale 28×28 photographs of clothing, 10 classes.

Nothing is downloaded. The four files are the ones torchvision uses, found in either layout:

    <root>/train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz
    <root>/FashionMNIST/raw/<the same files>                                   (torchvision's ``root``)

(uncompressed copies without ``.gz`` are read too). The default root is where Debian's
``apt-get install dataset-fashion-mnist`` puts them. Pixels 0..255 map to x = v/127.5 − 1 ∈ [−1, 1];
``image_size=14`` averages 2×2 blocks (area downsampling), the middle rung of the dimension ladder
(D = 196 between the digits' 64 and Fashion-MNIST's 784).
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from specflow.data.images import _check_positive, _loader

DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
APT_HINT = "sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu: puts them under " + DEBIAN_ROOT + ")"
SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned bytes, 3-d (images) or 1-d (labels)
LAYOUT = ("<root>/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz, or the same under "
          "<root>/FashionMNIST/raw/ (torchvision's layout)")


class IDXError(ValueError):
    """An IDX file that is not what Fashion-MNIST's should be (names the file and the fix)."""


def _bad(path: Path, why: str) -> IDXError:
    return IDXError(f"{path}: {why}. Expected the Fashion-MNIST IDX files ({LAYOUT}); "
                    f"get a fresh copy with: {APT_HINT}")


def find_file(root: Path, stem: str) -> Path:
    """The file ``stem`` (.gz preferred, else uncompressed) in ``root`` or ``root/FashionMNIST/raw``."""
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    where = "does not exist" if not root.is_dir() else f"has no {stem}.gz (nor FashionMNIST/raw/{stem}.gz)"
    raise FileNotFoundError(f"Fashion-MNIST root {str(root)!r} {where}. Expected layout: {LAYOUT}. "
                            f"Install the files with: {APT_HINT}, or point data.root at a folder holding them")


def read_idx(path: Path, ndim: int, shape: tuple[int, ...] = ()) -> np.ndarray:
    """An IDX array of unsigned bytes with ``ndim`` dimensions (items shaped ``shape``): checks magic,
    dimensions and length."""
    try:
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut-off stream an EOFError
        raise _bad(path, f"cannot be decompressed ({type(e).__name__}: {e}); the file is corrupt or truncated") from e
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _bad(path, f"is {len(raw)} bytes long, shorter than an IDX header ({header} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != MAGIC[ndim]:
        raise _bad(path, f"has magic number 0x{magic:08x}, expected 0x{MAGIC[ndim]:08x} "
                         f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if dims[1:] != shape:
        raise _bad(path, f"holds an array shaped {dims}, expected (n, {', '.join(map(str, shape))})")
    size = int(np.prod(dims))
    if len(raw) != header + size:
        raise _bad(path, f"has {len(raw) - header} bytes of data, expected {size} for shape {dims} (truncated?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_split(root: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, 28, 28) uint8, labels (n,) long) of ``split`` ("train" | "test"), checked against each other."""
    img_stem, lab_stem = SPLITS[split]
    root = Path(root)
    img_path, lab_path = find_file(root, img_stem), find_file(root, lab_stem)
    x = read_idx(img_path, 3, (28, 28))
    y = read_idx(lab_path, 1)
    if len(x) != len(y):
        raise _bad(lab_path, f"holds {len(y)} labels for the {len(x)} images of {img_path.name}")
    if y.size and y.max() > 9:
        raise _bad(lab_path, f"holds label {int(y.max())}; Fashion-MNIST has classes 0..9")
    return torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64))


def to_model_space(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (n, 28, 28) → float32 (n, 1, S, S) in [−1, 1]; S = 14 averages 2×2 blocks."""
    x = images.float()[:, None] / 127.5 - 1.0
    return F.avg_pool2d(x, 28 // image_size) if image_size != 28 else x


class _Flipped(Dataset):
    """Random horizontal flips of a tensor dataset's images (training only; the reference set never flips)."""

    def __init__(self, base: TensorDataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), y


class FashionMNISTDataModule(pl.LightningDataModule):
    """Fashion-MNIST, class-conditional (labels 0..9): train = the 60 000 training images, val = the 10 000
    test images (limit them with the trainer's ``limit_val_batches``). ``random_flip`` flips training images
    at random (off by default: the set's shoes all face left, so a flip changes the distribution).

    Args:
        root: folder holding the four IDX files (Debian's folder by default; torchvision's root works too).
        image_size: 28 (native, D = 784) or 14 (2×2 area-averaged, D = 196).
    """

    SIZES = (28, 14)

    def __init__(self, root: str = DEBIAN_ROOT, image_size: int = 28, batch_size: int = 128,
                 num_workers: int = 0, random_flip: bool = False):
        super().__init__()
        if image_size not in self.SIZES:
            raise ValueError(f"FashionMNISTDataModule image_size must be one of {self.SIZES} "
                             f"(28 native, 14 area-downsampled); got {image_size}")
        _check_positive(batch_size=batch_size)
        self.root = str(root)
        self.image_size, self.in_channels, self.num_classes = image_size, 1, 10
        self.batch_size, self.num_workers, self.random_flip = batch_size, num_workers, random_flip
        for split in SPLITS.values():  # fail at construction (config time) when a file is missing
            find_file(Path(self.root), split[0]), find_file(Path(self.root), split[1])
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def _split(self, split: str) -> TensorDataset:
        x, y = load_split(self.root, split)
        return TensorDataset(to_model_space(x, self.image_size), y)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = self._split("train"), self._split("test")

    def train_dataloader(self) -> DataLoader:
        ds = _Flipped(self.train_set) if self.random_flip else self.train_set
        return _loader(ds, self.batch_size, True, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return _loader(self.val_set, self.batch_size, False, self.num_workers)

    def reference_set(self) -> Dataset:
        """The training images without flips: FID's reference (``specflow.metrics.reference_images``)."""
        self.setup()
        return self.train_set
