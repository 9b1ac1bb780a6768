"""A user's own images: an .npz file, IDX files or a folder of PNG / JPEG / BMP images.

Each source yields images uint8 [N, C, H, W] (C = 1 or 3) and int64 labels [N].

- NPZ: images under 'images', 'x' or 'data'; labels under 'labels', 'y' or
  'targets' (none: all 0). Ready-made splits are read from the same names with
  a '_train' / '_test' suffix ('x_train', 'y_test', ..., as in Keras'
  mnist.npz). Images [N, H, W], [N, H, W, C] (channels-last) or [N, C, H, W],
  C = 1 or 3 (when both dims 1 and 3 could be C, [N, C, H, W] wins); uint8, any
  integer type holding 0..255, bool, or float in [0, 1] (scaled by 255).
- IDX: an images file (magic 0x00000803, optionally gzipped); its labels are
  the file named like it with 'images' -> 'labels', 'idx3' -> 'idx1' (none:
  all 0). Or a folder holding train-images-idx3-ubyte[.gz] and
  t10k-(or test-)images-idx3-ubyte[.gz] with their labels files: ready-made splits.
- image folder (.png, .jpg, .jpeg, .bmp files, read with Pillow): labels from
  the sub-folder names, sorted, -> 0..K-1, or all 0 when the images lie
  directly in the folder. Sub-folders exactly 'train' and
  'test' are ready-made splits (each flat or with class sub-folders). All
  images must have the same size; alpha is dropped; grey images are widened
  to RGB when the folder also holds colour ones.

A source without ready-made splits is split deterministically: 'test' =
images 0, 10, 20, ... (every 10th, from the first), 'train' = the rest; 'all'
= everything. With ready-made splits, 'all' = train followed by test.
"""
import os
from typing import List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from fastgen.data.errors import DatasetMissingError
from fastgen.data.idx import is_idx, labels_path_for, read_idx
from fastgen.data.images import READ_SUFFIXES, read_image

SPLITS = ("train", "test", "all")
IMAGE_KEYS = ("images", "x", "data")
LABEL_KEYS = ("labels", "y", "targets")
KINDS = ("an .npz file, an IDX images file (optionally .gz), a folder with train-/t10k-images-idx3-ubyte "
         "IDX files, or a folder of PNG / JPEG / BMP images")


