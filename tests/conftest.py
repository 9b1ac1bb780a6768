import json
import os
import struct

import pytest
import torch

from fastgen import cli
from fastgen.data import DatasetMissingError, load_dataset
from fastgen.ops.masked_conv import OP as MASKED_CONV


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need a CUDA device: skipped, with the reason, where there is none (a CUDA build of
    torch on a machine without a GPU, as `make cuda-build` runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def require_backend(op, name, call=None):
    """Skip a test whose backend cannot run here, unless the run says it must
    (``make test`` builds the extension and sets FASTGEN_REQUIRE=cpp)."""
    why = op.reason(name, call)
    if why is None:
        return
    if name in os.environ.get("FASTGEN_REQUIRE", "").split(","):
        pytest.fail(f"backend {name} is required in this run but unavailable: {why}")
    pytest.skip(f"backend {name}: {why}")


def require_mnist():
    """Skip a test that needs MNIST where it is not installed."""
    from fastgen.data import mnist
    try:
        mnist.mnist_path()
    except DatasetMissingError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def judge_cache(tmp_path_factory):
    """A fresh $FASTGEN_CACHE for the session's GAN judges (fastgen.metrics; none in memory before or after):
    the MNIST judge trains once (about a minute) for tests/test_metrics.py and tests/test_gan.py together."""
    from fastgen.metrics import clear_memory
    folder = tmp_path_factory.mktemp("fastgen-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTGEN_CACHE", str(folder))
        clear_memory()
        yield folder
        clear_memory()


@pytest.fixture(scope="session")
def mnist_judge(judge_cache):
    from fastgen.metrics import judge
    require_mnist()
    return judge("mnist")


@pytest.fixture
def masked_conv_op():
    return MASKED_CONV


# ---- the command line (tests/test_train.py, test_vae.py, test_pixelcnnpp.py) -------------------------------

def run_cli(args, capsys):
    """``python -m fastgen ARGS`` in this process: (exit code, stdout, stderr)."""
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_cli_error(args, message, capsys):
    """``python -m fastgen ARGS`` exits 2 with ``message`` on stderr and no traceback."""
    code, _, err = run_cli(args, capsys)
    assert code == 2 and message in err and "Traceback" not in err


def train_metrics(out, *keys):
    """(step, loss_nats, then ``keys``) of every train line of out/metrics.jsonl."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss_nats"], *(r[k] for k in keys)) for r in lines if r["kind"] == "train"]


def png_size(path):
    """(width, height) of a PNG file (checking its signature)."""
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", png[16:24])


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8x8 digits, test split."""
    try:
        return load_dataset("digits", "test")
    except DatasetMissingError as e:
        pytest.skip(str(e))


def mnist_train(n):
    """The first ``n`` MNIST training images (uint8 [n, 1, 28, 28]) and labels; skips where MNIST is missing."""
    from fastgen.data import load_mnist
    try:
        images, labels = load_mnist("train")
    except DatasetMissingError as e:
        pytest.skip(str(e))
    return images[:n].clone(), labels[:n].clone()


def mnist_crops(n=8):
    """16x16 centre crops of the first ``n`` MNIST training images, and their labels: fast on 2 cores."""
    images, labels = mnist_train(n)
    return images[:, :, 4:20, 4:20].clone(), labels
