"""Data: image DataModules (digits, Fashion-MNIST, CIFAR-10, ImageFolder) and the analytic Gaussian mixture for tests/benchmarks.

Imports are lazy so that ``from specflow.data.toy import GaussianMixture`` stays free of Lightning.
"""
from importlib import import_module

_WHERE = {"CIFAR10DataModule": "images", "DigitsDataModule": "images",
          "FashionMNISTDataModule": "fashion", "ImageFolderDataModule": "images",
          "GaussianMixture": "toy", "ToyMixtureDataModule": "toy_module"}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(import_module(f"specflow.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
