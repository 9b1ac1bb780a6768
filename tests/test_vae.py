"""fastgen.models.VAE: shapes and errors, the discretized Gaussian (normalised,
the Gaussian's bin masses), the ELBO's parts, the importance-weighted NLL (against
a reference with the same draws, against exact quadrature, tighter than -ELBO),
overfitting real images, and `python -m fastgen train vae` (checkpoint, exact
resume, PNGs, test ELBO / IW NLL, errors, 2-process DDP on gloo)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastgen.data import read_png
from fastgen.models import VAE
from fastgen.models.vae import _seeds, discretized_gaussian_log_prob
from fastgen.ref.reparameterize_kl import normal_stream
from fastgen.train import evaluate_elbo, evaluate_iw, load_model, read_checkpoint, weights_digest

from conftest import assert_cli_error, mnist_train, png_size, run_cli as run, train_metrics

TINY = ["--batch", "16", "--channels", "8", "--latent", "4", "--quiet"]


def perturbed(model, scale=0.3):
    """``model`` in float64 with its weights pushed away from the init (the
    likelihood then depends on z strongly: the bounds have a gap to show)."""
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


# ---- the model ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("decoder", ["bernoulli", "gaussian"])
def test_shapes(decoder):
    m = VAE(decoder=decoder, latent=8)
    levels = 2 if decoder == "bernoulli" else 256
    x = torch.randint(0, levels, (3, 1, 28, 28), dtype=torch.uint8)
    assert m.levels == levels and m.image_shape == (1, 28, 28)
    assert m.elbo(x, seed=0).shape == (3,) and m.loss(x).dim() == 0
    mu, logvar = m.encode(x)
    assert mu.shape == logvar.shape == (3, 8)
    assert m.decode(mu).shape == (3, 1 if decoder == "bernoulli" else 2, 28, 28)
    assert m.iw_nll(x, 5, seed=0).shape == (3,)
    for images in (m.sample(5, seed=0), m.reconstruct(x)):
        assert images.dtype == torch.uint8 and images.shape[1:] == (1, 28, 28)
    assert m.interpolate(x[:2], x[1:], 4).shape == (2, 4, 1, 28, 28)
    assert m.interpolate(x[0], x[1], 3).shape == (1, 3, 1, 28, 28)
    assert torch.equal(m.sample(4, seed=3), m.sample(4, seed=3))
    assert not torch.equal(m.sample(4, seed=3, mode="draw"), m.sample(4, seed=4, mode="draw"))
    # other sizes: height and width multiples of 4, any channels
    other = VAE((3, 8, 12), channels=4, latent=2, decoder=decoder)
    y = torch.randint(0, levels, (2, 3, 8, 12))
    assert other.elbo(y).shape == (2,) and other.sample(2).shape == (2, 3, 8, 12)


def test_errors():
    m = VAE(decoder="bernoulli")
    with pytest.raises(ValueError, match=r"images must be \[B, 1, 28, 28\]"):
        m.elbo(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"images must be \[B, 1, 28, 28\]"):
        m.elbo(torch.zeros(1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"pixel values must be in 0..1 \(the Bernoulli decoder takes binary"):
        m.elbo(torch.full((2, 1, 28, 28), 255, dtype=torch.uint8))
    with pytest.raises(ValueError, match="integer pixel values"):
        m.elbo(torch.full((2, 1, 28, 28), 0.5))
    with pytest.raises(ValueError, match="not class-conditional"):
        m.loss(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        m.iw_nll(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match="multiples of 4"):
        VAE((1, 30, 30))
    with pytest.raises(ValueError, match="multiples of 4"):
        VAE((28, 28))
    with pytest.raises(ValueError, match="decoder must be one of"):
        VAE(decoder="poisson")
    with pytest.raises(ValueError, match="latent must be an int >= 1"):
        VAE(latent=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        m.sample(2, mode="median")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        m.sample(2, temperature=0)


# ---- the discretized Gaussian --------------------------------------------------------------------------------

@pytest.mark.parametrize("levels", [2, 5, 256])
def test_discretized_gaussian_sums_to_one(levels):
    v = torch.arange(levels)
    for mean in (-3.0, -0.2, 0.0, 0.5 / 255, 0.31, 0.5, 0.999, 1.0, 1.7, 40.0):
        for log_scale in (-7.0, -5.0, -2.0, 0.0, 2.0):
            lp = discretized_gaussian_log_prob(v, torch.full((levels,), mean, dtype=torch.float64),
                                               torch.full((levels,), log_scale, dtype=torch.float64), levels)
            assert lp.max() <= 0 and torch.logsumexp(lp, 0).item() == pytest.approx(0.0, abs=1e-12), (mean, log_scale)


def test_discretized_gaussian_is_the_bin_mass_and_stable_in_the_tails():
    mpmath = pytest.importorskip("mpmath")  # comes with torch (through sympy)
    mpmath.mp.dps = 50
    torch.manual_seed(0)
    v = torch.randint(0, 256, (300,))
    v[:20], v[20:40] = 0, 255  # the open-ended bins too
    mean = torch.rand(300, dtype=torch.float64) * 1.4 - 0.2
    log_scale = torch.rand(300, dtype=torch.float64) * 9 - 7  # the decoder's range, [-7, 2]
    got = discretized_gaussian_log_prob(v, mean, log_scale)
    for i in range(300):  # the Gaussian mass of the bin, exactly (50 digits), in the tails too
        value, m, sigma = int(v[i]), mpmath.mpf(mean[i].item()), mpmath.exp(mpmath.mpf(log_scale[i].item()))
        a = (mpmath.mpf(value) - 0.5) / 255 - m if value > 0 else -mpmath.inf
        b = (mpmath.mpf(value) + 0.5) / 255 - m if value < 255 else mpmath.inf
        if a + b > 0:  # above the mean: P(a < X < b) = P(-b < X < -a), whose CDFs are not all ~1
            a, b = -b, -a
        want = float(mpmath.log(mpmath.ncdf(b, 0, sigma) - mpmath.ncdf(a, 0, sigma)))
        assert got[i].item() == pytest.approx(want, rel=1e-9, abs=1e-9), (value, mean[i], log_scale[i])
    assert got.min() < -1000  # the draw reaches deep tails
    # far in the tails (mass ~ e^-1e6) it stays finite, with finite gradients, in float32 and float64
    for dtype in (torch.float32, torch.float64):
        far = torch.tensor([-50.0, 50.0, 0.3, 3.0], dtype=dtype, requires_grad=True)
        lp = discretized_gaussian_log_prob(torch.tensor([128, 128, 0, 255]), far, torch.full((4,), -7.0, dtype=dtype))
        lp.sum().backward()
        assert torch.isfinite(lp).all() and torch.isfinite(far.grad).all() and lp[0] < -1e6


# ---- ELBO and importance weighting ---------------------------------------------------------------------------

def test_elbo_is_its_parts_and_seeded():
    torch.manual_seed(0)
    m = perturbed(VAE((1, 8, 8), channels=4, latent=3, hidden=16, decoder="bernoulli"))
    x = (torch.rand(5, 1, 8, 8) < 0.4).to(torch.uint8)
    log_px, kl = m.elbo_terms(x, seed=11)
    torch.testing.assert_close(m.elbo(x, seed=11), log_px - kl)
    mu, logvar = m.encode(x)
    torch.testing.assert_close(kl, 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1))
    # the draw is the op's stream for that seed: z = mu + sigma * eps
    z = mu + (0.5 * logvar).exp() * normal_stream(11, mu.numel()).view_as(mu).double()
    want = -F.binary_cross_entropy_with_logits(m.decode(z), x.double(), reduction="none").sum((1, 2, 3))
    torch.testing.assert_close(log_px, want)
    assert not torch.equal(m.elbo(x, seed=12), m.elbo(x, seed=11))


@pytest.mark.parametrize("decoder", ["bernoulli", "gaussian"])
def test_iw_nll_is_the_log_mean_weight_of_its_draws(decoder):
    """A reference IWAE with torch.distributions on the same draws (chunked: 2 chunks of 3)."""
    torch.manual_seed(0)
    m = perturbed(VAE((1, 4, 4), channels=2, latent=2, hidden=8, decoder=decoder))
    levels = m.levels
    x = torch.randint(0, levels, (3, 1, 4, 4))
    k = 6
    got = m.iw_nll(x, k, seed=5, max_rows=9)  # 3 draws of 3 images per chunk
    mu, logvar = m.encode(x)
    std = (0.5 * logvar).exp()
    log_w = []
    for chunk_seed in _seeds(5, 2):
        eps = normal_stream(chunk_seed, 3 * 3 * 2).view(3, 3, 2).double()  # [draw, image, latent]
        z = mu + std * eps
        out = m.decode(z.flatten(0, 1))
        if decoder == "bernoulli":
            log_px = torch.distributions.Bernoulli(logits=out).log_prob(x.repeat(3, 1, 1, 1).double())
        else:
            mean, log_scale = out.chunk(2, 1)
            log_px = discretized_gaussian_log_prob(x.repeat(3, 1, 1, 1), mean, log_scale.clamp(-7, 2), levels)
        normal = torch.distributions.Normal
        log_pz = normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = normal(mu, std).log_prob(z).sum(-1)
        log_w.append(log_px.sum((1, 2, 3)).view(3, 3) + log_pz - log_qz)
    want = -(torch.logsumexp(torch.cat(log_w), 0) - math.log(k))
    torch.testing.assert_close(got, want)


def test_iw_nll_converges_to_the_exact_likelihood():
    """With one latent dimension, log p(x) = log of the integral of p(x|z) p(z) dz,
    by quadrature: -ELBO lies clearly above it and the IW estimate with many
    samples on it. The posterior's variance is fixed at e^0.5, wider than the
    true posterior, so that the importance weights are tame and 5000 draws are
    within Monte Carlo error 0.1 (a wrong log q, e.g. without its logvar term,
    would be off by 0.25)."""
    torch.manual_seed(1)
    m = perturbed(VAE((1, 4, 4), channels=2, latent=1, hidden=8, decoder="bernoulli"), scale=0.5)
    with torch.no_grad():
        m.latent.proj.weight[1:] = 0  # row 1 gives logvar (latent 1: [mu, logvar])
        m.latent.proj.bias[1] = 0.5
    x = (torch.rand(4, 1, 4, 4) < 0.5).to(torch.uint8)
    grid = torch.linspace(-10, 10, 20001, dtype=torch.float64)[:, None]
    logits = m.decode(grid)  # [grid, 1, 4, 4]
    log_px_z = torch.distributions.Bernoulli(logits=logits[None]).log_prob(x[:, None].double()).sum((2, 3, 4))
    log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(grid[:, 0])
    exact_nll = -(torch.logsumexp(log_px_z + log_prior, 1) + math.log(grid[1, 0] - grid[0, 0]))
    neg_elbo = torch.stack([-m.elbo(x, seed=s) for s in range(200)]).mean(0)
    iw = m.iw_nll(x, 5000, seed=0)
    assert (neg_elbo > exact_nll + 0.3).all(), (neg_elbo, exact_nll)  # the ELBO has a real gap here
    torch.testing.assert_close(iw, exact_nll.detach(), atol=0.1, rtol=0)


def test_iw_bound_is_tighter_than_the_elbo():
    torch.manual_seed(2)
    m = perturbed(VAE((1, 8, 8), channels=4, latent=4, hidden=16, decoder="bernoulli"))
    x = (torch.rand(16, 1, 8, 8) < 0.4).to(torch.uint8)
    neg_elbo = -m.elbo(x, seed=0).mean().item()
    iw = {k: m.iw_nll(x, k, seed=0).mean().item() for k in (1, 10, 100)}
    assert iw[100] < iw[10] < neg_elbo, (iw, neg_elbo)
    assert iw[1] == pytest.approx(neg_elbo, rel=0.1)  # k = 1: a one-draw estimate of -ELBO


# ---- learning on real images ---------------------------------------------------------------------------------

@pytest.mark.parametrize("decoder", ["bernoulli", "gaussian"])
def test_overfits_real_images(decoder):
    images = mnist_train(16)[0]
    if decoder == "bernoulli":
        images = (images > 127).to(torch.uint8)
    torch.manual_seed(0)
    m = VAE(channels=16, latent=16, hidden=128, decoder=decoder)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    # the Gaussian decoder first learns the mean image (a plateau near 0.76 of the first loss, KL ~ 0), then
    # puts the latent to use: below 0.65 only a decoder that reads z gets there
    steps, target = (60, 0.5) if decoder == "bernoulli" else (200, 0.65)
    for step in range(steps):
        opt.zero_grad()
        loss = m.loss(images, seed=step)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < target * losses[0], losses[::10]


# ---- the command line ------------------------------------------------------------------------------------------

def test_train_vae_writes_checkpoint_pngs_and_resumes_exactly(tmp_path, capsys, digits):
    common = ["train", "vae", "--data", "digits", "--steps", "6", "--log-every", "1", "--samples", "4",
              "--iw-samples", "5", "--iw-images", "20"] + TINY
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    code, stdout, err = run(common + ["--out", str(straight)], capsys)
    assert code == 0, err
    assert "discretized Gaussian decoder over 256 levels" in stdout  # the default for 256-level data
    assert "test ELBO" in stdout and "IW NLL" in stdout and "k=5 importance samples" in stdout
    ckpt = read_checkpoint(str(straight / "checkpoint.pt"))
    assert ckpt["step"] == 6 and ckpt["model_config"] == {
        "name": "vae", "kwargs": {"image_shape": [1, 8, 8], "channels": 8, "latent": 4, "decoder": "gaussian",
                                  "levels": 256}}
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["test_images"] == len(digits) and summary["iw_images"] == 20 and summary["iw_samples"] == 5
    assert summary["test_elbo_nats"] < 0 and summary["test_nats"] == pytest.approx(-summary["test_elbo_nats"])
    assert 0 < summary["test_iw_nll_nats"] < summary["test_neg_elbo_on_iw_images"]
    assert summary["test_bits_per_dim"] == pytest.approx(summary["test_nats"] / (64 * math.log(2)), rel=1e-4)

    # PNGs: 4 samples (2 x 2), 4 originals above 4 reconstructions, 8 interpolation rows of 10 (8x8 + 2 px)
    assert png_size(straight / "samples.png") == (22, 22)
    assert png_size(straight / "reconstructions.png") == (42, 22)
    assert png_size(straight / "interpolation.png") == (102, 82)
    grid = read_png(straight / "reconstructions.png")
    torch.testing.assert_close(grid[:, 2:10, 2:10], digits.images[0])  # the original, top left

    # the rebuilt model gives the summary's numbers (the evaluation's draws are seeded)
    model = load_model(str(straight))
    r = evaluate_elbo(model, digits, 16, device=torch.device("cpu"), seed=0)
    assert r["elbo"] == pytest.approx(summary["test_elbo_nats"], abs=1e-3)
    iw = evaluate_iw(model, digits, 16, 5, 20, device=torch.device("cpu"), seed=0)
    assert iw["iw_nll"] == pytest.approx(summary["test_iw_nll_nats"], abs=1e-3)

    # pause at step 3 and resume: the same loss curve and weights (latent draws seeded by step and rank)
    code, stdout, err = run(common + ["--out", str(paused), "--stop-at", "3"], capsys)
    assert code == 0 and "paused at step 3" in stdout, err
    assert not (paused / "samples.png").exists()
    code, stdout, err = run(["train", "vae", "--resume", "--out", str(paused), "--quiet"], capsys)
    assert code == 0, err
    assert "resuming at step 3 of 6" in stdout
    assert train_metrics(paused) == train_metrics(straight)
    assert [s for s, _ in train_metrics(paused)] == [1, 2, 3, 4, 5, 6]
    resumed = json.loads((paused / "summary.json").read_text())
    assert resumed["weights_sha256"] == summary["weights_sha256"]
    assert resumed["test_iw_nll_nats"] == summary["test_iw_nll_nats"]

    # `python -m fastgen sample` draws from the VAE's prior
    code, stdout, err = run(["sample", str(straight), "--n", "9", "--out", str(tmp_path / "s.png"), "--quiet"],
                            capsys)
    assert code == 0 and "vae prior" in stdout, err
    assert png_size(tmp_path / "s.png") == (32, 32)
    code, _, err = run(["sample", str(straight), "--method", "naive", "--out", str(tmp_path / "n.png")], capsys)
    assert code == 2 and "--method naive is for the pixel models" in err


def test_train_vae_bernoulli_on_binary_images(tmp_path, capsys, digits):
    path = tmp_path / "binary.npz"
    np.savez(path, images=(digits.images[:, 0] > 127).numpy().astype(np.uint8))  # 0/1: a 2-level dataset
    out = tmp_path / "run"
    code, stdout, err = run(["train", "vae", "--data", "files", "--root", str(path), "--steps", "3", "--samples",
                             "4", "--iw-samples", "3", "--out", str(out)] + TINY, capsys)
    assert code == 0, err
    assert "Bernoulli decoder" in stdout and "nats/image (" in stdout
    assert read_checkpoint(str(out / "checkpoint.pt"))["model_config"]["kwargs"]["decoder"] == "bernoulli"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iw_images"] == 30 and summary["test_iw_nll_nats"] > 0  # every 10th of 297 images is 'test'


@pytest.mark.parametrize("args, message", [
    (["train", "vae", "--data", "digits", "--decoder", "bernoulli"], "--decoder bernoulli models binary images"),
    (["train", "vae", "--data", "digits", "--layers", "3"], "--layers is not an option of vae"),
    (["train", "vae", "--data", "digits", "--conditional"], "--conditional is not an option of vae"),
    (["train", "pixelcnn", "--data", "digits", "--latent", "4"],
     "--latent is not an option of pixelcnn (it is for vae)"),
    (["train", "vae", "--data", "digits", "--latent", "0"], "latent must be >= 1"),
    (["train", "vae", "--data", "digits", "--iw-samples", "-1"], "iw_samples must be >= 0"),
    (["train", "vae", "--data", "digits", "--decoder", "normal"], "invalid choice: 'normal'"),
])
def test_bad_arguments_are_clear_errors(args, message, capsys, tmp_path):
    assert_cli_error(args + ["--out", str(tmp_path)], message, capsys)


def test_image_size_the_vae_cannot_take_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "odd.npz"
    np.savez(path, images=np.random.default_rng(0).integers(0, 256, (40, 10, 10), dtype=np.uint8))
    code, _, err = run(["train", "vae", "--data", "files", "--root", str(path), "--steps", "1",
                        "--out", str(tmp_path / "run")] + TINY, capsys)
    assert code == 2 and "multiples of 4" in err and "(1, 10, 10)" in err


def test_ddp_two_processes_gloo(tmp_path, digits):
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fastgen", "train", "vae", "--data", "digits", "--steps", "4", "--batch", "8",
                           "--channels", "8", "--latent", "4", "--iw-samples", "4", "--iw-images", "40",
                           "--samples", "4", "--device", "cpu", "--quiet", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("data: digits") == 1  # only rank 0 prints
    summary = json.loads((out / "summary.json").read_text())
    assert summary["machine"]["world_size"] == 2 and summary["step"] == 4
    digests = summary["weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    model = load_model(str(out))
    assert weights_digest(model) == digests[0]
    # the ranks' halves of the test split, summed: what one process computes on the whole split
    assert summary["test_images"] == 297 and summary["iw_images"] == 40
    r = evaluate_elbo(model, digits, 8, device=torch.device("cpu"), seed=0)
    assert r["elbo"] == pytest.approx(summary["test_elbo_nats"], abs=1e-3)
    iw = evaluate_iw(model, digits, 8, 4, 40, device=torch.device("cpu"), seed=0)
    assert iw["iw_nll"] == pytest.approx(summary["test_iw_nll_nats"], abs=1e-3)
    assert (out / "interpolation.png").exists()
