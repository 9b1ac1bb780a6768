"""fastgen.models.PixelCNNpp: output layout and likelihood, causality (through
the gradient), class conditioning, overfitting real images, sampling,
clear errors, and `python -m fastgen train pixelcnnpp` (checkpoint, exact
resume, PNG, bits/dim, DDP)."""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastgen
from fastgen.models import PixelCNNpp
from fastgen.train import evaluate, load_model, read_checkpoint, weights_digest

from conftest import assert_cli_error, mnist_crops, run_cli as run, train_metrics


def tiny(shape, nr_resnet=1, filters=4, nr_mix=2, num_classes=None, spread=0.3):
    """A small float64 model in eval mode, its weights moved off the init
    (the class biases start at zero) so that every input and label matters."""
    torch.manual_seed(0)
    m = PixelCNNpp(shape, nr_resnet=nr_resnet, nr_filters=filters, nr_logistic_mix=nr_mix, dropout=0.0,
                   num_classes=num_classes).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * spread)
    return m


# ---- layout and likelihood -------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels, per_mix", [(1, 3), (3, 10)])
def test_output_layout_and_likelihood(channels, per_mix):
    m = tiny((channels, 8, 12), nr_mix=3)
    assert m.out_channels == per_mix * 3
    images = torch.randint(0, 256, (2, channels, 8, 12), dtype=torch.uint8)
    images[0, :, 0, 0], images[1, :, 0, 0] = 0, 255  # both edge bins
    x = m.feed(images)
    assert x.dtype == torch.float64 and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x, images.double() * 2 / 255 - 1)
    params = m(x)
    assert params.shape == (2, per_mix * 3, 8, 12)
    # log_prob is the fused loss on the network's parameters, in fastgen.ref.dmol's layout, per image
    want = -fastgen.discretized_mix_logistic_nll(x, params, nr_mix=3, reduction="sum", backend="ref")
    lp = m.log_prob(images)
    assert lp.shape == (2,)
    torch.testing.assert_close(lp, want)
    nats = m.loss(images)
    torch.testing.assert_close(nats, -lp.mean())
    assert m.bits_per_dim(nats).item() == pytest.approx(nats.item() / (channels * 96 * 0.6931471805599453))


def test_paper_configuration_is_expressible():
    m = PixelCNNpp()  # CIFAR-10: (3, 32, 32), nr_resnet 5, 160 filters, 10 logistics, dropout 0.5
    n = sum(p.numel() for p in m.parameters())
    assert m.out_channels == 100 and 50e6 < n < 56e6  # the paper: "53M parameters"
    assert len(m.down_u[0]) == 5 and len(m.down_u[1]) == len(m.down_u[2]) == 6 and len(m.up_u[0]) == 5


# ---- causality ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels, shape, nr_resnet", [(1, (8, 8), 1), (1, (12, 8), 2), (3, (8, 12), 1),
                                                        (3, (8, 8), 2)])
def test_output_sees_only_earlier_pixels(channels, shape, nr_resnet):
    """The parameters at (i, j) depend on no colour of pixel (i, j) or of any
    later pixel in raster order (the gradient is exactly zero there), and on
    earlier pixels; with two blocks per scale, on every earlier pixel of these
    small images (no blind spot)."""
    h, w = shape
    m = tiny((channels, h, w), nr_resnet=nr_resnet, num_classes=3)
    x = (torch.rand(2, channels, h, w, dtype=torch.float64) * 2 - 1).requires_grad_()
    out = m(x, torch.tensor([1, 2]))
    order = torch.arange(h * w).view(h, w)
    for i in range(h):
        for j in range(w):
            (g,) = torch.autograd.grad(out[0, :, i, j].sum(), x, retain_graph=True)
            assert g[1].abs().sum() == 0  # images of a batch do not mix
            seen = g[0].abs().sum(0) != 0
            earlier = order < i * w + j
            assert not (seen & ~earlier).any(), f"({i}, {j}) sees {(seen & ~earlier).nonzero().tolist()}"
            if nr_resnet == 2:
                assert torch.equal(seen, earlier), f"({i}, {j}) misses {(earlier & ~seen).nonzero().tolist()}"
            elif i * w + j > 0:
                assert seen.any()


