"""Every command x every bad input path: exit status 2, a message naming the
problem, no traceback, and nothing written (the checks run before the work).

Commands: train, sample, demo, backends. Bad paths: --out an existing file or
a folder where a file is needed, --out under a file, --out not writable, a
missing / truncated / foreign / newer checkpoint, an unknown backend by flag
and by FASTGEN_BACKEND, a bad seed. The same checkpoint errors come from
``fastgen.train.load_model`` and ``read_checkpoint`` (one reader)."""
import os
import subprocess
import sys

import pytest
import torch

from fastgen.train import TrainError, load_model, read_checkpoint

from conftest import assert_cli_error, run_cli

TINY = ["--steps", "1", "--batch", "16", "--channels", "8", "--layers", "1", "--samples", "0", "--quiet"]
TRAIN = ["train", "pixelcnn", "--data", "digits"] + TINY
DEMO = ["demo", "--steps", "1", "--batch", "4", "--channels", "8", "--layers", "1", "--test-images", "4",
        "--samples", "0", "--compare-steps", "0", "--sample-batch", "0", "--quiet"]


def command(name, tmp_path, out):
    """The args of ``name`` writing to ``out`` (the sample command reads a checkpoint that need not exist:
    its output is checked before the checkpoint is read)."""
    if name == "train":
        return TRAIN + ["--out", str(out)]
    if name == "demo":
        return DEMO + ["--out", str(out)]
    return ["sample", str(tmp_path / "no_run"), "--n", "1", "--quiet", "--out", str(out)]


