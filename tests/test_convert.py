"""fastgen.convert: other projects' PixelCNNs on fastgen's layers. The peer layers below are written here from
the public descriptions of those projects' code (a mask buffer applied with ``weight.data *= mask`` before
``super().forward``, as jzbontar/pixelcnn-pytorch and pytorch-generative do; ``F.conv2d(x, weight * mask)``; a
[1, 1, kh, kw] mask; colour blocks), not copied from them."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastgen
from fastgen import BatchNormAct2d, ConvertError, MaskedConv2d


def _spatial_mask(kh, kw, mask_type):
    m = torch.ones(kh, kw)
    m[kh // 2, kw // 2 + (mask_type == "B"):] = 0
    m[kh // 2 + 1:] = 0
    return m


class InPlaceMasked(nn.Conv2d):
    """A mask buffer of the weight's shape, applied to weight.data before every call."""

    def __init__(self, mask_type, *args, **kwargs):
        super().__init__(*args, **kwargs)
        kh, kw = self.kernel_size
        self.register_buffer("mask", _spatial_mask(kh, kw, mask_type).expand_as(self.weight).clone())

    def forward(self, x):
        self.weight.data *= self.mask
        return super().forward(x)


class ProductMasked(nn.Conv2d):
    """F.conv2d of weight * mask, the mask a [1, 1, kh, kw] buffer."""

    def __init__(self, mask_type, *args, **kwargs):
        super().__init__(*args, **kwargs)
        kh, kw = self.kernel_size
        self.register_buffer("mask", _spatial_mask(kh, kw, mask_type)[None, None].clone())

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding)


