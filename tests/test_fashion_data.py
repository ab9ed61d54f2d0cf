"""Fashion-MNIST data module on tiny IDX files written here (CI never needs the real set): layouts, values,
the 14×14 area downsampling, flips, and one clear error per kind of bad input."""
import gzip

import numpy as np
import pytest
import torch

from specflow.data import FashionMNISTDataModule
from specflow.data.fashion import IDXError, load_split


def idx_bytes(arr: np.ndarray) -> bytes:
    magic = 0x800 + arr.ndim
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.astype(np.uint8).tobytes()


def write_set(folder, n_train=40, n_test=20, seed=0, gz=True, edit=None):
    """Four IDX files in ``folder``; image i of class y has a bright bar in column y (so classes differ)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        x = rng.integers(0, 60, size=(n, 28, 28))
        x[np.arange(n), :, 2 * y + 4] = 255
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            name = f"{split}-{kind}-ubyte"
            data = idx_bytes(arr)
            if edit and name in edit:
                data = edit[name](data)
            path = folder / (name + ".gz" if gz else name)
            path.write_bytes(gzip.compress(data) if gz else data)
            out[name] = path
    return out


@pytest.mark.parametrize("layout", ["debian", "torchvision", "uncompressed"])
def test_layouts_values_labels(tmp_path, layout):
    folder = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path
    write_set(folder, gz=layout != "uncompressed")
    dm = FashionMNISTDataModule(root=str(tmp_path), batch_size=8)
    assert (dm.image_size, dm.in_channels, dm.num_classes) == (28, 1, 10)
    dm.setup("fit")
    x, y = dm.train_set.tensors
    assert x.shape == (40, 1, 28, 28) and len(dm.val_set) == 20
    assert x.min() >= -1 and x.max() == 1.0 and y.tolist() == [i % 10 for i in range(40)]
    # pixel v maps to v/127.5 − 1 exactly, and the class bar is where the label says
    raw, _ = load_split(folder, "train")
    torch.testing.assert_close(x[:, 0], raw.float() / 127.5 - 1, rtol=0, atol=0)
    assert (x[y == 3][:, 0, :, 10] == 1).all()
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (8, 1, 28, 28) and yb.dtype == torch.long


def test_14px_is_the_2x2_area_mean(tmp_path):
    write_set(tmp_path)
    dm28, dm14 = FashionMNISTDataModule(root=str(tmp_path)), FashionMNISTDataModule(root=str(tmp_path), image_size=14)
    dm28.setup(), dm14.setup()
    x28, x14 = dm28.train_set.tensors[0], dm14.train_set.tensors[0]
    assert x14.shape == (40, 1, 14, 14)
    want = x28.reshape(40, 1, 14, 2, 14, 2).mean((3, 5))
    torch.testing.assert_close(x14, want)
    assert dm14.image_size == 14 and torch.equal(dm14.train_set.tensors[1], dm28.train_set.tensors[1])


def test_flips_only_in_training_and_reference_is_unflipped(tmp_path):
    write_set(tmp_path, n_train=200)
    dm = FashionMNISTDataModule(root=str(tmp_path), batch_size=200, random_flip=True)
    dm.setup()
    torch.manual_seed(0)
    xb, yb = next(iter(dm.train_dataloader()))
    ref = dm.reference_set()
    ref_x = torch.stack([ref[i][0] for i in range(len(ref))])
    # batch order is shuffled: match each batch image to its reference image or its mirror
    flat_ref, flat_mir = ref_x.flatten(1), ref_x.flip(-1).flatten(1)
    same = (xb.flatten(1)[:, None] == flat_ref[None]).all(-1).any(1)
    flipped = (xb.flatten(1)[:, None] == flat_mir[None]).all(-1).any(1)
    assert (same | flipped).all()
    assert 60 < int((flipped & ~same).sum()) < 140, "about half of the training images are flipped"
    # the reference set and the un-flipped module never flip
    dm_plain = FashionMNISTDataModule(root=str(tmp_path), batch_size=200)
    dm_plain.setup()
    xb2, _ = next(iter(dm_plain.train_dataloader()))
    assert (xb2.flatten(1)[:, None] == flat_ref[None]).all(-1).any(1).all()


def test_missing_root_and_files_name_the_apt_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*apt-get install dataset-fashion-mnist"):
        FashionMNISTDataModule(root=str(tmp_path / "nowhere"))
    files = write_set(tmp_path)
    files["t10k-labels-idx1-ubyte"].unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\.gz.*FashionMNIST/raw.*apt-get install"):
        FashionMNISTDataModule(root=str(tmp_path))


def _flip_magic(data: bytes) -> bytes:
    return (0x0803 + 0x10000).to_bytes(4, "big") + data[4:]


@pytest.mark.parametrize("edit, match", [
    ({"train-images-idx3-ubyte": _flip_magic}, r"train-images-idx3-ubyte\.gz: has magic number 0x00010803, expected 0x00000803"),
    ({"train-images-idx3-ubyte": lambda d: d[:-100]}, r"train-images-idx3-ubyte\.gz: has 31260 bytes of data, expected 31360"),
    ({"train-images-idx3-ubyte": lambda d: d[:10]}, r"shorter than an IDX header"),
    ({"t10k-labels-idx1-ubyte": lambda d: idx_bytes(np.zeros(7, np.uint8))}, r"holds 7 labels for the 20 images"),
    ({"train-labels-idx1-ubyte": lambda d: idx_bytes(np.full(40, 12, np.uint8))}, r"holds label 12; Fashion-MNIST has classes 0\.\.9"),
    ({"t10k-images-idx3-ubyte": lambda d: idx_bytes(np.zeros((20, 32, 32), np.uint8))}, r"shaped \(20, 32, 32\), expected \(n, 28, 28\)"),
])
def test_bad_idx_files_are_named(tmp_path, edit, match):
    write_set(tmp_path, edit=edit)
    dm = FashionMNISTDataModule(root=str(tmp_path))  # files exist: the content is checked when read
    with pytest.raises(IDXError, match=match) as e:
        dm.setup()
    assert "apt-get install dataset-fashion-mnist" in str(e.value)


def test_corrupt_and_truncated_gzip(tmp_path):
    files = write_set(tmp_path)
    path = files["train-images-idx3-ubyte"]
    good = path.read_bytes()
    path.write_bytes(good[:len(good) // 2])  # a cut-off download
    with pytest.raises(IDXError, match=r"train-images-idx3-ubyte\.gz: cannot be decompressed.*corrupt or truncated"):
        FashionMNISTDataModule(root=str(tmp_path)).setup()
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(IDXError, match=r"cannot be decompressed \(BadGzipFile"):
        FashionMNISTDataModule(root=str(tmp_path)).setup()


def test_bad_image_size_lists_the_valid_ones(tmp_path):
    write_set(tmp_path)
    with pytest.raises(ValueError, match=r"image_size must be one of \(28, 14\).*got 32"):
        FashionMNISTDataModule(root=str(tmp_path), image_size=32)
