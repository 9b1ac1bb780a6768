"""Image files in and out through Pillow, as uint8 tensors [C, H, W].

Reading (:func:`read_image`): any file Pillow opens (PNG, JPEG, BMP, ...);
C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA; palette images become RGB (RGBA when
the palette has transparency); 16-bit grey keeps its high byte (as Pillow does
for 16-bit colour). Writing (:func:`write_image`, :func:`save_grid`): the
format the file name says, PNG (``.png``) or JPEG (``.jpg``, ``.jpeg``;
lossy, no alpha); any other name is an error listing these. ``read_png`` and
``write_png`` are the same functions under their older names.
"""
import math
import os
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

PathLike = Union[str, "os.PathLike[str]"]
# file name suffix -> Pillow format
WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
READ_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")  # what a folder of a user's images is scanned for
_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
JPEG_QUALITY = 95


def image_format(path: PathLike, channels: Optional[int] = None) -> str:
    """The Pillow format that writes ``path`` (from its suffix), or a ValueError
    saying which names are allowed. ``channels``: refuse JPEG for alpha."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in WRITE_FORMATS:
        raise ValueError(f"{os.fspath(path)}: cannot tell the image format from the name; name the file "
                         f"{' or '.join(WRITE_FORMATS)} (PNG or JPEG)")
    fmt = WRITE_FORMATS[suffix]
    if fmt == "JPEG" and channels in (2, 4):
        raise ValueError(f"{os.fspath(path)}: JPEG has no alpha channel; write a .png for a {channels}-channel image")
    return fmt


def write_image(path: PathLike, image: torch.Tensor) -> None:
    """Write a uint8 [C, H, W] image (C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA)
    as the format its name says (.png, or .jpg/.jpeg for C = 1 or 3)."""
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim != 3 or a.shape[0] not in _MODES or a.dtype != np.uint8 or min(a.shape[1:]) < 1:
        raise ValueError(f"write_image: need a non-empty uint8 [C, H, W] image with C in 1..4, got "
                         f"{a.dtype} {tuple(a.shape)}")
    fmt = image_format(path, a.shape[0])
    pixels = np.ascontiguousarray(a.transpose(1, 2, 0))
    pil = Image.fromarray(pixels[..., 0] if a.shape[0] == 1 else pixels, _MODES[a.shape[0]])
    pil.save(path, fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))


def read_image(path: PathLike) -> torch.Tensor:
    """uint8 tensor [C, H, W] of an image file (see the module docstring for C);
    a ValueError naming the file when it is no image Pillow reads."""
    where = os.fspath(path)
    try:
        with Image.open(path) as pil:
            pil.load()
            array = _pixels(pil, where)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # Pillow's errors for bad or truncated files
        raise ValueError(f"{where}: not a readable image ({e})") from None
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _pixels(pil, where):
    """[H, W, C] uint8 of an opened image."""
    mode = pil.mode
    if mode.startswith("I;16"):  # 16-bit grey: the high byte
        return (np.array(pil).astype(np.uint16) >> 8).astype(np.uint8)[..., None]
    if mode in ("I", "F"):
        raise ValueError(f"{where}: {'32-bit integer' if mode == 'I' else 'floating-point'} images (mode {mode}) "
                         f"are not 8- or 16-bit images; store them as 8-bit PNG, JPEG or BMP")
    if mode == "P":
        pil = pil.convert("RGBA" if "transparency" in pil.info else "RGB")
    elif mode == "PA":
        pil = pil.convert("RGBA")
    elif mode == "1":
        pil = pil.convert("L")
    elif mode in ("La", "RGBa"):  # premultiplied alpha
        pil = pil.convert(mode.upper())
    elif mode not in ("L", "LA", "RGB", "RGBA"):  # CMYK, YCbCr, LAB, ...: shown as RGB
        pil = pil.convert("RGB")
    a = np.array(pil)  # a copy: writable, as torch wants
    return a[..., None] if a.ndim == 2 else a


# the names of the PNG-only codec these functions replaced
read_png = read_image
write_png = write_image


def to_uint8_255(images, levels: int = 256, what: str = "images") -> torch.Tensor:
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


def save_grid(images, path: PathLike, nrow: Optional[int] = None, padding: int = 2, levels: int = 256,
              pad_value: int = 0) -> torch.Tensor:
    """Write images [N, C, H, W] (or one [C, H, W]; C = 1 grey or 3 RGB) as
    one image grid (PNG or JPEG, by the name), ``nrow`` images per row
    (default ceil(sqrt(N))), ``padding`` pixels of ``pad_value`` (0..255)
    around each. Integer images hold 0..levels-1 (levels=2 for binarized) and
    are scaled to 0..255; float images lie in [0, 1]. Returns the grid as
    uint8 [C, H', W']."""
    image_format(path)  # a name that says no format fails before any work
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
    write_image(path, grid)
    return grid