class ColourMasked(nn.Conv2d):
    """Colour blocks (van den Oord): channels in 3 contiguous blocks, block g seeing input blocks < g (A) or
    <= g (B) at the centre; the mask a plain tensor attribute."""

    def __init__(self, mask_type, cin, cout, k, **kwargs):
        super().__init__(cin, cout, k, padding=k // 2, **kwargs)
        m = _spatial_mask(k, k, "A").expand(cout, cin, k, k).clone()
        og, ig = torch.arange(cout) // (cout // 3), torch.arange(cin) // (cin // 3)
        m[:, :, k // 2, k // 2] = (ig[None] < og[:, None]) | ((ig[None] == og[:, None]) & (mask_type == "B"))
        self.mask = m

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding)


def peer_pixelcnn(layer=InPlaceMasked, c=8, blocks=3, colours=1, levels=4):
    """jzbontar's shape, small: mask A, then mask-B convolutions each with BatchNorm and ReLU, a 1x1 head."""
    def conv(t, cin, cout, k):
        if layer is ColourMasked:
            return ColourMasked(t, cin, cout, k)
        return layer(t, cin, cout, k, padding=k // 2, bias=False)
    mods = [conv("A", colours, c, 5), nn.BatchNorm2d(c), nn.ReLU(True)]
    for _ in range(blocks):
        mods += [conv("B", c, c, 3), nn.BatchNorm2d(c), nn.ReLU(True)]
    head = conv("B", c, colours * levels, 1) if layer is ColourMasked else nn.Conv2d(c, colours * levels, 1)
    return nn.Sequential(*mods, head)


def _spread(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    return model


def _outcome(model, x):
    x = x.clone().requires_grad_()
    y = model(x)
    y.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("layer", [InPlaceMasked, ProductMasked, ColourMasked])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_outputs_and_gradients_are_unchanged(layer, mode):
    colours = 3 if layer is ColourMasked else 1
    peer = _spread(peer_pixelcnn(layer, colours=colours, c=6 if colours == 3 else 8)).double()
    peer.train(mode == "train")
    x = torch.randn(3, colours, 7, 8, dtype=torch.float64)
    before = copy.deepcopy(peer)
    want = _outcome(before, x)
    params = [id(p) for p in peer.parameters()]
    model, lines = fastgen.convert(peer, report=True)
    assert model is peer and [id(p) for p in peer.parameters()] == params  # the same tensor objects
    kinds = [type(m) for m in peer]
    assert kinds.count(MaskedConv2d) == (5 if layer is ColourMasked else 4)
    assert kinds.count(BatchNormAct2d) == 4 and kinds.count(nn.Identity) == 4
    assert peer[0].mask_type == "A" and peer[3].mask_type == "B" and peer[0].data_channels == colours
    assert all(m.training == (mode == "train") for m in peer.modules())
    assert len(lines) == len([m for m in peer if isinstance(m, (MaskedConv2d, BatchNormAct2d))])
    got = _outcome(peer, x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)
    for name, g in want[2].items():
        m = dict(before.named_modules()).get(name.rsplit(".", 1)[0])
        mask = getattr(m, "mask", None)  # the in-place peer's gradient at a hidden tap is never used
        if name.endswith("weight") and isinstance(mask, torch.Tensor) and mask.shape[2:] == g.shape[2:]:
            g = g * mask
        torch.testing.assert_close(got[2][name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_a_checkpoint_from_before_loads_and_an_optimizer_from_before_trains():
    torch.manual_seed(1)
    peer = peer_pixelcnn(ProductMasked, levels=2)
    state = copy.deepcopy(peer.state_dict())
    assert any(k.endswith("mask") for k in state)
    opt = torch.optim.Adam(peer.parameters(), lr=1e-2)
    fastgen.convert(peer)
    peer.load_state_dict(state)  # the mask buffers: checked against the layer's own mask, then dropped
    x = (torch.rand(8, 1, 8, 8) < 0.3).float()
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(peer(x), x[:, 0].long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_cached_samples_equal_naive_after_conversion():
    peer = _spread(peer_pixelcnn(InPlaceMasked, levels=4)).double().eval()
    fastgen.convert(peer)
    args = dict(likelihood="categorical", levels=4, shape=(1, 6, 7))
    cached = fastgen.sample(peer, 3, seed=2, **args)
    assert torch.equal(cached, fastgen.sample(peer, 3, seed=2, method="naive", **args))
    assert len(cached.unique()) > 1


def test_nested_shared_and_wrapped_models():
    class Block(nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.conv, self.post = conv, nn.Sequential(nn.BatchNorm2d(4), nn.LeakyReLU(0.1))

        def forward(self, x):
            return self.post(self.conv(x))

    shared = InPlaceMasked("B", 4, 4, 3, padding=1)
    net = nn.Sequential(InPlaceMasked("A", 1, 4, 3, padding=1), Block(shared), Block(shared))
    wrapped = nn.DataParallel(net)  # no GPU: it calls the module
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    net.double().eval()
    want = wrapped(x)
    fastgen.convert(wrapped)
    assert isinstance(net[0], MaskedConv2d) and net[1].conv is net[2].conv and isinstance(net[1].conv, MaskedConv2d)
    assert isinstance(net[1].post[0], BatchNormAct2d) and net[1].post[0].activation == "leaky_relu"
    torch.testing.assert_close(wrapped(x), want, rtol=1e-10, atol=1e-12)


def test_a_ddp_wrapped_model_trains_after_conversion(tmp_path):
    """DistributedDataParallel (gloo, one process): its reducer holds the same Parameters, so the converted model
    trains under it and its gradients are the unconverted model's."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(2)
        net = peer_pixelcnn(ProductMasked, c=4, blocks=1, levels=2).double()
        twin = copy.deepcopy(net)
        ddp = nn.parallel.DistributedDataParallel(net)
        fastgen.convert(ddp)
        assert isinstance(net[0], MaskedConv2d) and isinstance(net[1], BatchNormAct2d)
        x = (torch.rand(4, 1, 6, 6, dtype=torch.float64) < 0.5).double()
        for m in (ddp, twin):
            F.cross_entropy(m(x), x[:, 0].long()).backward()
        for (name, p), q in zip(net.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    finally:
        dist.destroy_process_group()


def test_a_shared_batch_norm_is_fused_only_where_its_activation_follows():
    bn = nn.BatchNorm2d(3)
    net = nn.Sequential(nn.Sequential(bn, nn.ReLU()), nn.Sequential(bn, nn.Tanh()))
    fastgen.convert(net)
    assert isinstance(net[0][0], BatchNormAct2d) and type(net[1][0]) is nn.BatchNorm2d
    assert net[0][0].running_mean is net[1][0].running_mean  # the same statistics


def test_everything_else_is_left_alone():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.BatchNorm2d(4),
                        nn.LeakyReLU(-0.1), nn.Conv2d(4, 2, 1))
    kinds = [type(m) for m in net]
    _, lines = fastgen.convert(net, report=True)
    assert [type(m) for m in net] == kinds and lines == []


def test_a_mask_the_forward_does_not_apply_is_not_converted():
    class Unused(nn.Conv2d):  # a mask buffer, but a plain convolution
        def __init__(self):
            super().__init__(1, 2, 3, padding=1)
            self.register_buffer("mask", _spatial_mask(3, 3, "A").expand_as(self.weight).clone())
    net = nn.Sequential(Unused())
    fastgen.convert(net)
    assert type(net[0]) is Unused


@pytest.mark.parametrize("bad, match", [
    ("future", r"layers\.1: its mask is not causal: output channel 0 sees input channel 0 at tap \(\+0, \+1\)"),
    ("interleaved", r"layers\.1: its centre tap's channels follow neither mask A nor mask B"),
    ("unequal", r"layers\.1: .*blocks of unequal sizes"),
    ("stride", r"layers\.1: stride \(2, 2\)"),
])
def test_masks_it_cannot_express_are_refused_with_the_module_path(bad, match):
    conv = ProductMasked("B", 3, 6, 3, padding=1, stride=2 if bad == "stride" else 1)
    if bad == "future":
        conv.mask = torch.ones(1, 1, 3, 3)
    elif bad == "interleaved":  # colour c of channel i is i % 3: not contiguous blocks
        m = _spatial_mask(3, 3, "A").expand(6, 3, 3, 3).clone()
        m[:, :, 1, 1] = (torch.arange(3)[None] <= (torch.arange(6) % 3)[:, None]).float()
        conv.mask = m
    elif bad == "unequal":  # 6 -> 8 channels as C // 3, C // 3 and the rest: output blocks of 2, 2 and 4
        conv = ProductMasked("B", 6, 8, 3, padding=1)
        m = _spatial_mask(3, 3, "A").expand(8, 6, 3, 3).clone()
        og, ig = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2]), torch.arange(6) // 2
        m[:, :, 1, 1] = (ig[None] <= og[:, None]).float()
        conv.mask = m
    net = nn.Module()
    net.layers = nn.ModuleList([nn.Identity(), conv])
    with pytest.raises(ConvertError, match=match):
        fastgen.convert(net)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fastgen.convert(net, strict=False)
    assert type(net.layers[1]) is ProductMasked and "left as it is" in str(w[-1].message)


def test_a_bare_masked_convolution_is_returned_converted():
    conv = InPlaceMasked("A", 1, 3, 3, padding=1)
    new = fastgen.convert(conv)
    assert isinstance(new, MaskedConv2d) and new.weight is conv.weight and new.mask_type == "A"
    with pytest.raises(TypeError, match="must be an nn.Module"):
        fastgen.convert(lambda x: x)