def test_first_pixel_parameters_are_constant():
    """Nothing comes before pixel (0, 0): its parameters are the same for every image."""
    m = tiny((3, 4, 4))
    x = torch.rand(5, 3, 4, 4, dtype=torch.float64) * 2 - 1
    out = m(x)[:, :, 0, 0]
    torch.testing.assert_close(out, out[:1].expand_as(out))


# ---- conditioning -----------------------------------------------------------------------------------------------

def test_class_conditioning_changes_the_output():
    m = tiny((1, 8, 8), num_classes=4, spread=0.0)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1
    # the class biases start at zero: a new model begins unconditional
    torch.testing.assert_close(m(x, torch.tensor([0, 0])), m(x, torch.tensor([3, 3])))
    with torch.no_grad():
        for block in m.modules():
            if getattr(block, "label", None) is not None:
                block.label.weight.normal_()
    a, b = m(x, torch.tensor([0, 1])), m(x, torch.tensor([0, 2]))
    torch.testing.assert_close(a[0], b[0])  # the same class, the same output
    assert (a[1] - b[1]).abs().max() > 1e-3
    images = torch.randint(0, 256, (2, 1, 8, 8))
    assert m.log_prob(images, torch.tensor([1, 1]))[0] != m.log_prob(images, torch.tensor([2, 2]))[0]


# ---- training on real images --------------------------------------------------------------------------------------

def test_overfits_real_images():
    images, labels = mnist_crops()
    torch.manual_seed(0)
    m = PixelCNNpp((1, 16, 16), nr_resnet=1, nr_filters=16, nr_logistic_mix=3, dropout=0.0, num_classes=10)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = m.loss(images, labels)
        loss.backward()
        opt.step()
        losses.append(m.bits_per_dim(loss.item()))
    # about 4.7 bits/dim at the start, below 3 after 60 steps
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses[::10]


# ---- sampling ---------------------------------------------------------------------------------------------------

def test_sampling_is_seeded_in_range_and_restores_training_mode():
    m = tiny((3, 4, 8), num_classes=3)
    m.train()
    labels = torch.tensor([0, 1, 2])
    a = m.sample(3, labels, seed=7)
    assert m.training
    b = m.sample(3, labels, seed=7)
    c = m.sample(3, labels, seed=8)
    assert a.shape == (3, 3, 4, 8) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 255 and len(a.unique()) > 10
    torch.manual_seed(1)
    d = m.sample(3, labels)  # no seed: torch's default generator
    torch.manual_seed(1)
    assert torch.equal(d, m.sample(3, labels))