def as_images(array, where):
    """uint8 tensor [N, C, H, W] of an image array in one of the accepted layouts and dtypes."""
    a = np.asarray(array)
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4:
        if a.shape[1] not in (1, 3):
            if a.shape[3] not in (1, 3):
                raise ValueError(f"{where}: 4-D images must be [N, C, H, W] or [N, H, W, C] with C = 1 or 3, "
                                 f"got shape {a.shape}")
            a = a.transpose(0, 3, 1, 2)  # channels-last
    else:
        raise ValueError(f"{where}: images must be [N, H, W], [N, H, W, C] or [N, C, H, W], got shape {a.shape}")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError(f"{where}: integer images must lie in 0..255, found {a.min()}..{a.max()}")
    elif np.issubdtype(a.dtype, np.floating):
        if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 1):
            raise ValueError(f"{where}: float images must lie in [0, 1] (they are scaled by 255), found "
                             f"[{a.min()}, {a.max()}]; store 0..255 data as uint8")
        a = np.rint(a.astype(np.float64) * 255)
    else:
        raise ValueError(f"{where}: images must be uint8, integer, bool or float, got {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.uint8)
    return torch.from_numpy(a if a.flags.writeable else a.copy())  # IDX data is a read-only view of the file


def as_labels(array, n, where):
    """int64 tensor [n] of a label array (integers >= 0)."""
    a = np.asarray(array)
    if a.ndim != 1 or len(a) != n:
        raise ValueError(f"{where}: labels must be 1-D with one per image ({n}), got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise ValueError(f"{where}: labels must be integers, got {a.dtype}")
    labels = torch.from_numpy(a.astype(np.int64))
    if n and labels.min() < 0:
        raise ValueError(f"{where}: labels must be >= 0, found {labels.min().item()}")
    return labels


# --- NPZ ---------------------------------------------------------------------------------------

def _npz(path):
    with np.load(path, allow_pickle=False) as z:  # no pickles: a .npz must not run code
        arrays = {k: z[k] for k in z.files}

    def find(keys, suffix):
        for k in keys:
            if k + suffix in arrays:
                return k + suffix
        return None

    parts = {}
    for split, suffix in (("train", "_train"), ("test", "_test"), ("all", "")):
        key = find(IMAGE_KEYS, suffix)
        if key is None:
            continue
        where = f"{path} [{key!r}]"
        images = as_images(arrays[key], where)
        lkey = find(LABEL_KEYS, suffix)
        labels = (as_labels(arrays[lkey], len(images), f"{path} [{lkey!r}]") if lkey is not None
                  else torch.zeros(len(images), dtype=torch.int64))
        parts[split] = (images, labels)
    if "train" in parts and "test" in parts:
        return {s: parts[s] for s in ("train", "test")}
    if "all" in parts:
        return {"all": parts["all"]}
    raise ValueError(f"{path}: no image array found; arrays present: {sorted(arrays)}; images are read from "
                     f"{' / '.join(IMAGE_KEYS)} (or x_train and x_test ...), labels from {' / '.join(LABEL_KEYS)}")


# --- IDX ---------------------------------------------------------------------------------------

def load_idx(images_path: "str | os.PathLike[str]", labels_path: "str | os.PathLike[str] | None" = None
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, C, H, W], labels int64 [N]) of an IDX images file and
    its labels file (None: all 0). Both may be gzipped."""
    images = as_images(read_idx(images_path), os.fspath(images_path))
    if labels_path is None:
        return images, torch.zeros(len(images), dtype=torch.int64)
    return images, as_labels(read_idx(labels_path), len(images), os.fspath(labels_path))


def find_idx_pair(folder, prefixes):
    """(images, labels) paths of one split in an IDX folder, trying each
    prefix ('train', 't10k', ...) with '-' or '.' before 'idx3', with or
    without .gz; None if there is no images file."""
    for prefix in prefixes:
        for sep in ("-", "."):
            for gz in (".gz", ""):
                path = os.path.join(folder, f"{prefix}-images{sep}idx3-ubyte{gz}")
                if os.path.isfile(path):
                    return path, labels_path_for(path)
    return None


IDX_SPLIT_PREFIXES = {"train": ("train",), "test": ("t10k", "test")}


def _idx_folder(folder):
    found = {s: find_idx_pair(folder, p) for s, p in IDX_SPLIT_PREFIXES.items()}
    if found["train"] is None or found["test"] is None:
        return None
    return {s: load_idx(*pair) for s, pair in found.items()}


# --- image folder --------------------------------------------------------------------------------

def _listing(folder):
    """(sub-folders, image files) directly in ``folder``, sorted, hidden entries skipped."""
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    dirs = [n for n in names if os.path.isdir(os.path.join(folder, n))]
    images = [n for n in names if n.lower().endswith(READ_SUFFIXES) and os.path.isfile(os.path.join(folder, n))]
    return dirs, images


def _scan_images(folder):
    """{class name or None: [image paths]} of a flat or class-per-sub-folder folder."""
    dirs, files = _listing(folder)
    if dirs and files:
        raise ValueError(f"{folder}: holds both image files and sub-folders ({', '.join(dirs[:5])}); put every image "
                         f"in a class sub-folder, or all of them directly in the folder")
    if files:
        return {None: [os.path.join(folder, n) for n in files]}
    return {d: [os.path.join(folder, d, n) for n in _listing(os.path.join(folder, d))[1]] for d in dirs}


def _decode_images(paths, where):
    """uint8 [N, C, H, W] of image files that share one size; alpha dropped,
    grey widened to RGB when any image has colour."""
    images = [read_image(p) for p in paths]
    images = [x[:1] if x.shape[0] == 2 else x[:3] for x in images]  # drop alpha
    first = images[0]
    for p, x in zip(paths, images):
        if x.shape[1:] != first.shape[1:]:
            raise ValueError(f"{where}: images differ in size: {paths[0]} is {first.shape[2]}x{first.shape[1]}, "
                             f"{p} is {x.shape[2]}x{x.shape[1]} (width x height); all must have the same size")
    if any(x.shape[0] == 3 for x in images):
        images = [x.expand(3, -1, -1) for x in images]
    return torch.stack(images)


def _image_folder(folder):
    dirs, files = _listing(folder)
    if set(dirs) == {"train", "test"} and not files:
        scans = {s: _scan_images(os.path.join(folder, s)) for s in ("train", "test")}
    else:
        scans = {"all": _scan_images(folder)}
    flat = {None in scan for scan in scans.values()}
    if len(flat) > 1:
        raise ValueError(f"{folder}: 'train' and 'test' must both be flat or both have class sub-folders")
    classes = sorted({c for scan in scans.values() for c in scan if c is not None})
    label_of = {None: 0, **{c: i for i, c in enumerate(classes)}}
    parts, paths = {}, {}
    for split, scan in scans.items():
        paths[split] = [(p, label_of[c]) for c in sorted(scan, key=str) for p in scan[c]]
        if not paths[split]:
            raise ValueError(f"{folder}: no images ({', '.join(READ_SUFFIXES)}) found" + ("" if split == "all" else f" under {split}/"))
    all_paths = [p for split in scans for p, _ in paths[split]]
    decoded = _decode_images(all_paths, folder)  # decoded together: one size and channel count for every split
    start = 0
    for split in scans:
        n = len(paths[split])
        parts[split] = (decoded[start:start + n], torch.tensor([l for _, l in paths[split]], dtype=torch.int64))
        start += n
    return parts, (classes or None)


# --- entry point -------------------------------------------------------------------------------

class FileData(NamedTuple):
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    num_classes: int  # number of class folders, else largest label + 1 over every split (at least 1)
    levels: int  # 2 when every pixel of every split is 0 or 1, else 256
    classes: Optional[List[str]]  # class sub-folder names of an image folder, else None


def load_files(root: "str | os.PathLike[str] | None", split: str = "all") -> "FileData":
    """One split of a user's files as a FileData; ``root``: see the module
    docstring; ``split``: 'train', 'test' or 'all'."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} for user files, got {split!r}")
    if root is None:
        raise ValueError(f"dataset 'files' needs root=: {KINDS}")
    path = os.fspath(root)
    if not os.path.exists(path):
        raise DatasetMissingError(f"no such file or folder: {path} (user files are {KINDS})")
    classes = None
    if os.path.isdir(path):
        parts = _idx_folder(path)
        if parts is None:
            parts, classes = _image_folder(path)
    elif path.lower().endswith(".npz"):
        parts = _npz(path)
    elif is_idx(path):
        parts = {"all": load_idx(path, labels_path_for(path))}
    else:
        raise ValueError(f"{path}: not a recognized file; user files are {KINDS}")
    shapes = {tuple(x.shape[1:]) for x, _ in parts.values()}
    if len(shapes) > 1:
        raise ValueError(f"{path}: the splits have different image shapes {sorted(shapes)}; they must match")
    most = max((int(y.max()) for _, y in parts.values() if len(y)), default=0)
    num_classes = len(classes) if classes else most + 1
    binary = all(len(x) == 0 or int(x.max()) <= 1 for x, _ in parts.values())
    images, labels = _pick(parts, split, path)
    return FileData(images, labels, num_classes, 2 if binary else 256, classes)


def _pick(parts, split, where):
    """One split of ``parts``: ready-made ('train'/'test') or from 'all' by the every-10th rule."""
    if "all" not in parts:
        if split == "all":
            return torch.cat([parts["train"][0], parts["test"][0]]), torch.cat([parts["train"][1], parts["test"][1]])
        return parts[split]
    images, labels = parts["all"]
    if split == "all":
        return images, labels
    keep = (torch.arange(len(images)) % 10 == 0) == (split == "test")
    if not keep.any():
        raise ValueError(f"{where}: split {split!r} is empty ({len(images)} images; 'test' takes images 0, 10, 20, "
                         f"..., 'train' the rest); use split='all'")
    return images[keep], labels[keep]
