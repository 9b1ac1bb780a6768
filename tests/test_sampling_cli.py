"""`python -m fastgen sample` on tiny checkpoints of the 8x8 digits (the PNG
grid, labels, naive = cached for one seed, clear errors), and the demo's
cached-vs-naive sampling comparison on a tiny configuration."""
import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch
from conftest import assert_cli_error
from test_train import TINY, run

from fastgen import cli
from fastgen.demo import run_demo
from fastgen.data import DatasetMissingError, load_dataset, read_png, save_grid
from fastgen.train import load_model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Run folders of two tiny Gated PixelCNNs trained for 2 steps by the train
    CLI: {"plain": unconditional, "cond": class-conditional (10 classes)}."""
    try:
        load_dataset("digits", "test")
    except DatasetMissingError as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("sample_cli")
    runs = {}
    for name, extra in (("plain", []), ("cond", ["--conditional"])):
        out = root / name
        args = ["train", "gated-pixelcnn", "--data", "digits", "--steps", "2", "--samples", "0", "--eval-batches",
                "1", "--out", str(out)] + TINY + extra
        with contextlib.redirect_stdout(io.StringIO()):  # capsys is per test, the fixture per module
            assert cli.main(args) == 0
        runs[name] = out
    return runs


def test_sample_writes_the_grid_and_prints_the_speed(checkpoints, tmp_path, capsys):
    png = tmp_path / "grid.png"
    code, out, err = run(["sample", str(checkpoints["plain"]), "--n", "6", "--nrow", "3", "--out", str(png),
                          "--quiet"], capsys)
    assert code == 0, err
    assert "sampled 6 images (cached)" in out and "images/s" in out and str(png) in out
    # 6 images of 8x8, 3 per row, 2 px padding -> 2 rows: 2 * 10 + 2 high, 3 * 10 + 2 wide
    assert tuple(read_png(png).shape) == (1, 22, 32)


def test_sample_writes_the_format_its_out_name_says(checkpoints, tmp_path, capsys):
    jpg = tmp_path / "deep" / "grid.jpg"  # the folder is made
    code, _, err = run(["sample", str(checkpoints["plain"]), "--n", "4", "--out", str(jpg), "--quiet"], capsys)
    assert code == 0, err
    assert jpg.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, not PNG bytes under a .jpg name
    assert tuple(read_png(jpg).shape) == (1, 22, 22)


def test_naive_and_cached_give_the_same_images(checkpoints, tmp_path, capsys):
    model = load_model(str(checkpoints["plain"]))
    cached = model.sample(5, seed=3, method="cached")
    naive = model.sample(5, seed=3, method="naive")
    assert cached.shape == (5, 1, 8, 8) and torch.equal(cached, naive)
    # and through the CLI, once as a subprocess (the checkpoint file itself): the same PNG
    a, b = tmp_path / "cached.png", tmp_path / "naive.png"
    code, _, err = run(["sample", str(checkpoints["plain"]), "--n", "5", "--seed", "3", "--out", str(a), "--quiet"],
                       capsys)
    assert code == 0, err
    proc = subprocess.run([sys.executable, "-m", "fastgen", "sample", str(checkpoints["plain"] / "checkpoint.pt"),
                           "--n", "5", "--seed", "3", "--method", "naive", "--device", "cpu", "--out", str(b)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "sampled 5 images (naive)" in proc.stdout and "images/s" in proc.stdout
    assert "sampling (naive)" in proc.stderr  # the progress bar (no --quiet)
    assert torch.equal(read_png(a), read_png(b))
    save_grid(cached, tmp_path / "api.png", levels=model.levels)
    assert torch.equal(read_png(a), read_png(tmp_path / "api.png"))


def test_labels_of_a_conditional_model(checkpoints, tmp_path, capsys):
    model = load_model(str(checkpoints["cond"]))
    # without --label: labels 0..9, 0..9 -> one class per column, 10 per row
    png = tmp_path / "cycle.png"
    code, _, err = run(["sample", str(checkpoints["cond"]), "--n", "20", "--out", str(png), "--quiet"], capsys)
    assert code == 0, err
    assert tuple(read_png(png).shape) == (1, 22, 102)
    want = model.sample(20, torch.arange(20) % 10, seed=0)
    save_grid(want, tmp_path / "want.png", nrow=10, levels=model.levels)
    assert torch.equal(read_png(png), read_png(tmp_path / "want.png"))
    # --label 3: every image of class 3
    png = tmp_path / "three.png"
    code, _, err = run(["sample", str(checkpoints["cond"]), "--n", "4", "--label", "3", "--seed", "1",
                        "--temperature", "0.7", "--out", str(png), "--quiet"], capsys)
    assert code == 0, err
    want = model.sample(4, torch.full((4,), 3), seed=1, temperature=0.7)
    save_grid(want, tmp_path / "want3.png", levels=model.levels)
    assert torch.equal(read_png(png), read_png(tmp_path / "want3.png"))


@pytest.mark.parametrize("run_name, args, message", [
    (None, [], "no checkpoint at"),
    ("plain", ["--label", "1"], "is not class-conditional"),
    ("cond", ["--label", "10"], "--label 10 is out of range: the model has 10 classes (0..9)"),
    ("cond", ["--label", "-1"], "--label -1 is out of range"),
    ("plain", ["--n", "0"], "--n must be >= 1, got 0"),
    ("plain", ["--temperature", "0"], "--temperature must be > 0"),
    ("plain", ["--temperature", "-1"], "--temperature must be > 0"),
    ("plain", ["--method", "fast"], "invalid choice: 'fast'"),
])
def test_bad_arguments_are_clear_errors(run_name, args, message, checkpoints, tmp_path, capsys):
    path = str(checkpoints[run_name]) if run_name else str(tmp_path / "nowhere")
    assert_cli_error(["sample", path, "--out", str(tmp_path / "x.png")] + args, message, capsys)
    assert not (tmp_path / "x.png").exists()


def test_a_file_that_is_no_checkpoint(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a checkpoint")
    code, _, err = run(["sample", str(bad)], capsys)
    assert code == 2 and "is not a fastgen training checkpoint" in err and "Traceback" not in err


def test_demo_compares_cached_and_naive_sampling(tmp_path, capsys):
    try:
        load_dataset("binarized-mnist", "test")
    except DatasetMissingError as e:
        pytest.skip(str(e))
    summary = run_demo(steps=2, batch=4, channels=8, layers=1, test_images=8, samples=0, compare_steps=0,
                       sample_batch=2, out=str(tmp_path), quiet=True)
    out = capsys.readouterr().out
    assert "sampling 2 images: cached" in out and "extrapolated from 56 of 784 pixel steps" in out
    assert "warning" not in out
    s = summary["demo_sampling"]
    assert s["images"] == 2 and s["naive_steps_timed"] == 56 and s["pixel_steps"] == 784
    assert s["cached_s"] > 0 and s["cached_images_per_s"] > 0 and s["naive_prefix_s"] > 0
    assert s["naive_s_extrapolated"] == pytest.approx(s["naive_prefix_s"] * 14, abs=0.01)
    assert s["speedup"] > 0 and s["prefix_mismatches"] == 0  # same seed: the same pixels
    assert json.loads((tmp_path / "summary.json").read_text())["demo_sampling"] == s
