"""GAN losses (fastgen.gan) and DCGAN's models (fastgen.models.dcgan)."""
import pytest
import torch
import torch.nn as nn

from fastgen import BatchNormAct2d
from fastgen.gan import discriminator_loss, generator_loss
from fastgen.models import DCGANDiscriminator, DCGANGenerator
from fastgen.models.dcgan import ImageConv2d, ImageConvTranspose2d, Projection, as_torch_layers


# ---- losses ---------------------------------------------------------------------------------------------------

def _textbook(real, fake):
    """The BCE formulas on D = sigmoid(logit), in float64."""
    d_real, d_fake = torch.sigmoid(real), torch.sigmoid(fake)
    return (-(torch.log(d_real).mean() + torch.log(1 - d_fake).mean()), -torch.log(d_fake).mean(),
            torch.log(1 - d_fake).mean())


def test_losses_equal_the_textbook_formulas():
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(37, generator=gen, dtype=torch.float64) * 3, torch.randn(37, 1, generator=gen,
                                                                                     dtype=torch.float64) * 3
    d, g_ns, g_mm = _textbook(real, fake[:, 0])
    torch.testing.assert_close(discriminator_loss(real, fake), d)
    torch.testing.assert_close(generator_loss(fake), g_ns)
    torch.testing.assert_close(generator_loss(fake, kind="minimax"), g_mm)
    # and torch's own BCE on the logits
    bce = nn.BCEWithLogitsLoss()
    torch.testing.assert_close(discriminator_loss(real, fake), bce(real, torch.ones_like(real))
                               + bce(fake[:, 0], torch.zeros_like(real)))
    # each term alone (a training step backpropagates them one after the other): the two add up to the loss
    torch.testing.assert_close(discriminator_loss(real, None), -torch.log(torch.sigmoid(real)).mean())
    torch.testing.assert_close(discriminator_loss(None, fake), -torch.log(1 - torch.sigmoid(fake)).mean())
    torch.testing.assert_close(discriminator_loss(real, None) + discriminator_loss(None, fake), d)


@pytest.mark.parametrize("big", [100.0, 1e4])
def test_losses_are_finite_with_gradients_where_bce_on_sigmoid_fails(big):
    def grads(loss_fn, *logits):
        leaves = [torch.tensor(v, requires_grad=True) for v in logits]
        loss = loss_fn(*leaves)
        return loss, torch.autograd.grad(loss, leaves)

    # a real image D is sure is fake, a fake image D is sure is real: the errors that must be corrected
    loss, (g_real, g_fake) = grads(discriminator_loss, [-big], [big])
    assert loss.item() == pytest.approx(2 * big) and g_real.item() == pytest.approx(-1) and g_fake.item() == 1
    # the non-saturating G loss keeps its gradient where D rejects the samples
    loss, (g,) = grads(generator_loss, [-big])
    assert loss.item() == pytest.approx(big) and g.item() == pytest.approx(-1)
    # minimax: finite, and flat there (the saturation the non-saturating loss exists to avoid)
    loss, (g,) = grads(lambda f: generator_loss(f, "minimax"), [-big])
    assert torch.isfinite(loss) and abs(g.item()) < 1e-30
    # BCELoss on sigmoid: the same real image gets no gradient at all
    logit = torch.tensor([-big], requires_grad=True)
    naive = nn.BCELoss()(torch.sigmoid(logit), torch.ones(1))
    naive.backward()
    assert abs(logit.grad.item()) < 1e-20


def test_losses_gradcheck():
    real = torch.randn(5, dtype=torch.float64, requires_grad=True)
    fake = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(discriminator_loss, (real, fake))
    for kind in ("non_saturating", "minimax"):
        assert torch.autograd.gradcheck(lambda f: generator_loss(f, kind), (fake,))


def test_half_logits_give_a_float32_loss():
    assert generator_loss(torch.randn(4, dtype=torch.bfloat16)).dtype == torch.float32


