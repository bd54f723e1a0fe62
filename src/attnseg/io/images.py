"""Reading images of any mode into RGB uint8, and writing masks and overlays."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


class ImageError(ValueError):
    """An input image cannot be read; the message names it and says what to do."""


def to_rgb_uint8(im: Image.Image) -> np.ndarray:
    """Convert any PIL image to an (H, W, 3) uint8 RGB array.

    16-bit and 32-bit greyscale are rescaled from their own range (not wrapped); alpha is
    composited on white; palette, CMYK, LA and greyscale images are expanded to RGB.
    """
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16"):
            a = a / 65535.0
        else:
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        g = np.clip(np.rint(a * 255), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_image(src) -> np.ndarray:
    """Load a path, PIL image or array as (H, W, 3) uint8 RGB; raise ImageError on bad input."""
    if isinstance(src, np.ndarray):
        a = src
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
            raise ImageError(f"array of shape {a.shape} is not an image; pass (H, W), (H, W, 3) or (H, W, 4)")
        if a.shape[2] == 1:
            a = np.repeat(a, 3, axis=2)
        if a.shape[2] == 4:
            a = a[..., :3]
        if a.dtype != np.uint8:
            if np.issubdtype(a.dtype, np.floating) and a.max() <= 1.0:
                a = a * 255.0
            elif a.dtype == np.uint16:
                a = a / 257.0
            a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(a)
    if isinstance(src, Image.Image):
        return to_rgb_uint8(src)
    p = Path(src)
    if not p.exists():
        raise ImageError(f"{p}: no such file; check the path")
    if p.is_dir():
        raise ImageError(f"{p}: is a folder, not an image")
    try:
        with Image.open(p) as im:
            im.load()
            return to_rgb_uint8(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{p}: not a readable image ({e.__class__.__name__}); re-export it as PNG or JPEG") from e


def list_images(inputs) -> list[Path]:
    """Expand files and folders (non-recursive, sorted) into image paths."""
    out: list[Path] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file()))
        else:
            out.append(p)
    return out


def encode_png(im: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@functools.cache
def voc_palette() -> tuple[int, ...]:
    """The Pascal VOC colour palette (256 entries, flattened RGB): class i's colour from the bits of i."""
    pal: list[int] = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal.extend((r, g, b))
    return tuple(pal)


def palette_png(mask: np.ndarray) -> Image.Image:
    """A palette ('P') PNG image of a label map with the Pascal VOC palette."""
    if mask.max(initial=0) > 255:
        raise ValueError("label maps with more than 255 classes cannot be palette PNGs")
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(list(voc_palette()))
    return im


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the VOC colour of every labelled pixel into ``image`` (background left as is)."""
    pal = np.asarray(voc_palette(), dtype=np.float32).reshape(256, 3)
    col = pal[mask.astype(np.int64)]
    out = image.astype(np.float32)
    fg = (mask > 0)[..., None]
    out = np.where(fg, (1 - alpha) * out + alpha * col, out)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_pad(image: np.ndarray, size: tuple[int, int], padded: tuple[int, int], fill: tuple[int, int, int]) -> np.ndarray:
    """An RGB uint8 image resized to ``size`` (h, w; bilinear, antialiased as PIL resizes) and padded at the bottom
    and right with ``fill`` to ``padded`` (H, W)."""
    (h, w), (ph, pw) = size, padded
    if ph < h or pw < w:
        raise ValueError(f"cannot pad a {h} x {w} image to {ph} x {pw}")
    out = np.empty((ph, pw, 3), dtype=np.uint8)
    out[:] = np.asarray(fill, dtype=np.uint8)
    out[:h, :w] = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    return out
