"""fastgen.models: PixelCNN and GatedPixelCNN likelihoods (normalised, causal),
training on real images, naive sampling, the plain-PyTorch twin, errors."""
import itertools

import pytest
import torch

from fastgen.demo import plain_gated_pixelcnn
from fastgen.models import GatedPixelCNN, PixelCNN

from conftest import mnist_crops


def small(model_cls, shape, likelihood="categorical", levels=3, num_classes=None):
    torch.manual_seed(0)
    if model_cls is PixelCNN:
        m = PixelCNN(shape, channels=2 * shape[0] * 2, blocks=2, likelihood=likelihood, levels=levels,
                     num_classes=num_classes)
    else:
        m = GatedPixelCNN(shape, channels=2 * shape[0], layers=3, likelihood=likelihood, levels=levels,
                          num_classes=num_classes, first_kernel=3)
    m = m.double()
    with torch.no_grad():  # away from the init's symmetric point: the likelihood must depend on the pixels
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


@pytest.mark.parametrize("model_cls", [PixelCNN, GatedPixelCNN])
@pytest.mark.parametrize("shape, likelihood, levels", [((1, 2, 2), "bernoulli", 2), ((1, 1, 3), "categorical", 3),
                                                      ((3, 1, 1), "categorical", 3), ((3, 1, 2), "bernoulli", 2)])
def test_likelihood_sums_to_one(model_cls, shape, likelihood, levels):
    """Summed over every possible image, exp(log_prob) is 1: the model is a
    normalised autoregressive distribution (it fails if any output sees its own
    pixel or a later one)."""
    m = small(model_cls, shape, likelihood, levels, num_classes=2)
    n = shape[0] * shape[1] * shape[2]
    images = torch.tensor(list(itertools.product(range(levels), repeat=n))).view(-1, *shape)
    for label in (0, 1):
        lp = m.log_prob(images, torch.full((len(images),), label))
        assert torch.logsumexp(lp, 0).item() == pytest.approx(0.0, abs=1e-9)
    assert lp.std() > 0.1  # and it is not uniform


@pytest.mark.parametrize("model_cls", [PixelCNN, GatedPixelCNN])
def test_log_prob_is_the_likelihood_of_the_logits(model_cls):
    m = small(model_cls, (1, 4, 5), "bernoulli")
    x = (torch.rand(3, 1, 4, 5) < 0.5).to(torch.uint8)
    logits = m(x.double())
    want = -torch.nn.functional.binary_cross_entropy_with_logits(logits, x.double(), reduction="none").sum((1, 2, 3))
    torch.testing.assert_close(m.log_prob(x), want)
    m = small(model_cls, (3, 2, 3), "categorical", levels=5)
    x = torch.randint(0, 5, (2, 3, 2, 3))
    logits = m(x.double() / 4).view(2, 3, 5, 2, 3)
    want = torch.log_softmax(logits, 2).gather(2, x[:, :, None]).squeeze(2).sum((1, 2, 3))
    torch.testing.assert_close(m.log_prob(x), want)
    nats = -want.mean()
    assert m.bits_per_dim(nats).item() == pytest.approx(nats.item() / (18 * 0.6931471805599453))


@pytest.mark.parametrize("model_cls", [PixelCNN, GatedPixelCNN])
def test_models_overfit_real_images(model_cls):
    images, labels = mnist_crops()
    binary = (images > 127).to(torch.uint8)
    torch.manual_seed(0)
    kwargs = dict(blocks=2) if model_cls is PixelCNN else dict(layers=3)
    m = model_cls((1, 16, 16), channels=32, likelihood="bernoulli", num_classes=10, **kwargs)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = m.loss(binary, labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses[::10]


def test_naive_sampling_is_seeded_and_in_range():
    m = small(GatedPixelCNN, (3, 3, 4), "categorical", levels=4, num_classes=3)
    a = m.sample(3, torch.tensor([0, 1, 2]), seed=7)
    b = m.sample(3, torch.tensor([0, 1, 2]), seed=7)
    c = m.sample(3, torch.tensor([0, 1, 2]), seed=8)
    assert a.shape == (3, 3, 3, 4) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 3
    binary = small(PixelCNN, (1, 3, 3), "bernoulli").sample(4, seed=0)
    assert set(binary.unique().tolist()) <= {0, 1}


def test_sampling_follows_the_model():
    """A 1x1 one-channel image has no context: its samples follow softmax(logits)."""
    m = small(GatedPixelCNN, (1, 1, 1), "categorical", levels=3)
    probs = torch.softmax(m(torch.zeros(1, 1, 1, 1, dtype=torch.float64))[0, :, 0, 0], 0)
    draws = m.sample(4000, seed=1).flatten()
    freq = torch.bincount(draws, minlength=3).double() / len(draws)
    assert (freq - probs).abs().max() < 0.03, (freq, probs)


def test_plain_twin_matches():
    torch.manual_seed(0)
    for dc in (1, 3):
        m = GatedPixelCNN((dc, 5, 6), channels=6, layers=3, likelihood="categorical", levels=4, num_classes=3).double()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        plain = plain_gated_pixelcnn(m)
        x, label = torch.randint(0, 4, (2, dc, 5, 6)), torch.tensor([0, 2])
        torch.testing.assert_close(plain.log_prob(x, label), m.log_prob(x, label))


def test_model_errors():
    m = GatedPixelCNN((1, 6, 6), channels=4, layers=2, likelihood="bernoulli")
    with pytest.raises(ValueError, match=r"images must be \[B, 1, 6, 6\]"):
        m.loss(torch.zeros(2, 1, 5, 6, dtype=torch.uint8))
    with pytest.raises(ValueError, match="pixel values must be in 0..1"):
        m.loss(torch.full((2, 1, 6, 6), 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="integer pixel values"):
        m.loss(torch.full((2, 1, 6, 6), 0.5))
    with pytest.raises(ValueError, match="not class-conditional"):
        m.loss(torch.zeros(2, 1, 6, 6, dtype=torch.uint8), torch.tensor([0, 1]))
    c = PixelCNN((1, 6, 6), channels=4, blocks=1, num_classes=10)
    with pytest.raises(ValueError, match="labels must be in 0..9"):
        c.loss(torch.zeros(2, 1, 6, 6, dtype=torch.uint8), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="likelihood must be one of"):
        PixelCNN(likelihood="gaussian")
    with pytest.raises(ValueError, match="multiple of 2 \\* data_channels"):
        PixelCNN((3, 8, 8), channels=8)
