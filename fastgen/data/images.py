"""PNG in and out without Pillow: a minimal encoder/decoder on zlib + struct.

Decoder: non-interlaced PNGs of every colour type (grey, grey+alpha, RGB,
RGBA, palette), bit depths 1/2/4/8 (grey, palette) and 8/16 (all), all five
row filters. 16-bit samples keep their high byte; sub-byte grey is scaled to
0..255. Ancillary chunks (gamma, text, ...) are ignored. Encoder: 8-bit grey,
grey+alpha, RGB or RGBA, filter 0 on every row (zlib does the compressing).
"""
import math
import os
import struct
import zlib

import numpy as np
import torch

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# colour type -> (samples per pixel, allowed bit depths)
COLOR_TYPES = {0: (1, (1, 2, 4, 8, 16)), 2: (3, (8, 16)), 3: (1, (1, 2, 4, 8)), 4: (2, (8, 16)), 6: (4, (8, 16))}
_TYPE_FOR_CHANNELS = {1: 0, 2: 4, 3: 2, 4: 6}


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image):
    """PNG bytes of a uint8 [C, H, W] image; C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA."""
    a = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim != 3 or a.shape[0] not in _TYPE_FOR_CHANNELS or a.dtype != np.uint8:
        raise ValueError(f"encode_png: need uint8 [C, H, W] with C in 1..4, got {a.dtype} {tuple(a.shape)}")
    c, h, w = a.shape
    if h < 1 or w < 1:
        raise ValueError(f"encode_png: empty image {tuple(a.shape)}")
    rows = np.ascontiguousarray(a.transpose(1, 2, 0)).reshape(h, w * c)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1)  # filter byte 0 = None on each row
    header = struct.pack(">IIBBBBB", w, h, 8, _TYPE_FOR_CHANNELS[c], 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + _chunk(b"IEND", b"")


def write_png(path, image):
    """Write a uint8 [C, H, W] image (C = 1, 2, 3 or 4) as a PNG file."""
    with open(path, "wb") as f:
        f.write(encode_png(image))


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _unfilter(raw, height, row_bytes, bpp, where):
    """Undo the per-row filters: [height, row_bytes] uint8. ``bpp``: bytes per
    complete pixel (at least 1), the distance to the 'left' byte."""
    stride = row_bytes + 1
    out = np.empty((height, row_bytes), np.uint8)
    prev = np.zeros(row_bytes, np.uint8)
    for y in range(height):
        kind = raw[y * stride]
        line = np.frombuffer(raw, np.uint8, row_bytes, y * stride + 1)
        if kind == 0:  # None
            cur = line
        elif kind == 1:  # Sub: x + left; a running sum per byte position within a pixel, mod 256
            cur = np.cumsum(line.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:  # Up: x + above
            cur = line + prev
        elif kind in (3, 4):  # Average / Paeth depend on the just-decoded left byte: a plain loop
            cur_b, up = bytearray(line.tobytes()), prev.tolist()
            for i in range(row_bytes):
                left = cur_b[i - bpp] if i >= bpp else 0
                if kind == 3:
                    pred = (left + up[i]) >> 1
                else:
                    pred = _paeth(left, up[i], up[i - bpp] if i >= bpp else 0)
                cur_b[i] = (cur_b[i] + pred) & 0xFF
            cur = np.frombuffer(bytes(cur_b), np.uint8)
        else:
            raise ValueError(f"{where}: row {y} has filter type {kind}; PNG defines 0..4")
        out[y] = cur
        prev = out[y]
    return out


def decode_png(data, where="PNG"):
    """uint8 [C, H, W] numpy array of PNG bytes. C: 1 grey, 2 grey+alpha,
    3 RGB (also palette), 4 RGBA (also palette with transparency)."""
    if data[:8] != SIGNATURE:
        raise ValueError(f"{where}: not a PNG file (bad signature)")
    pos, header, palette, alpha, idat = 8, None, None, None, []
    while True:
        if pos + 8 > len(data):
            raise ValueError(f"{where}: truncated PNG (no IEND chunk)")
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        crc = data[pos + 8 + length:pos + 12 + length]
        if len(body) != length or len(crc) != 4:
            raise ValueError(f"{where}: truncated {kind!r} chunk")
        if struct.unpack(">I", crc)[0] != zlib.crc32(kind + body):
            raise ValueError(f"{where}: CRC mismatch in {kind!r} chunk (corrupt file)")
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = np.frombuffer(body, np.uint8).reshape(-1, 3)
        elif kind == b"tRNS":
            alpha = np.frombuffer(body, np.uint8)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        elif not kind[0] & 0x20:  # upper-case first letter: a critical chunk we do not know
            raise ValueError(f"{where}: unsupported critical chunk {kind!r}")
    if header is None:
        raise ValueError(f"{where}: no IHDR chunk")
    width, height, depth, color, compression, filtering, interlace = header
    if color not in COLOR_TYPES or depth not in COLOR_TYPES[color][1]:
        raise ValueError(f"{where}: colour type {color} with bit depth {depth} is not valid PNG")
    if compression != 0 or filtering != 0:
        raise ValueError(f"{where}: unknown compression/filter method {compression}/{filtering}")
    if interlace != 0:
        raise ValueError(f"{where}: interlaced (Adam7) PNGs are not supported; save it non-interlaced")
    if color == 3 and palette is None:
        raise ValueError(f"{where}: palette image without a PLTE chunk")

    samples = COLOR_TYPES[color][0]
    bits = samples * depth
    row_bytes = (width * bits + 7) // 8
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise ValueError(f"{where}: corrupt image data ({e})") from None
    if len(raw) != height * (row_bytes + 1):
        raise ValueError(f"{where}: image data has {len(raw)} bytes, {width}x{height} needs {height * (row_bytes + 1)}")
    rows = _unfilter(raw, height, row_bytes, max(1, bits // 8), where)

    if depth == 16:  # keep the high byte of each big-endian sample
        px = rows.reshape(height, width, samples, 2)[..., 0]
    elif depth == 8:
        px = rows.reshape(height, width, samples)
    else:  # 1, 2 or 4 bits: one sample per pixel (grey or palette index), packed from the high bits
        per_byte = 8 // depth
        shifts = np.arange(8 - depth, -1, -depth, dtype=np.uint8)
        unpacked = (rows[:, :, None] >> shifts) & ((1 << depth) - 1)
        px = unpacked.reshape(height, row_bytes * per_byte)[:, :width, None]
        if color == 0:
            px = (px.astype(np.uint16) * 255 // ((1 << depth) - 1)).astype(np.uint8)
    if color == 3:
        index = px[..., 0]
        if index.size and int(index.max()) >= len(palette):
            raise ValueError(f"{where}: palette index {int(index.max())} but the palette has {len(palette)} entries")
        px = palette[index]
        if alpha is not None:  # tRNS: alpha per palette entry, opaque past its end
            table = np.full(len(palette), 255, np.uint8)
            table[:min(len(alpha), len(palette))] = alpha[:len(palette)]
            px = np.concatenate([px, table[index][..., None]], axis=2)
    return np.ascontiguousarray(px.transpose(2, 0, 1))


def read_png(path):
    """uint8 tensor [C, H, W] of a PNG file: C = 1 grey, 2 grey+alpha,
    3 RGB or palette, 4 RGBA or palette with transparency."""
    with open(path, "rb") as f:
        data = f.read()
    return torch.from_numpy(decode_png(data, where=os.fspath(path)))


def to_uint8_255(images, levels=256, what="images"):
    """uint8 0..255 tensor of images that are integer 0..levels-1 (scaled by
    255/(levels-1)) or float in [0, 1] (scaled by 255)."""
    x = torch.as_tensor(images).detach().cpu()
    if x.is_floating_point():
        if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise ValueError(f"{what}: float images must lie in [0, 1], found [{x.min().item()}, {x.max().item()}]")
        return (x.double() * 255).round().to(torch.uint8)
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    if not 2 <= levels <= 256:
        raise ValueError(f"{what}: levels must be 2..256, got {levels}")
    if x.numel() and (x.min() < 0 or x.max() > levels - 1):
        raise ValueError(f"{what}: integer images must lie in 0..{levels - 1} (levels={levels}), "
                         f"found {x.min().item()}..{x.max().item()}")
    if levels == 256:
        return x.to(torch.uint8)
    return (x.double() * (255 / (levels - 1))).round().to(torch.uint8)


def save_grid(images, path, nrow=None, padding=2, levels=256, pad_value=0):
    """Write images [N, C, H, W] (or one [C, H, W]; C = 1 grey or 3 RGB) as
    one PNG grid, ``nrow`` images per row (default ceil(sqrt(N))), ``padding``
    pixels of ``pad_value`` (0..255) around each. Integer images hold
    0..levels-1 (levels=2 for binarized) and are scaled to 0..255; float
    images lie in [0, 1]. Returns the grid as uint8 [C, H', W']."""
    x = torch.as_tensor(images)
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[0] < 1:
        raise ValueError(f"save_grid: images must be [N, C, H, W] or [C, H, W] with C = 1 or 3 and N >= 1, "
                         f"got shape {tuple(x.shape)}")
    if padding < 0 or not 0 <= pad_value <= 255:
        raise ValueError(f"save_grid: padding must be >= 0 and pad_value 0..255, got {padding}, {pad_value}")
    x = to_uint8_255(x, levels, "save_grid")
    n, c, h, w = x.shape
    ncol = nrow or math.ceil(math.sqrt(n))
    if ncol < 1:
        raise ValueError(f"save_grid: nrow must be >= 1, got {nrow}")
    nrows = math.ceil(n / ncol)
    size = (c, nrows * (h + padding) + padding, ncol * (w + padding) + padding)
    grid = torch.full(size, pad_value, dtype=torch.uint8)
    for i in range(n):
        top, left = padding + (i // ncol) * (h + padding), padding + (i % ncol) * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    write_png(path, grid)
    return grid
