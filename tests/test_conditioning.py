"""One rule for labels and conditions (fastgen.nn.conditioning, fastgen.sample): a conditional model or layer
needs its labels on every call (loss, log_prob, forward, sample), an unconditional one refuses them, and
fastgen.sample refuses a condition for a network that takes none. Every model class of fastgen.models that
takes num_classes is covered by being listed in CONDITIONAL (the test below fails for one that is not)."""
import inspect

import pytest
import torch
from torch import nn

import fastgen
import fastgen.models
from fastgen import GatedMaskedConv2d, MaskedConv2d
from fastgen.models import DCGANDiscriminator, DCGANGenerator, GatedPixelCNN, PixelCNN, PixelCNNpp

CONDITIONAL = {
    PixelCNN: lambda k: PixelCNN((1, 4, 4), channels=4, blocks=1, num_classes=k),
    GatedPixelCNN: lambda k: GatedPixelCNN((1, 4, 4), channels=4, layers=2, first_kernel=3, num_classes=k),
    PixelCNNpp: lambda k: PixelCNNpp((1, 4, 4), nr_resnet=1, nr_filters=4, nr_logistic_mix=2, dropout=0.0,
                                     num_classes=k),
}


# the GAN models (no likelihood): (build(num_classes), its calls given a label or None)
GAN_CONDITIONAL = {
    DCGANGenerator: (lambda k: DCGANGenerator(8, (1, 8, 8), num_classes=k, width=4),
                     [lambda m, label: m(torch.randn(2, 8), label), lambda m, label: m.sample(2, label)]),
    DCGANDiscriminator: (lambda k: DCGANDiscriminator((1, 8, 8), num_classes=k, width=4),
                         [lambda m, label: m(torch.randn(2, 1, 8, 8), label)]),
}


def test_every_conditional_model_is_covered():
    takes_classes = {cls for name in fastgen.models.__all__ for cls in [getattr(fastgen.models, name)]
                     if isinstance(cls, type) and "num_classes" in inspect.signature(cls).parameters
                     and not inspect.isabstract(cls) and cls is not fastgen.models.AutoregressiveImageModel}
    covered = set(CONDITIONAL) | set(GAN_CONDITIONAL)
    assert takes_classes <= covered, f"add {takes_classes - covered} to CONDITIONAL or GAN_CONDITIONAL"


@pytest.mark.parametrize("cls", list(GAN_CONDITIONAL), ids=lambda c: c.__name__)
def test_a_gan_model_needs_its_labels_or_refuses_them(cls):
    build, calls = GAN_CONDITIONAL[cls]
    conditional, plain = build(3), build(None)
    for call in calls:
        with pytest.raises(ValueError, match=r"class-conditional \(num_classes=3\): pass label"):
            call(conditional, None)
        with pytest.raises(ValueError, match=r"labels must be in 0..2"):
            call(conditional, torch.tensor([0, 3]))
        assert torch.isfinite(call(conditional, torch.tensor([0, 2])).float()).all()
        with pytest.raises(ValueError, match="a label was given but it is not class-conditional"):
            call(plain, torch.tensor([0, 1]))


def images_of(model, n=2):
    return torch.randint(model.levels, (n, *model.image_shape))


@pytest.mark.parametrize("cls", list(CONDITIONAL), ids=lambda c: c.__name__)
def test_a_conditional_model_needs_its_labels(cls):
    model = CONDITIONAL[cls](3)
    x = images_of(model)
    for call in (lambda: model.loss(x), lambda: model.log_prob(x), lambda: model(model.feed(x)),
                 lambda: model.sample(2), lambda: model.sample(2, method="naive"),
                 lambda: fastgen.sample(model, 2)):
        with pytest.raises(ValueError, match=r"class-conditional \(num_classes=3\): pass label"):
            call()
    label = torch.tensor([0, 2])
    assert torch.isfinite(model.loss(x, label))
    assert model.sample(2, label).shape == (2, *model.image_shape)
    with pytest.raises(ValueError, match=r"labels must be in 0..2"):
        model.loss(x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"label must be an integer tensor of shape \(2,\)"):
        model.loss(x, torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("cls", list(CONDITIONAL), ids=lambda c: c.__name__)
def test_an_unconditional_model_refuses_labels(cls):
    model = CONDITIONAL[cls](None)
    x = images_of(model)
    label = torch.tensor([0, 1])
    for call in (lambda: model.loss(x, label), lambda: model.sample(2, label), lambda: fastgen.sample(model, 2,
                                                                                                      condition=label)):
        with pytest.raises(ValueError, match="a label was given but it is not class-conditional"):
            call()


def test_a_conditional_layer_needs_its_labels_and_maps():
    layer = GatedMaskedConv2d(1, 4, 3, "A", num_classes=10)
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"GatedMaskedConv2d: it is class-conditional \(num_classes=10\)"):
        layer(x)
    layer(x, label=torch.tensor([1, 9]))
    with pytest.raises(ValueError, match="a label was given but it is not class-conditional"):
        GatedMaskedConv2d(1, 4, 3, "A")(x, label=torch.tensor([1, 9]))
    mapped = GatedMaskedConv2d(1, 4, 3, "A", cond_channels=2)
    with pytest.raises(ValueError, match=r"takes a conditioning map \(cond_channels=2\)"):
        mapped(x)
    with pytest.raises(ValueError, match=r"cond must be a floating tensor of shape \[2, 2, 4, 4\]"):
        mapped(x, cond=torch.randn(2, 3, 4, 4))
    mapped(x, cond=torch.randn(2, 2, 4, 4))


class TakesNoCondition(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = MaskedConv2d(1, 1, 3, padding=1, mask_type="A")

    def forward(self, x):
        return self.conv(x)


class NeedsCondition(TakesNoCondition):
    def forward(self, x, shift):
        return self.conv(x) + shift[:, None, None, None]


@pytest.mark.parametrize("method", ["cached", "naive"])
def test_sample_condition_rule_for_other_networks(method):
    with pytest.raises(ValueError, match="condition= was given but TakesNoCondition.forward takes only the image"):
        fastgen.sample(TakesNoCondition(), 2, shape=(1, 4, 4), condition=torch.zeros(2), method=method)
    with pytest.raises(ValueError, match=r"NeedsCondition.forward needs a second argument \('shift'\): pass it as "
                                         r"condition="):
        fastgen.sample(NeedsCondition(), 2, shape=(1, 4, 4), method=method)
    out = fastgen.sample(NeedsCondition(), 2, shape=(1, 4, 4), condition=torch.tensor([-9.0, 9.0]), method=method,
                         seed=0)
    assert out[0].sum() < out[1].sum()  # the condition reached the network
