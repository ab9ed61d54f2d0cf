"""Sampling with the network under autocast (specflow.precision) while the sampler stays in float32."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from specflow.nets import build_net
from specflow.precision import Autocast, autocast
from specflow.sampling import build_sampler


class Probe(nn.Module):
    """Records the autocast state its forward and trunk see; v = −x (a contraction), with a bf16-visible matmul."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3, bias=False)
        nn.init.eye_(self.lin.weight)
        self.in_channels, self.num_classes, self.seen = 3, None, []

    def features(self, x, t, cond=None):
        self.seen.append(("features", torch.is_autocast_enabled("cpu"), self.lin(x).dtype))
        return self.lin(x)

    def output(self, h):
        self.seen.append(("output", torch.is_autocast_enabled("cpu"), h.dtype))
        return -h

    def forward(self, x, t, cond=None):
        self.seen.append(("forward", torch.is_autocast_enabled("cpu"), self.lin(x).dtype))
        return -self.lin(x)


def test_full_precision_is_the_net_itself_and_bad_names_list_the_valid_ones():
    net = Probe()
    assert autocast(net, "32") is net and autocast(net, 32) is net  # Lightning writes precision as an int
    assert autocast(net, 16).dtype == torch.float16
    with pytest.raises(ValueError, match="valid: 32, bf16, 16"):
        autocast(net, "fp8")


def test_the_net_runs_under_autocast_and_the_sampler_in_float32():
    net = Probe()
    x0 = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    full = build_sampler("heun", steps=8).sample(net, x0).samples
    wrapped = autocast(net, "bf16")
    res = build_sampler("heun", steps=8).sample(wrapped, x0)
    assert res.samples.dtype == torch.float32
    assert wrapped(x0, torch.zeros(16)).dtype == torch.float32  # cast back: guidance mixes in float32
    assert net.seen[0] == ("forward", False, torch.float32)  # the plain run
    assert wrapped.fast.seen[-1] == ("forward", True, torch.bfloat16)  # calls reach the low-precision copy
    err = (res.samples - full).abs().max().item()
    assert 0 < err < 0.05  # bf16 rounding, and only that


def test_a_trunk_passes_through_for_medusa_and_a_plain_callable_keeps_its_clear_error():
    net = Probe()
    wrapped = autocast(net, "bf16")
    assert wrapped.in_channels == 3 and wrapped.num_classes is None  # attributes pass through
    h = wrapped.features(torch.ones(2, 3), torch.zeros(2))
    assert h.dtype == torch.bfloat16 and wrapped.output(h).shape == (2, 3)
    assert [s[:2] for s in wrapped.fast.seen] == [("features", True), ("output", True)]
    plain = Autocast(lambda x, t: -x, torch.bfloat16)
    assert getattr(plain, "features", None) is None  # the sampler's "needs a trunk" check still sees none
    with pytest.raises(ValueError, match="must expose features"):
        build_sampler("speculative", steps=4, drafter="medusa").sample(plain, torch.randn(2, 3), draft=Probe())


def test_moving_the_wrapper_keeps_it_wrapped():
    net = Probe().train()
    wrapped = autocast(net, "bf16")
    assert wrapped.to("meta") is wrapped  # not the inner copy: autocast stays on
    assert all(p.device.type == "meta" for m in (net, wrapped.fast) for p in m.parameters())  # both nets moved
    assert wrapped.fast.lin.weight.dtype == torch.bfloat16  # the pre-cast weights survive a device move
    wrapped = autocast(Probe().train(), "bf16")
    assert wrapped.cpu() is wrapped and wrapped.eval() is wrapped
    assert not wrapped.fast.training and not wrapped.net.training
    wrapped(torch.ones(2, 3), torch.zeros(2))
    assert wrapped.fast.seen[-1] == ("forward", True, torch.bfloat16)
    with pytest.raises(ValueError, match="wrap the net again"):
        wrapped.to(torch.float64)


def test_module_methods_return_the_wrapper_and_dtype_changes_are_refused():
    """.train/.cpu/.cuda/.requires_grad_ returned the inner low-precision copy (through __getattr__), silently
    dropping autocast; .float/.half/... would undo the pre-cast weights."""
    net = Probe().eval()
    wrapped = autocast(net, "bf16")
    assert wrapped.train() is wrapped and wrapped.fast.training and net.training  # both nets
    assert wrapped.train(False) is wrapped and not wrapped.fast.training and not net.training
    assert wrapped.cpu() is wrapped and wrapped.requires_grad_(False) is wrapped
    assert not any(p.requires_grad for m in (net, wrapped.fast) for p in m.parameters())
    if torch.cuda.is_available():
        assert wrapped.cuda() is wrapped and wrapped.fast.lin.weight.is_cuda and net.lin.weight.is_cuda
        wrapped.cpu()
    assert wrapped(torch.ones(2, 3), torch.zeros(2)).dtype == torch.float32
    assert wrapped.fast.seen[-1] == ("forward", True, torch.bfloat16)  # still under autocast
    for cast in (lambda w: w.float(), lambda w: w.half(), lambda w: w.double(), lambda w: w.bfloat16(),
                 lambda w: w.type(torch.float64)):
        with pytest.raises(ValueError, match="wrap the net again"):
            cast(wrapped)
    assert wrapped.fast.lin.weight.dtype == torch.bfloat16 and net.lin.weight.dtype == torch.float32
    seen = []
    assert wrapped.apply(lambda m: seen.append(m)) is wrapped and net in seen and wrapped.fast in seen
    assert wrapped.share_memory() is wrapped and wrapped.to(memory_format=torch.channels_last) is wrapped
    assert wrapped.forward(torch.ones(2, 3), torch.zeros(2)).dtype == torch.float32  # under autocast, as a call
    assert wrapped.fast.seen[-1] == ("forward", True, torch.bfloat16)
    assert wrapped.to_empty(device="meta") is wrapped and net.lin.weight.is_meta and wrapped.fast.lin.weight.is_meta


class _Casts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.casts += func is torch.ops.aten._to_copy.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
@pytest.mark.parametrize("arch,kwargs,shape", [
    ("unet", dict(image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2), num_classes=10), (4, 1, 8, 8)),
    ("dit", dict(image_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10),
     (4, 3, 8, 8))])
def test_pre_cast_weights_give_autocast_bit_for_bit_without_casting_them_each_call(arch, kwargs, shape, device):
    torch.manual_seed(0)
    net = build_net(arch, **kwargs).eval().to(device)
    for p in net.parameters():
        nn.init.normal_(p, std=0.1)
        p.requires_grad_(False)  # as load_target leaves them: autocast caches no casts of frozen weights
    x, t = torch.randn(shape, device=device), torch.rand(shape[0], device=device)
    y = torch.arange(shape[0], device=device)
    wrapped = autocast(net, "bf16")  # casts the Linear/Conv weights once, here
    with torch.no_grad():
        plain, fast = _Casts(), _Casts()
        with plain, torch.autocast(device, dtype=torch.bfloat16):
            ref = net(x, t, y).float()
        with fast:
            got = wrapped(x, t, y)
    assert torch.equal(got, ref)
    assert fast.casts < plain.casts / 2, (fast.casts, plain.casts)  # the weights are no longer cast per call
    assert all(p.dtype == torch.float32 for p in net.parameters())  # the caller's net is left as it was
