"""Velocity nets: shapes, the features/output split, zero-init output, CFG null class, gradients, bad input."""
import pytest
import torch

from specflow.nets import DiT, MLP, UNet, build_net, count_params


def tiny(arch: str, size: int = 16, channels: int = 1, num_classes: int | None = None):
    if arch == "unet":
        mult = (1, 2) if size <= 16 else (1, 2, 2)
        return UNet(image_size=size, in_channels=channels, model_channels=16, channel_mult=mult, num_res_blocks=1,
                    attention_resolutions=(size // 2,), num_heads=2, num_classes=num_classes)
    if arch == "dit":
        return DiT(image_size=size, in_channels=channels, patch_size=2 if size <= 16 else 4, hidden_size=32,
                   depth=2, num_heads=2, num_classes=num_classes)
    return MLP(dim=channels, hidden=32, depth=3, num_classes=num_classes)


def inputs(net, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, net.in_channels) if net.image_size is None else (batch, net.in_channels, net.image_size, net.image_size)
    return torch.randn(shape, generator=g), torch.rand(batch, generator=g)


def perturb(net, scale: float = 0.1, seed: int = 1):
    """Randomise every parameter so that zero-initialised layers stop hiding the rest of the net."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


CASES = [(a, s, c, k) for a in ("unet", "dit") for s in (8, 16, 32) for c in (1, 3) for k in (None, 10)]


@pytest.mark.parametrize("arch,size,channels,num_classes", CASES + [("mlp", None, 2, None), ("mlp", None, 5, 4)])
def test_shapes_split_and_zero_init(arch, size, channels, num_classes):
    net = tiny(arch, size, channels, num_classes)
    x, t = inputs(net)
    cond = None if num_classes is None else torch.tensor([0, 3, num_classes])  # last row: explicit null class
    v = net(x, t, cond)
    assert v.shape == x.shape
    assert torch.equal(v, torch.zeros_like(v)), "zero-initialised output layer must give v = 0 at init"
    perturb(net)
    h = net.features(x, t, cond)
    assert h.shape[0] == 3 and net.feature_channels in h.shape
    v = net(x, t, cond)
    assert v.abs().max() > 0
    torch.testing.assert_close(v, net.output(h))
    torch.testing.assert_close(net(x, 0.5, cond), net(x, torch.full((3,), 0.5), cond))  # scalar t = broadcast t


@pytest.mark.parametrize("arch", ["unet", "dit", "mlp"])
def test_null_class_and_conditioning(arch):
    net = perturb(tiny(arch, 16, 1 if arch != "mlp" else 2, num_classes=10))
    x, t = inputs(net, batch=2)
    null, real = net(x, t, None), net(x, t, torch.tensor([3, 3]))
    assert (null - real).abs().max() > 1e-4, "the null class must differ from a real class"
    torch.testing.assert_close(null, net(x, t, torch.tensor([10, 10])))  # None ≡ index num_classes
    assert (net(x, t, torch.tensor([3, 3])) - net(x, t, torch.tensor([4, 4]))).abs().max() > 1e-4
    # Unconditional nets ignore cond entirely.
    plain = perturb(tiny(arch, 16, 1 if arch != "mlp" else 2))
    torch.testing.assert_close(plain(x, t, None), plain(x, t, torch.tensor([3, 4])))
    # The time input matters.
    assert (net(x, t) - net(x, t * 0.5)).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["unet", "dit", "mlp"])
def test_gradient_reaches_every_parameter(arch):
    net = perturb(tiny(arch, 8, 1 if arch != "mlp" else 2, num_classes=10))
    x, t = inputs(net, batch=4)
    cond = torch.tensor([0, 1, 2, 10])
    net(x, t, cond).pow(2).mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, f"no gradient reaches {name}"


def test_zero_init_still_trains_output_layer():
    net = tiny("unet", 8)
    x, t = inputs(net)
    (net(x, t) - x).pow(2).mean().backward()  # at init v = 0, yet the output layer must still learn
    assert net.conv_out.weight.grad.abs().max() > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(image_size=10, channel_mult=(1, 2, 2)), r"image_size=10: it must be a multiple of 4 .* one of \[8, 12, 16"),
    (dict(image_size=4), r"image_size=4"),
    (dict(image_size=128), r"image_size=128.*\[8, 64\]"),
    (dict(image_size=20, channel_mult=(1, 2, 2, 2)), r"multiple of 8.*one of \[8, 16, 24"),
])
def test_unet_bad_image_size(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)


def test_unet_size_limit_can_be_lifted():
    net = UNet(image_size=128, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
               num_heads=1, max_image_size=128)
    assert net.image_size == 128


def test_dit_bad_image_size():
    with pytest.raises(ValueError, match=r"image_size=30.*patch_size=4"):
        DiT(image_size=30, patch_size=4, hidden_size=32, depth=1, num_heads=2)


@pytest.mark.parametrize("arch,bad", [
    ("unet", (2, 1, 8, 8)), ("unet", (2, 3, 16, 16)), ("unet", (1, 16, 16)),
    ("dit", (2, 3, 16, 16)), ("dit", (2, 1, 32, 32)), ("mlp", (2, 3)), ("mlp", (2, 2, 1)),
])
def test_wrong_input_shape(arch, bad):
    net = tiny(arch, 16, 1 if arch != "mlp" else 2)
    with pytest.raises(ValueError, match=r"expects x shaped .* got " + str(bad).replace("(", r"\(").replace(")", r"\)")):
        net(torch.zeros(bad), torch.rand(bad[0]))


def test_bad_t_and_cond():
    net = tiny("unet", 8, num_classes=10)
    x, _ = inputs(net, batch=2)
    with pytest.raises(ValueError, match=r"t must be a scalar or shaped \(2,\)"):
        net(x, torch.rand(3))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\]"):
        net(x, torch.rand(2), torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="integer class labels"):
        net(x, torch.rand(2), torch.tensor([0.0, 1.0]))


def test_build_net_and_count_params():
    net = build_net("unet", image_size=8, model_channels=16, num_heads=2)
    assert isinstance(net, UNet) and count_params(net) == sum(p.numel() for p in net.parameters())
    assert isinstance(build_net("mlp", dim=3), MLP)
    with pytest.raises(ValueError, match=r"unknown arch 'vit'.*\['dit', 'mlp', 'unet'\]"):
        build_net("vit")