@pytest.mark.parametrize("call, message", [
    (lambda: discriminator_loss(torch.zeros(0), torch.zeros(3)), "empty batch"),
    (lambda: discriminator_loss(None, None), "give real_logits, fake_logits or both"),
    (lambda: generator_loss(torch.zeros(3, 2)), "one logit per image"),
    (lambda: generator_loss(torch.zeros(3, dtype=torch.long)), "floating tensor"),
    (lambda: generator_loss(torch.zeros(3), kind="wgan"), "kind must be one of"),
])
def test_bad_loss_calls(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- models ---------------------------------------------------------------------------------------------------

SHAPES = [(1, 28, 28), (3, 32, 32), (3, 64, 64), (1, 14, 14)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_classes", [None, 10])
def test_shapes_and_ranges(shape, num_classes):
    g = DCGANGenerator(z_dim=16, image_shape=shape, num_classes=num_classes, width=8)
    label = torch.arange(5) % 10 if num_classes else None
    x = g(torch.randn(5, 16), label)
    assert x.shape == (5, *shape) and x.abs().max() <= 1
    for cond in ("projection", "concat"):
        d = DCGANDiscriminator(shape, num_classes=num_classes, width=8, conditioning=cond)
        assert d(x, label).shape == (5,)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_dcgan_rules(shape):
    g, d = DCGANGenerator(16, shape, width=8), DCGANDiscriminator(shape, width=8)
    for m in (g, d):
        kinds = {type(x) for x in m.modules()}
        assert not kinds & {nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Linear, nn.Upsample}
    # G: transposed convs, BN + ReLU after each but the last, tanh at the output
    gl = list(g.net)  # batch norm + its activation: one fastgen.BatchNormAct2d
    assert all(isinstance(x, nn.ConvTranspose2d) for x in gl[:-1:2])
    assert all(isinstance(x, BatchNormAct2d) and x.activation == "relu" for x in gl[1:-2:2])
    assert isinstance(gl[-1], nn.Tanh) and isinstance(gl[-2], nn.ConvTranspose2d)
    # D: strided convs, LeakyReLU(0.2), no BN on the input layer, BN on every later one
    dl = list(d.features)
    assert isinstance(dl[0], nn.Conv2d) and dl[0].stride == (2, 2) and isinstance(dl[1], nn.LeakyReLU)
    convs = [x for x in dl if isinstance(x, nn.Conv2d)]
    assert all(c.stride == (2, 2) for c in convs)
    bns = [x for x in dl if isinstance(x, BatchNormAct2d)]
    assert len(bns) == len(convs) - 1 and all(isinstance(x, (nn.Conv2d, BatchNormAct2d)) for x in dl[2:])
    assert all(x.activation == "leaky_relu" and x.negative_slope == 0.2 for x in bns)
    assert dl[1].negative_slope == 0.2


def test_dcgan_initialisation():
    g = DCGANGenerator(100, (3, 64, 64))
    w = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, nn.ConvTranspose2d)])
    bn = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, BatchNormAct2d)])
    assert abs(w.mean()) < 1e-3 and abs(w.std() - 0.02) < 1e-3
    assert abs(bn.mean() - 1) < 5e-3 and abs(bn.std() - 0.02) < 5e-3


