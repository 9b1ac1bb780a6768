"""The causality check that guards every sampling path (fastgen/sampling/causality.py): a network whose output
at a value sees that value or a later one is refused by every method and likelihood, naming the first such
output; the structural analysis (the cached compilers) and the numerical probe agree."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastgen
from fastgen import GatedMaskedConv2d, MaskedConv2d
from fastgen.sampling import CausalityError, causality, sample
from fastgen.sampling.api import METHODS
from fastgen.sampling.common import feed_table


class Unreadable(nn.Module):
    """``net`` behind an operation the cached compiler cannot read (clamp, far from the values used): the
    check must fall back to the numerical probe."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.clamp(self.net(x), -1e6, 1e6)


def seq(*layers):
    return nn.Sequential(*layers).double()


def first_layer_b():  # the network: the first layer sees the pixel being drawn
    return seq(MaskedConv2d(1, 8, 3, padding=1, mask_type="B"), nn.ReLU(), nn.Conv2d(8, 1, 1))


def first_layer_a():
    return seq(MaskedConv2d(1, 8, 3, padding=1, mask_type="A"), nn.ReLU(), nn.Conv2d(8, 1, 1))


@pytest.mark.parametrize("wrap", [lambda m: m, Unreadable], ids=["structural", "probe"])
@pytest.mark.parametrize("method", METHODS)
def test_a_first_layer_of_mask_b_is_refused_by_every_method(method, wrap):
    with pytest.raises(CausalityError, match=r"output at pixel \(0, 0\) depends on itself"):
        sample(wrap(first_layer_b()), 2, shape=(1, 5, 5), method=method)
    if wrap is Unreadable and method == "cached":  # causal, but the cached compiler cannot read it
        with pytest.raises(fastgen.sampling.CompileError):
            sample(wrap(first_layer_a()), 2, shape=(1, 5, 5), method=method)
    else:
        assert sample(wrap(first_layer_a()), 2, shape=(1, 5, 5), method=method).shape == (2, 1, 5, 5)


@pytest.mark.parametrize("method", METHODS)
def test_a_plain_convolution_network_is_refused(method):
    net = seq(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))
    with pytest.raises(CausalityError, match=r"output at pixel \(0, 0\) depends on pixel \(1, 1\)"):
        sample(net, 1, shape=(1, 4, 4), method=method)


@pytest.mark.parametrize("method", METHODS)
def test_categorical_and_rgb_outputs_are_checked_per_colour(method):
    # mask B in the first layer of an RGB network: colour c sees colour c of its own pixel
    net = seq(MaskedConv2d(3, 6, 3, padding=1, mask_type="B", data_channels=3), nn.ReLU(),
              MaskedConv2d(6, 12, 1, mask_type="B", data_channels=3))
    with pytest.raises(CausalityError, match=r"output at pixel \(0, 0\) colour 0 depends on itself"):
        sample(net, 1, shape=(3, 3, 3), likelihood="categorical", levels=4, method=method)
    # red's output reads green of the same pixel, which is drawn after it
    mix = nn.Conv2d(3, 3, 1, bias=False)
    with torch.no_grad():
        mix.weight.zero_()
        mix.weight[0, 1] = 1.0
    for net in (seq(mix), Unreadable(seq(mix))):
        with pytest.raises(CausalityError, match=r"output at pixel \(0, 0\) colour 0 depends on pixel \(0, 0\) "
                                                 r"colour 1"):
            sample(net, 1, shape=(3, 3, 3), method=method)
    # the same network reading red into green's output is causal
    with torch.no_grad():
        mix.weight.zero_()
        mix.weight[1, 0] = 1.0
    assert sample(seq(mix), 1, shape=(3, 3, 3), method=method).shape == (1, 3, 3, 3)


class Shift(nn.Module):
    """A network whose output at (y, x) reads the input at (y + dy, x + dx) (zero outside)."""

    def __init__(self, dy, dx):
        super().__init__()
        self.dy, self.dx = dy, dx
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x):
        h, w = x.shape[2:]
        padded = F.pad(x, (max(-self.dx, 0), max(self.dx, 0), max(-self.dy, 0), max(self.dy, 0)))
        y0, x0 = max(self.dy, 0), max(self.dx, 0)
        return self.scale * padded[:, :, y0:y0 + h, x0:x0 + w] - 0.5


@pytest.mark.parametrize("dy, dx, causal, named", [
    (0, -1, True, None), (-1, 3, True, None), (-2, 0, True, None),
    (0, 0, False, r"pixel \(0, 0\) depends on itself"),
    (0, 2, False, r"pixel \(0, 0\) depends on pixel \(0, 2\)"),
    (1, -1, False, r"pixel \(0, 1\) depends on pixel \(1, 0\)"),  # (0, 0) reads outside the image
])
def test_the_probe_names_the_first_output_and_what_it_sees(dy, dx, causal, named):
    net = Shift(dy, dx)
    if causal:
        assert sample(net, 1, shape=(1, 4, 4), method="naive").shape == (1, 1, 4, 4)
    else:
        with pytest.raises(CausalityError, match=named):
            sample(net, 1, shape=(1, 4, 4), method="naive")


