"""DataModules: shapes, ranges, labels, deterministic splits, and clear errors for missing data."""
import numpy as np
import pytest
import torch
from PIL import Image

from specflow.data import (CIFAR10DataModule, DigitsDataModule, GaussianMixture, ImageFolderDataModule,
                           ToyMixtureDataModule)


@pytest.mark.parametrize("size", [8, 16])
def test_digits_shapes_range_labels(size):
    dm = DigitsDataModule(image_size=size, batch_size=32, val_fraction=0.1)
    assert (dm.image_size, dm.in_channels, dm.num_classes) == (size, 1, 10)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 1797 and len(dm.val_set) == 180
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, size, size) and x.dtype == torch.float32
    assert y.dtype == torch.long and y.shape == (32,)
    xs, ys = dm.train_set.tensors
    assert xs.min() == -1.0 and xs.max() == 1.0  # 0 and 16 both occur in the raw digits
    assert set(ys.tolist()) == set(range(10))
    # Images are digits, not noise: the class means differ clearly (a 0 and a 1 look nothing alike).
    assert (xs[ys == 0].mean(0) - xs[ys == 1].mean(0)).abs().max() > 0.5


def test_digits_16px_is_an_upsampling_of_8px():
    x8, y8 = DigitsDataModule(8).images()
    x16, y16 = DigitsDataModule(16).images()
    assert torch.equal(y8, y16)
    pooled = torch.nn.functional.avg_pool2d(x16, 2)  # bilinear blurs a little, so not an exact inverse
    assert torch.corrcoef(torch.stack([pooled.flatten(), x8.flatten()]))[0, 1] > 0.95
    assert (pooled - x8).abs().mean() < 0.2
    torch.testing.assert_close(x16.mean(), x8.mean(), atol=1e-3, rtol=0)


def test_digits_split_is_deterministic_and_disjoint():
    def split(seed):
        dm = DigitsDataModule(seed=seed)
        dm.setup()
        return dm.train_set.tensors[0], dm.val_set.tensors[0]

    (tr_a, va_a), (tr_b, va_b), (tr_c, _) = split(0), split(0), split(1)
    assert torch.equal(tr_a, tr_b) and torch.equal(va_a, va_b)
    assert not torch.equal(tr_a, tr_c)
    # No validation image is also a training image (the digits set has no exact duplicates across the split).
    train_rows = {tuple(r.tolist()) for r in tr_a.flatten(1)}
    assert sum(tuple(r.tolist()) in train_rows for r in va_a.flatten(1)) <= 2


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match=r"image_size must be one of \(8, 16\); got 32"):
        DigitsDataModule(image_size=32)
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.0)


def test_cifar_missing_root_names_download_flag(tmp_path):
    for root in (tmp_path / "missing", tmp_path):  # absent, and present but empty
        with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*download: true"):
            CIFAR10DataModule(root=str(root))
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"missing: data_batch_2"):
        CIFAR10DataModule(root=str(tmp_path))


def make_folder(root, classes=("cat", "dog"), per_class=3, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            mode = "L" if i == 0 else "RGB"  # a grayscale image must come out RGB too
            arr = rng.integers(0, 256, size=(size[1], size[0]) + (() if mode == "L" else (3,)), dtype=np.uint8)
            Image.fromarray(arr, mode).save(root / c / f"{i}.png")


def test_image_folder_shapes_and_labels(tmp_path):
    make_folder(tmp_path / "data")
    dm = ImageFolderDataModule(root=str(tmp_path / "data"), image_size=32, batch_size=6, num_workers=0)
    assert (dm.image_size, dm.in_channels, dm.num_classes) == (32, 3, 2)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.5 and x.max() > 0.5
    assert y.dtype == torch.long and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    assert dm.val_dataloader() == []  # no val folder: Lightning skips validation


def test_image_folder_train_val_layout(tmp_path):
    make_folder(tmp_path / "train", classes=("a", "b", "c"), per_class=2)
    make_folder(tmp_path / "val", classes=("b", "c"), per_class=1, seed=1)  # val lacks class "a"
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=32, batch_size=8, num_workers=0, random_flip=False)
    assert dm.num_classes == 3
    dm.setup("fit")
    _, y = next(iter(dm.val_dataloader()))
    assert sorted(y.tolist()) == [1, 2]  # labels follow the training classes, not the val folder's own order


def test_image_folder_empty_or_missing_root_shows_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*<root>/<class>/<image>"):
        ImageFolderDataModule(root=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"no class folders.*<root>/<class>/<image>"):
        ImageFolderDataModule(root=str(tmp_path))
    (tmp_path / "cat").mkdir()
    with pytest.raises(FileNotFoundError, match=r"without images: \['cat'\]"):
        ImageFolderDataModule(root=str(tmp_path))


def test_toy_mixture_module():
    dm = ToyMixtureDataModule(dim=3, components=4, num_samples=2000, batch_size=64)
    assert (dm.image_size, dm.in_channels, dm.num_classes) == (None, 3, None)
    assert isinstance(dm.mixture, GaussianMixture) and dm.mixture.dim == 3
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3) and x.dtype == torch.float32 and y.dtype == torch.long
    xs, ys = dm.train_set.tensors
    # Each point lies near the mean of the component it is labelled with (std 0.15 around radius-2 means).
    assert (xs - dm.mixture.means[ys].float()).norm(dim=1).max() < 1.0
    torch.testing.assert_close(torch.bincount(ys, minlength=4).float() / len(ys), dm.mixture.weights.float(),
                               atol=0.03, rtol=0)
    again = ToyMixtureDataModule(dim=3, components=4, num_samples=2000)
    again.setup()
    assert torch.equal(again.train_set.tensors[0], xs)


def test_fid_reference_is_the_training_set_without_random_flips(tmp_path):
    """reference_images reads reference_set(): the training images unflipped (published FID references are),
    the same with any number of loader workers — the training loader flips about half of them."""
    from specflow.metrics import reference_images

    make_folder(tmp_path / "data", per_class=8)
    dm = ImageFolderDataModule(root=str(tmp_path / "data"), image_size=32, batch_size=16, num_workers=0)
    dm.setup("fit")
    plain = ImageFolderDataModule(root=str(tmp_path / "data"), image_size=32, random_flip=False)
    plain.setup("fit")
    unflipped = torch.stack([plain.train_set[i][0] for i in range(16)])
    idx = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    for workers in (0, 2):
        assert torch.equal(reference_images(dm, 16, seed=3, num_workers=workers), unflipped[idx])
    torch.manual_seed(0)
    trained = torch.stack([dm.train_set[i][0] for i in range(16)])  # the control: training transforms flip
    assert not torch.equal(trained, unflipped) and torch.equal(trained.flip(-1)[~(trained == unflipped).all((1, 2, 3))],
                                                               unflipped[~(trained == unflipped).all((1, 2, 3))])