# ---- output paths ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["train", "sample", "demo"])
def test_out_under_a_file(name, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "sub" / ("grid.png" if name == "sample" else "run")
    assert_cli_error(command(name, tmp_path, out), f"lies under {tmp_path / 'file'}, which is a file, not a folder",
                     capsys)
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("name", ["train", "demo"])
def test_out_folder_that_is_an_existing_file(name, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    assert_cli_error(command(name, tmp_path, tmp_path / "taken"),
                     f"--out {tmp_path / 'taken'} is an existing file; --out names a folder", capsys)
    assert (tmp_path / "taken").read_text() == "x"


def test_sample_out_that_is_a_folder(tmp_path, capsys):
    (tmp_path / "grid.png").mkdir()
    assert_cli_error(command("sample", tmp_path, tmp_path / "grid.png"), "is a folder; --out names the image file",
                     capsys)


@pytest.mark.parametrize("name", ["grid.gif", "grid", "grid.png.bak"])
def test_sample_out_without_an_image_format(name, tmp_path, capsys):
    assert_cli_error(command("sample", tmp_path, tmp_path / name),
                     "cannot tell the image format from the name; name the file .png or .jpg or .jpeg", capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders: the permission case cannot "
                                              "fail here (the other output cases still run)")
@pytest.mark.parametrize("name", ["train", "sample", "demo"])
def test_out_not_writable(name, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        out = locked / ("grid.png" if name == "sample" else "run")
        assert_cli_error(command(name, tmp_path, out), "cannot write in", capsys)
    finally:
        locked.chmod(0o700)


def test_out_checks_use_a_real_write(tmp_path, monkeypatch):
    """check_out asks the file system (a probe file), not only os.access: a read-only mount fails it even for root."""
    from fastgen.train import common as train_mod
    from fastgen.train import OutputError, check_out

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(train_mod.tempfile, "TemporaryFile", refuse)
    with pytest.raises(OutputError, match="--out .*run: cannot write in .*Read-only file system"):
        check_out(tmp_path / "run", folder=True)
    with pytest.raises(OutputError, match="cannot write in"):
        check_out(tmp_path / "grid.png", folder=False)


# ---- checkpoints: one reader, one message -----------------------------------------------------------------------

def _checkpoint_files(tmp_path):
    """{case: (path, message)} of files that are no checkpoint fastgen can read."""
    good = {"format": 1, "model": {"w": torch.ones(64)}, "model_config": {"name": "pixelcnn", "kwargs": {}},
            "optimizer": {}, "scheduler": {}, "step": 1, "rng": [], "args": {}}
    torch.save(good, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    files = {
        "missing": (tmp_path / "nowhere.pt", "no checkpoint at"),
        "empty": (tmp_path / "empty.pt", b""),
        "truncated": (tmp_path / "truncated.pt", data[:len(data) // 2]),
        "text": (tmp_path / "notes.pt", b"these are my notes, not a checkpoint\n"),
    }
    cases = {k: (p, "no checkpoint at") if k == "missing" else (p, "is not a fastgen training checkpoint: torch.load "
                                                                   "cannot read it") for k, (p, _) in files.items()}
    for key, (path, content) in files.items():
        if key != "missing":
            path.write_bytes(content)
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "foreign_dict.pt")
    cases["foreign dict"] = (tmp_path / "foreign_dict.pt", "is not a fastgen training checkpoint: it holds a dict "
                                                           "with keys ['epoch', 'state_dict'], saved by other code")
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    cases["foreign tensor"] = (tmp_path / "tensor.pt", "is not a fastgen training checkpoint: it holds a Tensor")
    torch.save({**good, "format": 2}, tmp_path / "newer.pt")
    cases["newer format"] = (tmp_path / "newer.pt", "has checkpoint format 2; fastgen 0.1.0 reads format 1; it was "
                                                    "written by a newer fastgen: upgrade fastgen")
    damaged = dict(good)
    del damaged["optimizer"]
    torch.save(damaged, tmp_path / "damaged.pt")
    cases["damaged"] = (tmp_path / "damaged.pt", "is a damaged fastgen checkpoint: it lacks optimizer")
    return cases


CASES = ["missing", "empty", "truncated", "text", "foreign dict", "foreign tensor", "newer format", "damaged"]


@pytest.mark.parametrize("case", CASES)
def test_sample_of_a_bad_checkpoint(case, tmp_path, capsys):
    path, message = _checkpoint_files(tmp_path)[case]
    assert_cli_error(["sample", str(path), "--out", str(tmp_path / "g.png"), "--quiet"], message, capsys)
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("case", CASES)
def test_resume_of_a_bad_checkpoint(case, tmp_path, capsys):
    path, message = _checkpoint_files(tmp_path)[case]
    run = tmp_path / "run"
    run.mkdir()
    if path.exists():
        os.replace(path, run / "checkpoint.pt")
    assert_cli_error(["train", "pixelcnn", "--resume", "--out", str(run)], message, capsys)


@pytest.mark.parametrize("case", CASES)
def test_load_model_and_read_checkpoint_of_a_bad_checkpoint(case, tmp_path):
    path, message = _checkpoint_files(tmp_path)[case]
    for read in (load_model, read_checkpoint):
        with pytest.raises(TrainError) as e:
            read(path)
        assert message in str(e.value)


def test_a_checkpoint_whose_model_cannot_be_rebuilt(tmp_path):
    ckpt = {"format": 1, "model": {"w": torch.ones(2)}, "model_config": {"name": "pixelcnn", "kwargs": {
        "image_shape": [1, 8, 8], "no_such_option": 1}}, "optimizer": {}, "scheduler": {}, "step": 1, "rng": [],
        "args": {}}
    torch.save(ckpt, tmp_path / "odd.pt")
    with pytest.raises(TrainError, match="the checkpoint's model cannot be rebuilt"):
        load_model(tmp_path / "odd.pt")


# ---- backends and seeds --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["train", "sample", "demo"])
def test_unknown_backend_flag(name, tmp_path, capsys):
    out = tmp_path / ("g.png" if name == "sample" else "run")
    assert_cli_error(command(name, tmp_path, out) + ["--backend", "nope"],
                     "unknown backend 'nope' (--backend); fastgen's backends: ", capsys)
    assert not out.exists()


@pytest.mark.parametrize("name", ["train", "sample", "demo", "backends"])
def test_unknown_backend_in_the_environment(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTGEN_BACKEND", "nope")
    out = tmp_path / ("g.png" if name == "sample" else "run")
    args = ["backends"] if name == "backends" else command(name, tmp_path, out)
    code, stdout, err = run_cli(args, capsys)
    assert code == 2 and "FASTGEN_BACKEND='nope' is no backend of any op; fastgen's backends: " in err
    assert "Traceback" not in err and "backend dispatch" not in stdout and not out.exists()


def test_a_forced_backend_is_printed_with_its_source(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTGEN_BACKEND", "ref")
    code, stdout, err = run_cli(TRAIN + ["--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    assert "backend ref (forced by FASTGEN_BACKEND)" in stdout
    code, stdout, err = run_cli(TRAIN + ["--out", str(tmp_path / "b"), "--backend", "cpp"], capsys)
    assert code == 0, err
    assert "backend cpp (forced by --backend)" in stdout


@pytest.mark.parametrize("name", ["train", "sample", "demo"])
@pytest.mark.parametrize("seed", ["-1", str(2 ** 63)])
def test_bad_seed(name, seed, tmp_path, capsys):
    out = tmp_path / ("g.png" if name == "sample" else "run")
    assert_cli_error(command(name, tmp_path, out) + ["--seed", seed],
                     f"--seed: seed must be an int in [0, 2**63), got {seed}", capsys)
    assert not out.exists()


# ---- the real process: stderr has the message and no traceback ---------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["sample", "{tmp}/notes.pt", "--out", "{tmp}/g.png"], "is not a fastgen training checkpoint"),
    (["train", "pixelcnn", "--data", "digits", "--out", "{tmp}/notes.pt"], "is an existing file"),
    (["backends"], "FASTGEN_BACKEND='nope' is no backend of any op"),
])
def test_the_process_exits_2_without_a_traceback(args, message, tmp_path):
    (tmp_path / "notes.pt").write_text("notes")
    env = dict(os.environ, FASTGEN_BACKEND="nope") if args == ["backends"] else dict(os.environ)
    env.pop("FASTGEN_BACKEND", None) if args != ["backends"] else None
    proc = subprocess.run([sys.executable, "-m", "fastgen"] + [a.format(tmp=tmp_path) for a in args],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr and "Traceback" not in proc.stderr