def test_sampling_follows_the_likelihood():
    """Pixel (0, 0) has no context: its draws follow the model's probabilities
    of the 256 levels (the discretized mixture), compared over 8 bins of 32 levels."""
    m = tiny((1, 4, 4), nr_mix=3)
    with torch.no_grad():  # log-scales near -1: each logistic spreads over many levels
        m.out.bias[6:9] -= m.out.bias[6:9] + 1
    draws = m.sample(4000, seed=3)[:, 0, 0, 0]
    params = m(torch.zeros(1, 1, 4, 4, dtype=torch.float64))[:, :, :1, :1].expand(256, -1, -1, -1)
    levels = torch.arange(256, dtype=torch.float64).view(256, 1, 1, 1) * 2 / 255 - 1
    probs = torch.exp(-fastgen.discretized_mix_logistic_nll(levels, params, reduction="none", backend="ref")).flatten()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)
    want = probs.view(8, 32).sum(1)
    freq = torch.bincount(draws // 32, minlength=8).double() / len(draws)
    assert want.max() < 0.8  # not one bin
    assert (freq - want).abs().max() < 0.03, (freq, want)


# ---- errors -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(image_shape=(1, 28, 30)), r"multiples of 4 \(the network down-samples twice by 2\), got 28x30"),
    (dict(image_shape=(1, 2, 4)), r"multiples of 4 .* got 2x4"),
    (dict(image_shape=(2, 8, 8)), "1 or 3 channels"),
    (dict(image_shape=(8, 8)), r"\(channels, height, width\)"),
    (dict(levels=2), "256 pixel levels"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(nr_resnet=0), "nr_resnet must be an int >= 1"),
    (dict(nr_logistic_mix=0), "nr_logistic_mix must be an int >= 1"),
])
def test_constructor_errors(kwargs, match):
    kwargs = {"image_shape": (1, 8, 8), "nr_filters": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        PixelCNNpp(**kwargs)


def test_call_errors():
    m = PixelCNNpp((1, 8, 8), nr_resnet=1, nr_filters=4)
    ok = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"images must be \[B, 1, 8, 8\] \(the model's image_shape\), got "
                                         r"\(2, 1, 8, 12\)"):
        m.loss(torch.zeros(2, 1, 8, 12, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"pixel values must be in 0..255, got 0..300"):
        m.loss(torch.cat([ok.long(), torch.full((1, 1, 8, 8), 300)]))
    with pytest.raises(ValueError, match="integer pixel values 0..255"):
        m.loss(torch.full((2, 1, 8, 8), 0.5))
    with pytest.raises(ValueError, match="not class-conditional"):
        m.loss(ok, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"x must be in \[-1, 1\]"):
        m(torch.full((2, 1, 8, 8), 3.0))
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        m(ok)
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        m.sample(0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        m.sample(2, temperature=0)
    c = PixelCNNpp((1, 8, 8), nr_resnet=1, nr_filters=4, num_classes=10)
    with pytest.raises(ValueError, match=r"class-conditional \(num_classes=10\): pass label"):
        c.loss(ok)
    with pytest.raises(ValueError, match="labels must be in 0..9, got 0..10"):
        c.loss(ok, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"label must be an integer tensor of shape \(3,\)"):
        c.sample(3, torch.tensor([1, 2]))


# ---- the command line ---------------------------------------------------------------------------------------------

TINY = ["--batch", "16", "--filters", "8", "--nr-resnet", "1", "--nr-mix", "2", "--quiet"]


def test_train_writes_checkpoint_png_bits_per_dim_and_resumes_exactly(tmp_path, capsys, digits):
    # backend ref: the loss op's exact spec, so that the two runs can be compared bit for bit
    common = ["train", "pixelcnnpp", "--data", "digits", "--steps", "4", "--log-every", "1", "--backend", "ref"] + TINY
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    code, stdout, err = run(common + ["--samples", "4", "--out", str(straight)], capsys)
    assert code == 0, err
    assert "pixelcnnpp, nr_resnet=1, filters=8, 2-component discretized logistic mixture" in stdout
    assert "bits/dim" in stdout and "test" in stdout
    ckpt = read_checkpoint(str(straight / "checkpoint.pt"))
    assert ckpt["step"] == 4 and ckpt["model_config"]["name"] == "pixelcnnpp"
    assert ckpt["model_config"]["kwargs"] == {"image_shape": [1, 8, 8], "nr_resnet": 1, "nr_filters": 8,
                                              "nr_logistic_mix": 2, "dropout": 0.1, "num_classes": None}
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["finished"] and summary["test_images"] == len(digits)
    assert summary["test_bits_per_dim"] == pytest.approx(summary["test_nats"] / (64 * 0.6931471805599453), abs=1e-4)
    assert 1 < summary["test_bits_per_dim"] < 8.5  # between a good model and a uniform one over 256 levels (8)
    png = (straight / "samples.png").read_bytes()  # 4 images of 8x8, 2 per row, 2 px padding -> 22 x 22
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (22, 22)

    # load_model rebuilds it from the checkpoint alone: the same test NLL
    model = load_model(str(straight))
    assert isinstance(model, PixelCNNpp)
    nats, n = evaluate(model, digits, 16, device=torch.device("cpu"))
    assert n == len(digits) and nats == pytest.approx(summary["test_nats"], abs=1e-3)

    # paused at step 2, resumed: the uninterrupted run, step for step
    code, stdout, err = run(common + ["--samples", "0", "--out", str(paused), "--stop-at", "2"], capsys)
    assert code == 0 and "paused at step 2" in stdout, err
    code, stdout, err = run(["train", "pixelcnnpp", "--resume", "--out", str(paused), "--backend", "ref", "--quiet"],
                            capsys)
    assert code == 0, err
    assert "resuming at step 2 of 4" in stdout
    assert train_metrics(paused) == train_metrics(straight)
    assert [s for s, _ in train_metrics(paused)] == [1, 2, 3, 4]
    b = json.loads((paused / "summary.json").read_text())
    assert b["weights_sha256"] == summary["weights_sha256"]
    code, _, err = run(["train", "pixelcnnpp", "--resume", "--out", str(paused), "--nr-mix", "3"], capsys)
    assert code == 2 and "trained with nr_mix=2" in err

    # python -m fastgen sample: cached multi-scale sampling by default, the same images as naive
    for method in ("cached", "naive"):
        code, stdout, err = run(["sample", str(straight), "--n", "2", "--method", method, "--quiet",
                                 "--out", str(tmp_path / f"{method}.png")], capsys)
        assert code == 0 and f"({method})" in stdout, err
    assert (tmp_path / "cached.png").read_bytes() == (tmp_path / "naive.png").read_bytes()


def test_train_conditional_and_ddp_two_processes_gloo(tmp_path, digits):
    """Two processes (gloo, CPU) train a class-conditional model: every
    parameter gets a gradient (DDP would fail otherwise) and both replicas end equal."""
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fastgen", "train", "pixelcnnpp", "--data", "digits", "--steps", "3",
                           "--conditional", "--samples", "10", "--device", "cpu", "--out", str(out)] + TINY,
                          capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("data: digits") == 1 and "10 classes" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["machine"]["world_size"] == 2 and summary["step"] == 3 and summary["test_images"] == 297
    digests = summary["weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert weights_digest(load_model(str(out))) == digests[0]
    png = (out / "samples.png").read_bytes()  # one class per column: 1 row of 10
    assert struct.unpack(">II", png[16:24]) == (10 * 10 + 2, 1 * 10 + 2)


@pytest.mark.parametrize("images, message", [
    (np.zeros((40, 8, 8), dtype=np.uint8) + np.eye(8, dtype=np.uint8), "has 2 levels: for binary data train pixelcnn"),
    (np.arange(40 * 100).reshape(40, 10, 10).astype(np.uint8), "multiples of 4"),
])
def test_data_the_model_cannot_take_is_a_clear_error(images, message, tmp_path, capsys):
    path = tmp_path / "data.npz"
    np.savez(path, images=images)
    code, _, err = run(["train", "pixelcnnpp", "--data", "files", "--root", str(path), "--steps", "1",
                        "--out", str(tmp_path / "run")] + TINY, capsys)
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["train", "pixelcnnpp", "--data", "digits", "--kernel-size", "3"], "--kernel-size is not an option of pixelcnnpp"),
    (["train", "pixelcnn", "--data", "digits", "--nr-mix", "3"], "--nr-mix is not an option of pixelcnn"),
    (["train", "pixelcnnpp", "--data", "digits", "--dropout", "1"], "dropout must be in [0, 1)"),
    (["train", "pixelcnnpp", "--data", "digits", "--nr-mix", "0"], "nr_mix must be >= 1"),
])
def test_bad_arguments_are_clear_errors(args, message, capsys, tmp_path):
    assert_cli_error(args + ["--out", str(tmp_path)], message, capsys)