class GatedNet(nn.Module):
    def __init__(self, first_mask, leak=False):
        super().__init__()
        self.layer = GatedMaskedConv2d(1, 4, 3, first_mask)
        self.head = nn.Conv2d(4, 1, 1)
        self.leak = leak

    def forward(self, x):
        v, h, skip = self.layer(x)
        return self.head(skip + v) if self.leak else self.head(skip)


@pytest.mark.parametrize("make", [
    first_layer_a, first_layer_b,
    lambda: GatedNet("A").double(), lambda: GatedNet("B").double(), lambda: GatedNet("A", leak=True).double(),
    lambda: seq(MaskedConv2d(3, 6, 3, padding=1, mask_type="A", data_channels=3), nn.ReLU(),
                MaskedConv2d(6, 3, 1, mask_type="B", data_channels=3)),
    lambda: seq(MaskedConv2d(3, 6, 3, padding=1, mask_type="A", data_channels=3), nn.ReLU(),
                nn.Conv2d(6, 3, 1)),
], ids=["mask-a", "mask-b", "gated-a", "gated-b", "gated-leak", "rgb-a", "rgb-mixed"])
def test_structural_and_numerical_verdicts_agree(make):
    """The cached compiler's dependence analysis and the probe give the same verdict and name the same
    output (for these networks the same everywhere, so the first is at pixel (0, 0))."""
    torch.manual_seed(0)
    net = make().eval()
    c = net[0].in_channels if isinstance(net, nn.Sequential) else 1
    shape = (c, 4, 4)
    table = feed_table(None, "bernoulli", 2, torch.float64, torch.device("cpu"))
    args = dict(n=2, likelihood="bernoulli", levels=2, shape=shape, condition=None, table=table)
    verdicts = []
    for run in (causality.check, causality.probe):
        try:
            run(net, **args)
            verdicts.append(None)
        except CausalityError as e:
            verdicts.append(str(e).split(",")[0])
    assert verdicts[0] == verdicts[1]


@pytest.mark.parametrize("method", METHODS)
def test_mixture_networks_are_checked_by_both_paths(method):
    conv = nn.Conv2d(1, 3, 3, padding=1).double()
    for net in (conv, Unreadable(conv)):
        with pytest.raises(CausalityError, match=r"output at pixel \(0, 0\) depends on pixel \(1, 1\)"):
            sample(net, 1, shape=(1, 4, 4), likelihood="logistic-mixture", method=method)


def test_teacher_forcing_is_checked_too():
    with pytest.raises(CausalityError):
        fastgen.sampling.cached_logits(first_layer_b(), torch.zeros(1, 1, 4, 4, dtype=torch.long))


# ---- what is not a network of logits (issue 14, item 11) --------------------------------------------------------

def test_a_module_without_parameters_is_checked_not_crashed():
    with pytest.raises(CausalityError, match="depends on itself"):
        sample(nn.Identity(), 1, shape=(1, 4, 4))
    with pytest.raises(CausalityError, match="depends on itself"):
        sample(nn.Identity(), 1, shape=(1, 4, 4), method="naive")


def test_a_function_is_refused_with_a_hint():
    with pytest.raises(TypeError, match="must be a torch.nn.Module.*got function"):
        sample(lambda x: x, 1, shape=(1, 4, 4))


@pytest.mark.parametrize("method", METHODS)
def test_a_bare_gated_layer_is_refused(method):
    with pytest.raises(ValueError, match="returned tuple|output must be one tensor"):
        sample(GatedMaskedConv2d(1, 1, 3, "A"), 1, shape=(1, 4, 4), method=method)


@pytest.mark.parametrize("method", METHODS)
def test_a_bare_masked_layer_samples(method):
    assert sample(MaskedConv2d(1, 1, 3, padding=1, mask_type="A"), 2, shape=(1, 4, 4),
                  method=method).shape == (2, 1, 4, 4)


@pytest.mark.parametrize("method", METHODS)
def test_categorical_logits_without_likelihood_get_a_hint(method):
    net = MaskedConv2d(1, 256, 3, padding=1, mask_type="A")
    with pytest.raises(ValueError, match=r"256 channels.*likelihood='categorical', levels=256"):
        sample(net, 1, shape=(1, 4, 4), method=method)
    assert sample(net, 1, shape=(1, 4, 4), method=method, likelihood="categorical").max() < 256


@pytest.mark.parametrize("seed", [-1, 2 ** 63, 1.5, True])
def test_one_seed_rule(seed):
    net = first_layer_a()
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        sample(net, 1, shape=(1, 4, 4), seed=seed)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
        fastgen.reparameterize_kl(torch.zeros(1, 2), torch.zeros(1, 2), seed=seed)
