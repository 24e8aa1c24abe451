"""Image files to RGB pictures: EXIF orientation, every mode to RGB (16-bit grayscale scaled, not
clipped), sizes read without decoding the pixels, and box crops. A failure is a
:class:`cars_tl.core.errors.BadImageError` naming the file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cars_tl.core.errors import BadImageError

_EXIF_ORIENTATION = 0x0112


def open_image(path: Path):
    """Open an image as RGB with its EXIF orientation applied.

    Grayscale, CMYK, palette and alpha modes all become RGB (alpha composited on white); 16-bit
    grayscale (modes ``I;16*`` and ``I``, as Pillow opens 16-bit PNGs) is scaled to 8 bits
    (value / 257) rather than clipped to white. Pillow's decompression-bomb limit stays on. Any
    decoding failure raises :class:`BadImageError` naming the file.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc) or type(exc).__name__
        if os.path.exists(path) and os.path.getsize(path) == 0:
            reason = "empty file (0 bytes)"
        raise BadImageError(path, reason) from None
    if im.mode.startswith("I"):  # 16-bit samples (0..65535): convert("L") would clip them at 255
        scaled = np.clip(np.asarray(im, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        im = Image.fromarray(scaled.reshape(im.height, im.width), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB") if im.mode != "RGB" else im


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after EXIF orientation, from the header alone."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImageError(path, str(exc) or type(exc).__name__) from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def crop_box(image, box: tuple[int, int, int, int], margin: float = 0.0):
    """Crop a 1-based inclusive box, widened by ``margin`` (a fraction of its size) per side."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1 + 1, y2 - y1 + 1
    left = max(0, int(round(x1 - 1 - margin * bw)))
    top = max(0, int(round(y1 - 1 - margin * bh)))
    right = min(image.width, int(round(x2 + margin * bw)))
    bottom = min(image.height, int(round(y2 + margin * bh)))
    return image.crop((left, top, right, bottom))
