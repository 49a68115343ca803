"""Reference images, read as 8-bit RGB whatever the file holds (stream, eval and bench use this).

    rgb = read_image("face.png")            # [H, W, 3] uint8

Normalised: EXIF orientation applied; 16-bit and 32-bit integer and float greyscale scaled to 8 bits
(Pillow's convert("RGB") clips them, so a 16-bit PNG became white); palette, greyscale and CMYK
converted; transparency composited over white. Images over MAX_PIXELS are refused before they
are decoded (Pillow's own bomb check raises at twice its limit; we stop at ours, with a clear line).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


MAX_PIXELS = 40_000_000     # ~ 7700 x 5200: larger than any camera still a reference needs
BACKGROUND = (255, 255, 255)


class ImageError(ValueError):
    """An image that cannot be used (missing, unreadable, too large): one line."""


class NotAnImage(ImageError):
    """The file exists but is no image format Pillow reads (it may be a video)."""


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """[H, W, 3] uint8 RGB of the image at `path`, or a one-line ImageError."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}" if not path.exists() else f"not a readable image: {path} (a folder)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(_too_large(path, w, h, max_pixels))
                im.load()
                return _rgb(ImageOps.exif_transpose(im))
    except Image.DecompressionBombError:
        raise ImageError(_too_large(path, *_size(path), max_pixels)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise NotAnImage(f"not a readable image: {path} ({type(e).__name__})") from None


def _size(path: Path) -> tuple[int, int]:
    from PIL import Image
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(path) as im:
            return im.size
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _too_large(path: Path, w: int, h: int, limit: int) -> str:
    return (f"image {path} is {w}x{h} ({w * h / 1e6:.0f} megapixels), more than the limit of "
            f"{limit / 1e6:.0f}; scale it down first")


def _rgb(im) -> np.ndarray:
    from PIL import Image
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16"):
            top = 65535.0
        elif im.mode == "F":                          # float images: [0, 1] or [0, 255]
            top = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        else:                                         # "I": 32-bit, 16-bit data in practice
            top = 255.0 if a.max(initial=0) <= 255 else 65535.0
        grey = np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if im.mode == "P" and "transparency" in im.info or im.mode in ("PA", "LA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        back = Image.new("RGBA", im.size, BACKGROUND + (255,))
        im = Image.alpha_composite(back, im)
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))
