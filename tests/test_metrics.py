"""FID/KID and the offline FID-proxy extractor: known answers, a classifier that works, and controls that the
metric tells a corrupted sample set from a real one."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.linalg
import torch

from specflow import metrics
from specflow.data import DigitsDataModule
from specflow.metrics import (bootstrap_fid, bootstrap_fid_difference, build_feature_extractor, classifier_features,
                              extract_features, fid_from_features, inception_weights, kid_from_features)


@pytest.fixture(scope="module")
def digits_features(tmp_path_factory):
    """A classifier trained on the digits (cached to a file), and the features of all 1797 digits."""
    cache = tmp_path_factory.mktemp("cnn") / "digits_cnn.pt"
    dm = DigitsDataModule(batch_size=128)
    ex = classifier_features(dm, cache=cache, steps=300)
    x, _ = dm.images()
    return ex, cache, x, extract_features(ex, x)


def test_classifier_is_accurate_and_its_cache_reloads_identically(digits_features):
    ex, cache, x, feats = digits_features
    assert ex.val_accuracy > 0.95, ex.description
    assert ex.fid_name == "fid_proxy" and "FID-proxy" in ex.description  # named honestly
    assert cache.is_file()
    again = classifier_features(DigitsDataModule(), cache=cache, steps=300)  # loads, does not retrain
    assert "loaded from" in again.description
    assert torch.equal(extract_features(again, x), feats)
    bad = DigitsDataModule()
    bad.num_classes = 7  # another data set than the one the cache was trained on: a clear error
    with pytest.raises(ValueError, match="cached FID-proxy classifier"):
        classifier_features(bad, cache=cache, steps=300)
    with pytest.raises(ValueError, match="not comparable"):  # another training budget: other features
        classifier_features(DigitsDataModule(), cache=cache, steps=600)


def test_fid_matches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g, dtype=torch.float64)
    b = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.diag(torch.linspace(0.5, 2, 6, dtype=torch.float64)) + 0.3
    mu1, mu2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert fid_from_features(a, b) == pytest.approx(want, rel=1e-6)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8)


def test_kid_is_seeded_and_leaves_the_global_rng_alone():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g) + 0.5
    state = torch.get_rng_state()
    assert kid_from_features(a, b, seed=3) == kid_from_features(a, b, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    near, _ = kid_from_features(a, torch.randn(300, 8, generator=g))
    far, std = kid_from_features(a, b)
    assert far > near + 3 * std > 0


def test_fid_proxy_tells_real_from_corrupted_digits(digits_features):
    """Two disjoint halves of the real digits are equal within the bootstrap interval; blurred digits (a
    mild, realistic failure: 30 % of a 3×3 box blur) are clearly worse — the control that the metric can tell."""
    ex, _, x, feats = digits_features
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    ref, real, other = perm[:797], perm[797:1297], perm[1297:]  # 797 / 500 / 500 digits
    blurred = 0.7 * x + 0.3 * torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    blur = extract_features(ex, blurred)[real]  # a slightly soft copy of the same 500 digits: FID-proxy +25
    same = bootstrap_fid_difference(feats[ref], feats[real], feats[other], n_boot=100)
    assert same.low < 0 < same.high, same
    worse = bootstrap_fid_difference(feats[ref], blur, feats[real], n_boot=100)
    assert worse.low > 0, worse
    est = bootstrap_fid(feats[ref], feats[real], n_boot=100)
    assert est.low <= est.value <= est.high and est.value < fid_from_features(feats[ref], blur)


def test_inception_is_only_used_when_its_weights_are_on_disk(tmp_path, monkeypatch, digits_features):
    _, cache, _, _ = digits_features
    if importlib.util.find_spec("torch_fidelity") is None:
        assert inception_weights() is None
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # an empty hub: no weights
    assert inception_weights() is None
    with pytest.raises(FileNotFoundError, match="no download is attempted.*fid_proxy"):
        build_feature_extractor("inception")
    auto = build_feature_extractor("auto", DigitsDataModule(), cache=cache, steps=300)  # falls back, offline
    assert auto.fid_name == "fid_proxy"
    # With torch-fidelity importable and the weights file in place, the local file is what gets used.
    weights = tmp_path / "hub" / "checkpoints" / metrics.INCEPTION_FILE
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "torch_fidelity" else real_find_spec(name, *a))
    assert inception_weights() == weights
    assert inception_weights(tmp_path / "elsewhere.pth") is None


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="same d"):
        fid_from_features(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="at least 2"):
        fid_from_features(torch.randn(10, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="same size"):
        bootstrap_fid_difference(torch.randn(10, 3), torch.randn(10, 3), torch.randn(9, 3))
    with pytest.raises(ValueError, match="'auto', 'inception' or 'classifier'"):
        build_feature_extractor("vgg")
    from specflow.data import ToyMixtureDataModule

    with pytest.raises(ValueError, match="labelled image data module"):
        classifier_features(ToyMixtureDataModule())