def test_packing_judges_m_images_per_logit():
    d = DCGANDiscriminator((1, 28, 28), width=8, pack=2)
    x = torch.randn(6, 1, 28, 28)
    assert d(x).shape == (3,)
    assert d.features[0].in_channels == 2
    # a pack is its consecutive images: changing image 5 changes logit 2 only
    y = x.clone()
    y[5] += 1
    d.eval()
    diff = (d(x) - d(y)).abs()
    assert diff[2] > 0 and (diff[:2] == 0).all()
    with pytest.raises(ValueError, match="divide by 2"):
        d(x[:5])
    assert DCGANDiscriminator((1, 28, 28), num_classes=10, width=8, conditioning="concat", pack=2)(
        x, torch.arange(6)).shape == (3,)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_channels_last_and_nchw_compute_the_same(shape):
    """The default channels_last layout and the layers computed as matrix products change no value: float64
    outputs and gradients equal those of NCHW models built from torch's layers, from one checkpoint (a state_dict
    loads across layouts); G hands out images in the default layout."""
    torch.manual_seed(0)
    g, d = DCGANGenerator(16, shape, num_classes=10, width=8).double(), \
        DCGANDiscriminator(shape, num_classes=10, width=8).double()
    g0, d0 = DCGANGenerator(16, shape, num_classes=10, width=8, channels_last=False).double(), \
        DCGANDiscriminator(shape, num_classes=10, width=8, channels_last=False).double()
    g0.load_state_dict(g.state_dict())
    d0.load_state_dict(d.state_dict())
    assert g.net[2].weight.is_contiguous(memory_format=torch.channels_last) and g0.net[2].weight.is_contiguous()
    as_torch_layers(g0), as_torch_layers(d0)  # oneDNN's convolutions, not the matrix products
    assert type(g0.net[0]) is nn.ConvTranspose2d and type(d0.features[0]) is nn.Conv2d
    z, label = torch.randn(6, 16, dtype=torch.float64), torch.arange(6) % 10
    for a, b in ((g, d), (g0, d0)):
        x = a(z, label)
        assert x.is_contiguous()
        b(x, label).square().sum().backward()
    for a, b in ((g, g0), (d, d0)):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-10, atol=1e-12), name
        for x, y in zip(a.buffers(), b.buffers()):
            assert torch.allclose(x, y, rtol=1e-12, atol=0)
    g.eval(), g0.eval(), d.eval(), d0.eval()
    x = g(z, label)
    assert torch.allclose(x, g0(z, label), rtol=1e-10, atol=1e-12)
    assert torch.allclose(d(x, label), d0(x, label), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("batch, channels, size", [(3, 1, 6), (2, 3, 5), (0, 2, 4), (1, 11, 4)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_image_layers_equal_torch_s(transposed, batch, channels, size, layout):
    """ImageConv2d (D's input layer) and ImageConvTranspose2d (G's output layer) against torch's layers on the
    same weight, float64: outputs, input and weight gradients (odd sizes, an empty batch, either layout), and
    gradcheck / gradgradcheck (a gradient penalty differentiates D's input gradient)."""
    torch.manual_seed(0)
    wide = 5
    if transposed:
        mine, theirs = ImageConvTranspose2d(wide, channels), nn.ConvTranspose2d(wide, channels, 4, 2, 1, bias=False)
        x = torch.randn(batch, wide, size, size, dtype=torch.float64)
    else:
        mine, theirs = ImageConv2d(channels, wide), nn.Conv2d(channels, wide, 4, 2, 1, bias=False)
        x = torch.randn(batch, channels, size, size, dtype=torch.float64)
    mine, theirs = mine.double().to(memory_format=layout), theirs.double()
    theirs.weight.data.copy_(mine.weight.data)
    x = x.contiguous(memory_format=layout).requires_grad_()
    y, y0 = mine(x), theirs(x)
    assert y.shape == y0.shape
    torch.testing.assert_close(y, y0, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y0)
    for a, b in zip(torch.autograd.grad(y, (x, mine.weight), gy), torch.autograd.grad(y0, (x, theirs.weight), gy)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if batch:
        def fn(x, w):
            return torch.func.functional_call(mine, {"weight": w}, (x,))
        w = mine.weight.detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(fn, (x, w)) and torch.autograd.gradgradcheck(fn, (x, w))


def test_the_projection_head_uses_the_label():
    d = DCGANDiscriminator((1, 28, 28), num_classes=10, width=8).eval()
    x = torch.randn(4, 1, 28, 28)
    assert not torch.allclose(d(x, torch.zeros(4, dtype=torch.long)), d(x, torch.ones(4, dtype=torch.long)))


@pytest.mark.parametrize("make, message", [
    (lambda: DCGANGenerator(image_shape=(1, 30, 30)), "sizes 4 \\* 2\\^n and 7 \\* 2\\^n"),
    (lambda: DCGANGenerator(image_shape=(1, 28, 32)), "square"),
    (lambda: DCGANDiscriminator(image_shape=(1, 7, 7)), "n >= 1"),
    (lambda: DCGANDiscriminator(num_classes=10, pack=2), "conditioning='concat'"),
    (lambda: DCGANDiscriminator(conditioning="film"), "conditioning must be one of"),
    (lambda: DCGANGenerator(8, num_classes=10)(torch.randn(2, 8)), "class-conditional"),
    (lambda: DCGANGenerator(8, num_classes=10)(torch.randn(2, 8), torch.tensor([0, 10])), "labels must be in"),
    (lambda: DCGANGenerator(8)(torch.randn(2, 8), torch.tensor([0, 1])), "not class-conditional"),
    (lambda: DCGANGenerator(8)(torch.randn(2, 9)), "z must be"),
    (lambda: DCGANDiscriminator()(torch.randn(2, 1, 32, 32)), "images must be"),
    (lambda: Projection(4, 8, 7)(torch.randn(2, 4, 2, 2)), r"Projection: input must be \[B, C, 1, 1\]"),
])
def test_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---- training: python -m fastgen train dcgan | cgan ------------------------------------------------------------

import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

from fastgen.data.dataset import ImageData  # noqa: E402
from fastgen.train import load_model, read_checkpoint  # noqa: E402
from fastgen.train.common import weights_digest  # noqa: E402
from fastgen.train.gan import GANFamily, GANOptions, collapse_reasons  # noqa: E402
from fastgen.train.family import Run  # noqa: E402

from conftest import assert_cli_error, run_cli as run  # noqa: E402

GAN_TINY = ["--data", "digits", "--batch", "16", "--channels", "8", "--z-dim", "8", "--quiet"]


@pytest.mark.parametrize("model, extra", [("dcgan", []), ("cgan", ["--conditioning", "concat", "--pack", "2",
                                                                     "--ema", "0.9", "--d-steps", "2"])])
def test_trains_and_writes_its_png_and_samples(model, extra, tmp_path, capsys, digits):
    out = tmp_path / "run"
    code, stdout, err = run(["train", model, "--steps", "4", "--samples", "10", "--out", str(out)] + GAN_TINY + extra,
                            capsys)
    assert code == 0, err
    assert "D(x)" in stdout and "D(G(z))" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 4 and 0 < summary["test_d_real"] < 1 and 0 < summary["test_d_fake"] < 1
    ckpt = read_checkpoint(str(out))
    assert {"generator", "discriminator", "g_optimizer", "d_optimizer"} <= set(ckpt)
    assert ("generator_ema" in ckpt) == ("--ema" in extra)
    assert (out / "samples.png").read_bytes()[:4] == b"\x89PNG"
    g = load_model(str(out))
    assert isinstance(g, DCGANGenerator) and (g.num_classes == 10) == (model == "cgan")
    code, stdout, err = run(["sample", str(out), "--n", "6", "--out", str(tmp_path / "s.png")]
                            + (["--label", "3"] if model == "cgan" else []), capsys)
    assert code == 0 and "generator" in stdout, err
    assert_cli_error(["sample", str(out), "--n", "6", "--method", "naive", "--out", str(tmp_path / "t.png")],
                     "a GAN draws its images in one pass", capsys)


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["dcgan", "cgan"])
def test_trains_on_the_gpu_under_bf16_autocast(model, tmp_path, capsys, digits):
    """--amp (the CUDA default): G and D run in bfloat16 under autocast; the run ends with finite losses."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    out = tmp_path / "run"
    code, stdout, err = run(["train", model, "--steps", "4", "--device", "cuda", "--amp", "--log-every", "1",
                             "--samples", "4", "--out", str(out)] + GAN_TINY, capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["amp"] is True and summary["machine"]["device"].startswith("cuda")
    assert all(math.isfinite(summary[k]) for k in ("final_d_loss", "final_g_loss", "test_d_real", "test_d_fake"))


def test_resume_continues_the_uninterrupted_run_exactly(tmp_path, capsys, digits):
    common = ["train", "dcgan", "--steps", "6", "--log-every", "1", "--samples", "0", "--eval-batches", "1",
              "--ema", "0.5"] + GAN_TINY
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    assert run(common + ["--out", str(straight)], capsys)[0] == 0
    assert run(common + ["--out", str(paused), "--stop-at", "3"], capsys)[0] == 0
    code, stdout, err = run(["train", "dcgan", "--resume", "--out", str(paused), "--quiet"], capsys)
    assert code == 0 and "resuming at step 3 of 6" in stdout, err
    def curve(out):
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["d_loss"], r["g_loss"], r["d_real"]) for r in lines if r["kind"] == "train"]

    assert curve(paused) == curve(straight) and [s for s, *_ in curve(paused)] == [1, 2, 3, 4, 5, 6]
    a, b = (json.loads((p / "summary.json").read_text()) for p in (straight, paused))
    assert a["weights_sha256"] == b["weights_sha256"]


def torchrun_train(args):
    """``python -m fastgen train ARGS`` in 2 CPU processes under torchrun (gloo), checked to succeed."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fastgen", "train", "--device", "cpu"] + args,
                          capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("model", ["dcgan", "cgan"])
def test_ddp_two_processes_gloo(model, tmp_path, digits):
    """Both replicas end with rank 0's weights and buffers: DDP reduces the gradients of D's step and of G's
    (through a frozen D), and the loop brings every rank's BatchNorm statistics to rank 0's."""
    out = tmp_path / "ddp"
    proc = torchrun_train([model, "--steps", "3", "--ema", "0.9", "--samples", "0", "--eval-batches", "1", "--out",
                           str(out)] + GAN_TINY)
    assert "differ" not in proc.stdout and proc.stdout.count("data: digits") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["machine"]["world_size"] == 2 and summary["step"] == 3
    digests = summary["weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    ckpt, mc = read_checkpoint(str(out)), json.loads((out / "summary.json").read_text())["model_config"]
    saved = [DCGANGenerator(**mc["generator"]), DCGANDiscriminator(**mc["discriminator"]),
             DCGANGenerator(**mc["generator"])]
    for module, key in zip(saved, ("generator", "discriminator", "generator_ema")):
        module.load_state_dict(ckpt[key])
    assert weights_digest(*saved) == digests[0]  # and rank 0 wrote them


def test_bad_gan_options_are_clear_errors(tmp_path, capsys, digits):
    base = ["train", "dcgan", "--steps", "1", "--out", str(tmp_path / "r")] + GAN_TINY
    assert_cli_error(base + ["--pack", "3"], "--batch 16 must divide by --pack 3", capsys)
    assert_cli_error(base + ["--ema", "1.5"], "--ema must be in [0, 1)", capsys)
    assert_cli_error(base + ["--d-steps", "0"], "d_steps must be >= 1", capsys)


def _family(shape=(1, 8, 8), **options):
    opts = dict(z_dim=8, g_loss="non_saturating", d_steps=1, pack=1, ema=0.0, conditioning="projection")
    opts.update(options)
    cfg = types.SimpleNamespace(model="dcgan", batch=8, lr=2e-4, channels=8, data="digits", options=GANOptions(**opts))
    dist = types.SimpleNamespace(device=torch.device("cpu"), group=None)
    family = GANFamily(Run(cfg, dist, False, 10, print, lambda record: None))
    family.build(types.SimpleNamespace(levels=256, num_classes=10, shape=shape), None)
    return family


def test_the_generator_step_computes_no_weight_gradient_of_d():
    family = _family()
    calls = {"d": 0, "g": 0}
    family.d.requires_grad_(True)  # D is frozen between its steps; a hook needs a tensor that takes gradients
    for name, module in (("d", family.d), ("g", family.g)):
        for p in module.parameters():
            p.register_hook(lambda grad, name=name: calls.__setitem__(name, calls[name] + 1))
    family.d.requires_grad_(False)
    n_d, n_g = len(list(family.d.parameters())), len(list(family.g.parameters()))
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    family.step(images, torch.zeros(8, dtype=torch.long), seed=1)
    # D's weights: two gradients each (its own step: the real term's backward, then the generated term's); G's:
    # one each (the G step; D's step takes G's images detached)
    assert calls == {"d": 2 * n_d, "g": n_g}
    d_before = [p.detach().clone() for p in family.d.parameters()]
    family.opt_d.step = lambda: None  # only the G step may move anything now: D must not
    family.step(images, torch.zeros(8, dtype=torch.long), seed=2)
    assert all(torch.equal(a, b) for a, b in zip(d_before, family.d.parameters()))


def test_evaluation_judges_with_batch_statistics_and_leaves_d_as_it_was():
    family = _family((1, 16, 16))  # D with batch norm
    images = torch.randint(0, 256, (16, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(16) % 10
    family.step(images, labels, 0)
    for m in family.d.modules():  # running statistics far from any one batch's (as a real/generated mixture is)
        if isinstance(m, BatchNormAct2d):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(0.01)
    family.cfg.eval_batches = 1
    buffers = [b.clone() for b in family.d.buffers()]
    result = family.evaluate(ImageData("digits", "test", images[:8], labels[:8], 10, 256), step=3, final=False)
    assert buffers and all(torch.equal(a, b) for a, b in zip(buffers, family.d.buffers())) and family.d.training
    with torch.no_grad():
        d_real = torch.sigmoid(family.d(images[:8].float() * (2 / 255) - 1)).mean().item()
    assert result["test_d_real"] == pytest.approx(d_real, abs=1e-4)  # D in training mode: the batch's statistics


def test_d_steps_updates_g_every_kth_step():
    family = _family(d_steps=3)
    g0 = [p.detach().clone() for p in family.g.parameters()]
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    moved = []
    for s in range(6):
        before = [p.detach().clone() for p in family.g.parameters()]
        scalars = family.step(images, torch.zeros(8, dtype=torch.long), seed=s)
        moved.append(not all(torch.equal(a, b) for a, b in zip(before, family.g.parameters())))
        assert torch.isfinite(scalars["g_loss"])
    assert moved == [False, False, True, False, False, True] and g0


# ---- the judge in training (fastgen.metrics) -------------------------------------------------------------------

MNIST_TINY = ["--data", "mnist", "--batch", "16", "--channels", "8", "--z-dim", "8", "--samples", "0",
              "--eval-batches", "1", "--quiet"]


@pytest.mark.parametrize("model", ["dcgan", "cgan"])
def test_the_judge_scores_every_evaluation_and_keeps_the_best(model, tmp_path, capsys, mnist_judge):
    out = tmp_path / "run"
    code, stdout, err = run(["train", model, "--steps", "6", "--eval-every", "2", "--judge-images", "48",
                             "--patience", "9", "--out", str(out)] + MNIST_TINY, capsys)
    assert code == 0, err
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 6]
    for r in evals:
        assert r["images"] == 48 and r["modes"] == 10 and 1 <= r["coverage"] <= 10
        assert r["fd"] > r["fd_floor"] == round(mnist_judge.floor, 5) and r["kl"] >= 0 and 0 < r["confidence"] <= 1
        assert ("label_accuracy" in r) == (model == "cgan") and isinstance(r["collapse"], list)
    assert "judge on 48 samples: FD" in stdout and (model != "cgan" or "label accuracy" in stdout)
    summary = json.loads((out / "summary.json").read_text())
    fds = {r["step"]: r["fd"] for r in evals}
    assert summary["best"]["key"] == "fd" and summary["best"]["step"] == min(fds, key=fds.get)
    assert summary["best"]["value"] == pytest.approx(min(fds.values()), rel=1e-6)
    assert read_checkpoint(str(out / "best.pt"))["step"] == summary["best"]["step"]
    watch = read_checkpoint(str(out))["gan_watch"]  # the collapse warning's memory resumes with the run
    assert watch == {"best_coverage": max(r["coverage"] for r in evals), "min_kl": min(r["kl"] for r in evals)}


def test_under_ddp_rank_0_alone_judges(tmp_path, mnist_judge):
    """The other ranks build no judge and score nothing (rank 0's scores decide best.pt and --patience for all),
    yet keep the score's name; a 2-process run judges every evaluation and keeps best.pt by it."""
    cfg = types.SimpleNamespace(model="dcgan", batch=8, lr=2e-4, channels=8, data="mnist", quiet=True, eval_batches=1,
                                options=GANOptions(z_dim=8, g_loss="non_saturating", d_steps=1, pack=1, ema=0.0,
                                                   conditioning="projection", judge_images=16))
    dist = types.SimpleNamespace(device=torch.device("cpu"), group=None, main=False, barrier=lambda: None)
    family = GANFamily(Run(cfg, dist, False, 10, print, lambda record: None))
    family.build(types.SimpleNamespace(levels=256, num_classes=10, shape=(1, 28, 28)), None)
    assert family.judge is None and family.best_key == "fd"
    data = ImageData("mnist", "test", torch.zeros(8, 1, 28, 28, dtype=torch.uint8), torch.zeros(8).long(), 10, 256)
    assert family.evaluate(data, step=1, final=False)["fd"] is None
    out = tmp_path / "ddp"
    torchrun_train(["dcgan", "--steps", "2", "--eval-every", "1", "--judge-images", "16", "--patience", "4", "--out",
                    str(out)] + MNIST_TINY)
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2] and all(r["fd"] > r["fd_floor"] for r in evals)
    assert json.loads((out / "summary.json").read_text())["best"]["key"] == "fd" and (out / "best.pt").exists()


def test_the_judge_images_are_the_same_for_the_same_generator(tmp_path, capsys, mnist_judge):
    """Fixed noise: two runs of one seed score the same; the scores follow G alone."""
    scores = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert run(["train", "dcgan", "--steps", "2", "--judge-images", "32", "--out", str(out)] + MNIST_TINY,
                   capsys)[0] == 0
        scores.append(json.loads((out / "summary.json").read_text())["fd"])
    assert scores[0] == scores[1] and scores[0] is not None


def test_collapse_warnings():
    watch = {"best_coverage": None, "min_kl": None}
    first = {"coverage": 10, "modes": 10, "kl": 0.05}
    assert collapse_reasons(watch, first) == [] and watch == {"best_coverage": 10, "min_kl": 0.05}
    assert collapse_reasons(watch, {"coverage": 10, "modes": 10, "kl": 0.45}) == []  # below the KL line
    reasons = collapse_reasons(watch, {"coverage": 6, "modes": 10, "kl": 0.9})
    assert reasons == ["the samples cover 6 of 10 modes, down from 10",
                       "the KL of the samples' modes to the data's rose to 0.900 nats, past 0.5 (it was 0.050)"]
    assert watch == {"best_coverage": 10, "min_kl": 0.05}
    # a run that starts collapsed (KL never below the line) is not warned about a rise it never had
    late = {"best_coverage": None, "min_kl": None}
    assert collapse_reasons(late, {"coverage": 2, "modes": 10, "kl": 2.0}) == []
    assert collapse_reasons(late, {"coverage": 2, "modes": 10, "kl": 2.5}) == []
    # stacked MNIST: a few modes of 1000 lost is within the 5% drop
    big = {"best_coverage": 900, "min_kl": 0.2}
    assert collapse_reasons(big, {"coverage": 860, "modes": 1000, "kl": 0.3}) == []
    assert collapse_reasons(big, {"coverage": 850, "modes": 1000, "kl": 0.3}) == [
        "the samples cover 850 of 1000 modes, down from 900"]


def test_judge_options(tmp_path, capsys, digits):
    base = ["train", "dcgan", "--steps", "2", "--out", str(tmp_path / "r")] + GAN_TINY
    assert_cli_error(base + ["--judge-images", "1"], "--judge-images must be 0 (no judge) or at least 2", capsys)
    assert_cli_error(base + ["--eval-every", "1", "--patience", "1"],
                     "fastgen's judge scores mnist, fashion-mnist, stacked-mnist, not digits", capsys)
    mnist = ["train", "dcgan", "--steps", "2", "--eval-every", "1", "--patience", "1", "--judge-images", "0",
             "--out", str(tmp_path / "m")] + MNIST_TINY
    assert_cli_error(mnist, "--patience: dcgan on mnist has no score to wait on (the judge is off", capsys)
