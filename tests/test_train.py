"""`python -m fastgen train`: both models on the 8x8 digits, checkpoints and an
exact resume, the PNG grid, clear errors, and a 2-process DDP run (gloo, CPU)."""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastgen.data import DatasetMissingError, load_dataset, read_png
from fastgen.train import evaluate, load_model, read_checkpoint, weights_digest

from conftest import assert_cli_error, run_cli as run, train_metrics

TINY = ["--batch", "16", "--channels", "8", "--layers", "1", "--quiet"]


@pytest.mark.parametrize("model", ["pixelcnn", "gated-pixelcnn"])
def test_trains_writes_checkpoint_metrics_summary_png(model, tmp_path, capsys, digits):
    out = tmp_path / "run"
    code, stdout, err = run(["train", model, "--data", "digits", "--steps", "4", "--samples", "4",
                             "--out", str(out)] + TINY, capsys)
    assert code == 0, err
    assert "bits/dim" in stdout and "test" in stdout
    ckpt = read_checkpoint(str(out / "checkpoint.pt"))
    assert ckpt["step"] == 4 and ckpt["model_config"]["name"] == model
    assert ckpt["model_config"]["kwargs"]["likelihood"] == "categorical"
    assert ckpt["model_config"]["kwargs"]["levels"] == 256
    assert {"optimizer", "scheduler", "rng", "args"} <= set(ckpt)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 4 and summary["finished"] and summary["test_images"] == len(digits)
    assert summary["steps_per_s"] > 0 and summary["machine"]["torch"] == torch.__version__
    assert [s for s, _, _ in train_metrics(out, "lr")] == [4]  # log_every 10: the last step is logged

    # load_model rebuilds the model from the checkpoint alone and gives the same test NLL
    rebuilt = load_model(str(out))
    assert type(rebuilt).__name__ == {"pixelcnn": "PixelCNN", "gated-pixelcnn": "GatedPixelCNN"}[model]
    nats, n = evaluate(rebuilt, digits, 16, device=torch.device("cpu"))
    assert n == len(digits) and nats == pytest.approx(summary["test_nats"], abs=1e-3)

    # the sample grid: 4 images of 8x8, 2 per row, 2 px padding -> 22 x 22 PNG
    png = (out / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (22, 22)


def test_conditional_grid_has_one_row_per_class_and_epochs(tmp_path, capsys, digits):
    out = tmp_path / "run"
    # 1500 train images, batch 500 -> 3 steps per epoch
    code, _, err = run(["train", "gated-pixelcnn", "--data", "digits", "--epochs", "1", "--batch", "500",
                        "--channels", "8", "--layers", "1", "--conditional", "--samples", "20", "--quiet",
                        "--out", str(out)], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3 and summary["model_config"]["kwargs"]["num_classes"] == 10
    grid = read_png(out / "samples.png")
    assert tuple(grid.shape) == (1, 10 * 10 + 2, 2 * 10 + 2)  # 10 classes x 2 samples


def test_resume_continues_the_uninterrupted_run_exactly(tmp_path, capsys, digits):
    # backend ref: bitwise deterministic (the cpp kernel's weight gradient sums per-thread partials of a
    # dynamic work split, so its last bits vary from run to run); this checks the training loop itself:
    # data order, optimizer, schedule and RNG state across the pause
    common = ["train", "gated-pixelcnn", "--data", "digits", "--steps", "6", "--log-every", "1", "--samples", "0",
              "--eval-batches", "1", "--backend", "ref"] + TINY
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    assert run(common + ["--out", str(straight)], capsys)[0] == 0
    code, stdout, err = run(common + ["--out", str(paused), "--stop-at", "3"], capsys)
    assert code == 0, err
    assert "paused at step 3" in stdout and read_checkpoint(str(paused / "checkpoint.pt"))["step"] == 3
    # resumed with DataLoader workers: the batches do not depend on who makes them
    code, stdout, err = run(["train", "gated-pixelcnn", "--resume", "--out", str(paused), "--num-workers", "1",
                             "--backend", "ref", "--quiet"], capsys)
    assert code == 0, err
    assert "resuming at step 3 of 6" in stdout
    assert train_metrics(paused, "lr") == train_metrics(straight, "lr")  # same seed: the same loss curve, step for step
    assert [s for s, _, _ in train_metrics(paused, "lr")] == [1, 2, 3, 4, 5, 6]
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((paused / "summary.json").read_text())
    assert b["step"] == 6 and b["steps_this_run"] == 3
    assert a["weights_sha256"] == b["weights_sha256"]


def test_resume_of_binarized_mnist_with_dynamic_binarization(tmp_path, capsys):
    try:
        load_dataset("binarized-mnist", "test")
    except DatasetMissingError as e:
        pytest.skip(str(e))
    common = ["train", "pixelcnn", "--data", "binarized-mnist", "--steps", "4", "--log-every", "1", "--samples",
              "0", "--eval-batches", "1", "--batch", "8", "--channels", "4", "--layers", "1", "--quiet"]
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    code, stdout, err = run(common + ["--out", str(straight)], capsys)
    assert code == 0, err
    assert "nats/image" in stdout and "dynamic binarization" in stdout
    assert read_checkpoint(str(straight / "checkpoint.pt"))["model_config"]["kwargs"]["likelihood"] == "bernoulli"
    assert run(common + ["--out", str(paused), "--stop-at", "2"], capsys)[0] == 0
    assert run(["train", "pixelcnn", "--resume", "--out", str(paused), "--quiet"], capsys)[0] == 0
    # default dispatch (cpp here): equal up to the kernel's summation order; a different binarization
    # draw would change the loss by whole nats
    got, want = train_metrics(paused, "lr"), train_metrics(straight, "lr")
    assert [s for s, _, _ in got] == [s for s, _, _ in want] == [1, 2, 3, 4]
    assert [loss for _, loss, _ in got] == pytest.approx([loss for _, loss, _ in want], rel=1e-5)


def test_max_minutes_ends_the_run_early(tmp_path, capsys, digits):
    code, stdout, err = run(["train", "pixelcnn", "--data", "digits", "--steps", "50", "--log-every", "1",
                             "--max-minutes", "1e-6", "--samples", "0", "--out", str(tmp_path)] + TINY, capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped_by"] == "max-minutes" and summary["step"] == 1 and summary["test_nats"] > 0
    assert read_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 1


# ---- errors --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["train", "nosuchmodel", "--data", "digits"], "invalid choice: 'nosuchmodel'"),
    (["train", "pixelcnn", "--data", "imagenet"], "invalid choice: 'imagenet'"),
    (["train", "pixelcnn"], "--data is required"),
    (["train", "pixelcnn", "--data", "digits", "--steps", "0"], "steps must be >= 1"),
    (["train", "pixelcnn", "--data", "digits", "--steps", "2", "--epochs", "1"], "not allowed with argument"),
    (["train", "pixelcnn", "--data", "digits", "--channels", "7"], "multiple of"),
    (["train", "pixelcnn", "--data", "digits", "--batch", "2000"], "larger than the 1500 training images"),
    (["train", "pixelcnn", "--data", "digits", "--device", "tpu"], "--device must be cpu or cuda"),
    (["train", "pixelcnn", "--data", "digits", "--backend", "nosuch"], "unknown backend 'nosuch'"),
])
def test_bad_arguments_are_clear_errors(args, message, capsys, tmp_path):
    assert_cli_error(args + ["--out", str(tmp_path)], message, capsys)


def test_missing_dataset_and_impossible_backend_exit_2_without_traceback(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "fastgen", "train", "pixelcnn", "--data", "files", "--root",
                              str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.startswith("error: no such file or folder") and "Traceback" not in missing.stderr
    # triton cannot take CPU tensors outside the interpreter
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    bad = subprocess.run([sys.executable, "-m", "fastgen", "train", "pixelcnn", "--data", "digits", "--steps", "1",
                          "--backend", "triton", "--device", "cpu", "--out", str(tmp_path / "out")] + TINY,
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.startswith("error: ") and "triton" in bad.stderr and "Traceback" not in bad.stderr


def test_resume_errors(tmp_path, capsys, digits):
    out = tmp_path / "run"
    code, _, err = run(["train", "pixelcnn", "--resume", "--out", str(out)], capsys)
    assert code == 2 and "no checkpoint at" in err
    # user files: 8x8 images, then a folder of 16x16 ones for the resumed run (an image size mismatch)
    small, big = tmp_path / "small.npz", tmp_path / "big.npz"
    rng = np.random.default_rng(0)
    np.savez(small, images=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8))
    np.savez(big, images=rng.integers(0, 256, (40, 16, 16), dtype=np.uint8))
    base = ["train", "pixelcnn", "--data", "files", "--out", str(out)]
    code, _, err = run(base + ["--root", str(small), "--steps", "1", "--batch", "4", "--channels", "4", "--layers",
                               "1", "--samples", "0", "--quiet"], capsys)
    assert code == 0, err
    code, _, err = run(base + ["--root", str(big), "--resume", "--steps", "2"], capsys)
    assert code == 2 and "(1, 16, 16)" in err and "(1, 8, 8)" in err
    code, _, err = run(base + ["--resume", "--channels", "8"], capsys)
    assert code == 2 and "trained with channels=4" in err


# ---- data parallel -------------------------------------------------------------------------------------------

def test_ddp_two_processes_gloo(tmp_path, digits):
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fastgen", "train", "gated-pixelcnn", "--data", "digits", "--steps", "4",
                           "--batch", "8", "--channels", "8", "--layers", "2", "--conditional", "--samples", "0",
                           "--device", "cpu", "--quiet", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("data: digits") == 1  # only rank 0 prints
    summary = json.loads((out / "summary.json").read_text())
    assert summary["machine"]["world_size"] == 2 and summary["step"] == 4
    digests = summary["weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both replicas end with identical weights
    assert weights_digest(load_model(str(out))) == digests[0]  # and rank 0 wrote them
    assert summary["test_images"] == 297  # the ranks' halves of the test split, summed
