"""`python -m fastgen train`: both models on the 8x8 digits, checkpoints and an
exact resume, the PNG grid, clear errors, and a 2-process DDP run (gloo, CPU)."""
import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fastgen.data import DatasetMissingError, load_dataset, read_png
from fastgen.train import evaluate, grid_labels, load_model, read_checkpoint, weights_digest

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


def test_conditional_grid_has_one_class_per_column_as_sample_does(tmp_path, capsys, digits):
    out = tmp_path / "run"
    # 1500 train images, batch 500 -> 3 steps per epoch
    code, _, err = run(["train", "gated-pixelcnn", "--data", "digits", "--epochs", "1", "--batch", "500",
                        "--channels", "8", "--layers", "1", "--conditional", "--samples", "25", "--quiet",
                        "--out", str(out)], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3 and summary["model_config"]["kwargs"]["num_classes"] == 10
    grid = read_png(out / "samples.png")
    assert tuple(grid.shape) == (1, 3 * 10 + 2, 10 * 10 + 2)  # 25 images: 10 columns (one per class), 3 rows
    # the sample command lays out the same draws the same way: the same grid, pixel for pixel
    code, _, err = run(["sample", str(out), "--n", "25", "--seed", "0", "--out", str(tmp_path / "s.png"),
                        "--quiet"], capsys)
    assert code == 0, err
    assert torch.equal(read_png(tmp_path / "s.png"), grid)
    labels, ncol = grid_labels(25, 10)
    assert ncol == 10 and labels.tolist() == [i % 10 for i in range(25)]
    assert grid_labels(4, 10)[1] == 4 and grid_labels(10, None) == (None, 4)


def test_resume_continues_the_uninterrupted_run_exactly(tmp_path, capsys, digits):
    # the default backends are deterministic (tests/test_determinism.py): this checks the training loop itself,
    # data order, optimizer, schedule and RNG state across the pause
    common = ["train", "gated-pixelcnn", "--data", "digits", "--steps", "6", "--log-every", "1", "--samples", "0",
              "--eval-batches", "1"] + TINY
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    assert run(common + ["--out", str(straight)], capsys)[0] == 0
    code, stdout, err = run(common + ["--out", str(paused), "--stop-at", "3"], capsys)
    assert code == 0, err
    assert "paused at step 3" in stdout and read_checkpoint(str(paused / "checkpoint.pt"))["step"] == 3
    # resumed with DataLoader workers: the batches do not depend on who makes them
    code, stdout, err = run(["train", "gated-pixelcnn", "--resume", "--out", str(paused), "--num-workers", "1",
                             "--quiet"], capsys)
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
    (["train", "pixelcnn", "--data", "digits", "--channels", "7"],
     "--channels 7 does not fit pixelcnn on 1-channel images: it must be a multiple of 2"),
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
    assert code == 2 and f"no checkpoint at {out / 'checkpoint.pt'}" in err
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
    # --steps below the checkpoint's step: an error, and the run's metrics are left as they were
    code, _, err = run(base + ["--resume", "--steps", "3", "--quiet"], capsys)
    assert code == 0, err
    metrics = (out / "metrics.jsonl").read_text()
    assert_cli_error(base + ["--resume", "--steps", "2"], "--steps 2 is below the checkpoint's step 3", capsys)
    assert (out / "metrics.jsonl").read_text() == metrics


def test_resuming_a_finished_run_evaluates_again_without_duplicates(tmp_path, capsys, digits):
    out = tmp_path / "run"
    args = ["train", "pixelcnn", "--data", "digits", "--steps", "2", "--samples", "0", "--eval-batches", "1",
            "--out", str(out)] + TINY
    assert run(args, capsys)[0] == 0
    before = (out / "metrics.jsonl").read_text().splitlines()
    code, stdout, err = run(["train", "pixelcnn", "--resume", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    assert "resuming at step 2 of 2" in stdout
    after = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in after] == ["train", "eval"]  # the final evaluation, once
    assert json.loads(after[1])["test_nats"] == json.loads(before[1])["test_nats"]


# ---- best.pt, --patience and curves.png ------------------------------------------------------------------------

def test_best_checkpoint_patience_and_curves(tmp_path, capsys, digits):
    """--lr 1e-12 leaves the weights as they are (the update is below float32's resolution): the test NLL never
    improves after the first evaluation, so --patience 2 stops at the third, and best.pt holds the first."""
    out = tmp_path / "run"
    code, stdout, err = run(["train", "pixelcnn", "--data", "digits", "--steps", "20", "--eval-every", "2",
                             "--patience", "2", "--lr", "1e-12", "--eval-batches", "2", "--samples", "0",
                             "--out", str(out)] + TINY, capsys)
    assert code == 0, err
    assert "has not improved for 2 evaluations" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "patience" and summary["step"] == 6 and not summary["finished"]
    assert summary["best"]["step"] == 2 and summary["best"]["key"] == "test_nats"
    best = read_checkpoint(str(out / "best.pt"))
    assert best["step"] == 2 and best["best"]["value"] == summary["best"]["value"]
    assert weights_digest(load_model(str(out / "best.pt"))) == weights_digest(load_model(str(out)))
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_best_checkpoint_follows_an_improving_run_and_patience_needs_evaluations(tmp_path, capsys, digits):
    out = tmp_path / "run"
    code, stdout, err = run(["train", "pixelcnn", "--data", "digits", "--steps", "6", "--eval-every", "3",
                             "--eval-batches", "2", "--samples", "0", "--lr", "3e-3", "--out", str(out)] + TINY,
                            capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    nats = {r["step"]: r["test_nats"] for r in evals if r["kind"] == "eval"}
    assert summary["best"]["value"] == pytest.approx(min(nats.values()), abs=1e-3)
    assert summary["best"]["step"] == min(nats, key=nats.get)
    assert read_checkpoint(str(out / "best.pt"))["step"] == summary["best"]["step"]
    assert_cli_error(["train", "pixelcnn", "--data", "digits", "--steps", "2", "--patience", "2", "--out",
                      str(tmp_path / "p")] + TINY, "--patience 2 counts evaluations: give --eval-every N too", capsys)
    assert_cli_error(["train", "dcgan", "--data", "digits", "--steps", "2", "--eval-every", "1", "--patience", "2",
                      "--out", str(tmp_path / "g")] + TINY[:4] + ["--quiet"],
                     "--patience: dcgan on digits has no score", capsys)


def test_a_run_without_matplotlib_goes_on_without_curves(tmp_path, capsys, digits, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "run"
    code, stdout, err = run(["train", "pixelcnn", "--data", "digits", "--steps", "2", "--eval-batches", "1",
                             "--samples", "0", "--out", str(out)] + TINY, capsys)
    assert code == 0, err
    assert "note: no curves.png in this run" in stdout and "pip install matplotlib" in stdout
    assert not (out / "curves.png").exists() and (out / "summary.json").exists()


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


# ---- the run folder: another run is refused unless --force; --force leaves nothing of it ----------------------

def test_an_existing_run_folder_is_refused_unless_force(tmp_path, capsys, digits):
    out = tmp_path / "run"
    vae = ["train", "vae", "--data", "digits", "--steps", "1", "--batch", "16", "--channels", "4", "--latent", "2",
           "--iw-samples", "0", "--samples", "4", "--eval-batches", "1", "--quiet", "--out", str(out)]
    assert run(vae, capsys)[0] == 0
    assert (out / "reconstructions.png").exists()
    before = (out / "checkpoint.pt").read_bytes()
    pixel = ["train", "pixelcnn", "--data", "digits", "--steps", "1", "--samples", "4", "--eval-batches", "1",
             "--out", str(out)] + TINY
    assert_cli_error(pixel, f"--out {out} holds another run (checkpoint.pt, metrics.jsonl, curves.png, "
                            f"summary.json, samples.png, reconstructions.png, interpolation.png): continue it with "
                            f"--resume, replace it with --force", capsys)
    assert (out / "checkpoint.pt").read_bytes() == before  # untouched
    assert_cli_error(pixel + ["--resume", "--force"], "not allowed with argument", capsys)
    code, _, err = run(pixel + ["--force"], capsys)
    assert code == 0, err
    assert read_checkpoint(str(out))["model_config"]["name"] == "pixelcnn"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "curves.png", "metrics.jsonl", "samples.png",
                                                     "summary.json"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 1]
    # a folder of other files is no run: it is used as it is
    other = tmp_path / "notes"
    other.mkdir()
    (other / "README.txt").write_text("mine")
    pixel[pixel.index(str(out))] = str(other)
    assert run(pixel, capsys)[0] == 0 and (other / "README.txt").read_text() == "mine"


# ---- colour data: default channels that fit, a clear error for ones that do not ---------------------------------

def _rgb_folder(root, n=30):
    """A folder of n tiny 8x8 RGB images in two class folders, PNG and JPEG (Pillow writes both)."""
    from fastgen.data import write_image
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        image = torch.randint(0, 256, (3, 8, 8), generator=gen, dtype=torch.uint8)
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        write_image(folder / f"{i}.{'jpg' if i % 3 == 0 else 'png'}", image)
    return root


@pytest.mark.parametrize("model, channels", [("pixelcnn", 66), ("gated-pixelcnn", 66)])
def test_rgb_data_with_default_channels(model, channels, tmp_path, capsys):
    root = _rgb_folder(tmp_path / "rgb")
    out = tmp_path / "run"
    code, stdout, err = run(["train", model, "--data", "files", "--root", str(root), "--steps", "1", "--batch", "8",
                             "--layers", "1", "--samples", "4", "--quiet", "--out", str(out)], capsys)
    assert code == 0, err
    assert "3x8x8" in stdout and f"channels={channels}" in stdout  # 64 rounded up to a multiple of 6 (or 3)
    kwargs = read_checkpoint(str(out))["model_config"]["kwargs"]
    assert kwargs["channels"] == channels and kwargs["image_shape"] == [3, 8, 8]
    assert tuple(read_png(out / "samples.png").shape) == (3, 22, 22)


def test_rgb_channels_that_do_not_fit_name_the_flag_and_the_nearest_values(tmp_path, capsys):
    root = _rgb_folder(tmp_path / "rgb")
    base = ["train", "pixelcnn", "--data", "files", "--root", str(root), "--steps", "1", "--batch", "8",
            "--out", str(tmp_path / "o")]
    assert_cli_error(base + ["--channels", "64"], "--channels 64 does not fit pixelcnn on 3-channel images: it must "
                     "be a multiple of 6 (2 x the data's 3 colour channels); the nearest valid values are 60 or 66",
                     capsys)
    assert_cli_error(base + ["--channels", "4"], "the nearest valid value is 6", capsys)
    base[1] = "gated-pixelcnn"
    assert_cli_error(base + ["--channels", "32"], "multiple of 3 (the data's 3 colour channels); the nearest valid "
                     "values are 30 or 33", capsys)


# ---- progress bars ------------------------------------------------------------------------------------------------

def test_progress_bars_for_training_and_evaluation(tmp_path, capsys, digits):
    code, _, err = run(["train", "pixelcnn", "--data", "digits", "--steps", "2", "--samples", "0", "--batch", "16",
                        "--channels", "8", "--layers", "1", "--eval-batches", "3", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert "train" in err and "2/2" in err and "eval (test NLL)" in err and "3/3" in err
    code, _, err = run(["train", "pixelcnn", "--data", "digits", "--steps", "2", "--samples", "0", "--out",
                        str(tmp_path), "--force"] + TINY, capsys)
    assert code == 0 and err == ""  # --quiet: no bar at all


def test_progress_counts_when_disabled_and_writes_to_stderr(capsys):
    from fastgen._progress import Progress
    with Progress(5, "quiet one", enabled=False) as bar:
        bar.update(3)
        bar.postfix = "loss 1"
        assert bar.n == 3 and bar.postfix == "loss 1"  # the naive sampler stops on n, bar or no bar
    assert capsys.readouterr() == ("", "")
    with Progress(4, "loud one") as bar:
        bar.update(4)
    out, err = capsys.readouterr()
    assert out == "" and "loud one" in err and "4/4" in err


# ---- interrupts: SIGINT / SIGTERM save at the step boundary, --resume continues exactly ---------------------------

INTERRUPTED = ["train", "gated-pixelcnn", "--data", "digits", "--steps", "60", "--log-every", "3", "--samples", "0",
               "--eval-batches", "1", "--backend", "ref"] + TINY


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted run the interrupted ones must end equal to (backend ref: bitwise deterministic)."""
    import contextlib
    import io
    from fastgen import cli
    try:
        load_dataset("digits", "test")
    except DatasetMissingError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("straight")
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(INTERRUPTED + ["--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("sig, group, workers", [(signal.SIGINT, True, 1), (signal.SIGTERM, False, 0)])
def test_a_signal_saves_at_the_step_boundary_and_resume_finishes_the_same_run(sig, group, workers, straight_run,
                                                                                tmp_path, capsys):
    out = tmp_path / "run"
    # a new session: Ctrl-C in a terminal signals the whole process group (DataLoader workers included)
    proc = subprocess.Popen([sys.executable, "-m", "fastgen"] + INTERRUPTED + ["--out", str(out), "--num-workers",
                                                                               str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None:
        assert time.time() < deadline, "no training step was logged"
        time.sleep(0.01)
    os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, (proc.returncode, stderr[-2000:])
    assert "Traceback" not in stderr
    step = read_checkpoint(str(out))["step"]
    assert 3 <= step < 60
    assert (f"interrupted by {name} at step {step} of 60: checkpoint saved in {out / 'checkpoint.pt'}; continue "
            f"with: python -m fastgen train gated-pixelcnn --resume --out {out}") in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == name and summary["step"] == step and not summary["finished"]
    assert summary["test_nats"] is None  # no evaluation on the way out

    code, stdout, err = run(["train", "gated-pixelcnn", "--resume", "--out", str(out), "--backend", "ref", "--quiet"],
                            capsys)
    assert code == 0, err
    assert f"resuming at step {step} of 60" in stdout
    done = json.loads((out / "summary.json").read_text())
    want = json.loads((straight_run / "summary.json").read_text())
    assert done["finished"] and done["weights_sha256"] == want["weights_sha256"]
    assert train_metrics(out, "lr") == train_metrics(straight_run, "lr")  # the same loss curve, window included
    assert done["test_nats"] == want["test_nats"]


def test_signal_handling_is_deferred_then_restored():
    from fastgen.train.loop import _Interrupted, _Signals

    def deliver(sig):
        os.kill(os.getpid(), sig)
        time.sleep(0.01)  # the handler runs between bytecodes

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with _Signals(main=False) as signals:
        deliver(signal.SIGINT)  # nothing is raised: the loop asks at the step boundary
        assert signals.received == "SIGINT"
        deliver(signal.SIGTERM)  # within a second: a launcher's copy (torchrun forwards signals), absorbed
        deliver(signal.SIGINT)
        assert signals.received == "SIGINT"
        signals.first_s -= 2  # more than a second later: the user means it, quit now
        with pytest.raises(KeyboardInterrupt):
            deliver(signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    with _Signals(main=False) as signals:
        with pytest.raises(_Interrupted), signals.abandoning():  # an evaluation is left at once
            deliver(signal.SIGTERM)
        assert signals.received == "SIGTERM" and not signals.abandon
        with signals.abandoning(allowed=False):  # under torchrun: the evaluation finishes
            deliver(signal.SIGTERM)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_signal_during_an_evaluation_abandons_it_and_the_resumed_run_redoes_it(tmp_path, capsys, monkeypatch,
                                                                                   digits):
    from fastgen.train.pixel import PixelFamily
    common = ["train", "gated-pixelcnn", "--data", "digits", "--steps", "6", "--eval-every", "3", "--log-every", "1",
              "--samples", "0", "--eval-batches", "2", "--backend", "ref"] + TINY
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert run(common + ["--out", str(straight)], capsys)[0] == 0
    evaluate_ = PixelFamily.evaluate

    def interrupted(self, *args, **kwargs):  # Ctrl-C while the evaluation at step 3 runs
        if not kwargs["final"]:
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate_(self, *args, **kwargs)

    monkeypatch.setattr(PixelFamily, "evaluate", interrupted)
    code, stdout, err = run(common + ["--out", str(out)], capsys)
    assert code == 130 and "interrupted by SIGINT at step 3 of 6" in stdout, err
    ckpt = read_checkpoint(str(out))
    assert ckpt["step"] == 3 and ckpt["eval_due"]
    assert all(json.loads(line)["kind"] == "train" for line in (out / "metrics.jsonl").read_text().splitlines())
    monkeypatch.undo()
    code, _, err = run(["train", "gated-pixelcnn", "--resume", "--out", str(out), "--backend", "ref", "--quiet"],
                       capsys)
    assert code == 0, err

    def lines(run_dir):  # every record without its timings
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
                for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines(out) == lines(straight)  # the evaluation at step 3 is there, once, in its place
    assert json.loads((out / "summary.json").read_text())["weights_sha256"] == \
        json.loads((straight / "summary.json").read_text())["weights_sha256"]
    # a pause by --stop-at on an evaluation step: the same
    paused = tmp_path / "paused"
    assert run(common + ["--out", str(paused), "--stop-at", "3"], capsys)[0] == 0
    assert read_checkpoint(str(paused))["eval_due"]
    assert run(["train", "gated-pixelcnn", "--resume", "--out", str(paused), "--backend", "ref", "--quiet"],
               capsys)[0] == 0
    assert lines(paused) == lines(straight)
