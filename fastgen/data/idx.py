"""IDX files, the format of MNIST and Fashion-MNIST, plain or gzipped.

Layout: two zero bytes, a type byte (0x08 = uint8, ...), the number of
dimensions, then each dimension as a big-endian uint32, then the data
(big-endian). Images are 0x00000803 (uint8 [N, H, W]), labels 0x00000801
(uint8 [N]). Gzip is recognized by its magic bytes, not by the file name.
"""
import gzip
import os
import struct

import numpy as np

# IDX type byte -> numpy dtype (multi-byte types are big-endian)
DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
          0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_CODES = {dt.str.lstrip("<>|="): code for code, dt in DTYPES.items()}
GZIP_MAGIC = b"\x1f\x8b"


def read_bytes(path):
    """The file's bytes, gunzipped when it starts with the gzip magic."""
    with open(path, "rb") as f:
        data = f.read()
    return gzip.decompress(data) if data[:2] == GZIP_MAGIC else data


def is_idx(path):
    """Whether ``path`` looks like an IDX file (checks only the magic)."""
    try:
        head = read_bytes(path)[:4]
    except (OSError, EOFError, gzip.BadGzipFile):
        return False
    return len(head) == 4 and head[:2] == b"\0\0" and head[2] in DTYPES and head[3] >= 1


def read_idx(path: "str | os.PathLike[str]") -> np.ndarray:
    """The array stored in an IDX file (gzipped or not), as numpy."""
    data = read_bytes(path)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in DTYPES or data[3] < 1:
        raise ValueError(f"{path}: not an IDX file (first bytes {data[:4].hex()}; expected 0000 <type> <ndim>, "
                         f"e.g. 00000803 for uint8 images [N, H, W], 00000801 for uint8 labels [N])")
    dtype, ndim = DTYPES[data[2]], data[3]
    start = 4 + 4 * ndim
    if len(data) < start:
        raise ValueError(f"{path}: IDX header truncated ({len(data)} bytes, {ndim} dimensions need {start})")
    dims = struct.unpack(f">{ndim}I", data[4:start])
    size = int(np.prod(dims)) * dtype.itemsize
    if len(data) != start + size:
        raise ValueError(f"{path}: IDX dimensions {dims} of {dtype} need {size} data bytes, "
                         f"the file has {len(data) - start}")
    return np.frombuffer(data, dtype, offset=start).reshape(dims)


def write_idx(path: "str | os.PathLike[str]", array: np.ndarray) -> None:
    """Write ``array`` as an IDX file; gzipped when ``path`` ends in .gz."""
    a = np.asarray(array)
    key = a.dtype.str.lstrip("<>|=")
    if key not in _CODES or a.ndim < 1 or a.ndim > 255:
        raise ValueError(f"write_idx: unsupported array {a.dtype} {a.shape}: IDX holds 1..255-D arrays of "
                         f"uint8, int8, int16, int32, float32, float64")
    code = _CODES[key]
    data = struct.pack(f">BBBB{a.ndim}I", 0, 0, code, a.ndim, *a.shape)
    data += np.ascontiguousarray(a, dtype=DTYPES[code]).tobytes()
    if str(path).endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    with open(path, "wb") as f:
        f.write(data)


def labels_path_for(images_path):
    """The labels file that goes with an images file by the MNIST naming
    (train-images-idx3-ubyte[.gz] -> train-labels-idx1-ubyte[.gz]), or None."""
    folder, name = os.path.split(str(images_path))
    if "images" not in name:
        return None
    base = name.replace("images", "labels").replace("idx3", "idx1")
    stem = base[:-3] if base.endswith(".gz") else base
    for candidate in (base, stem, stem + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None
