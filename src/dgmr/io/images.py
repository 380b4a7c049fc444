"""Decoding one image file or byte string into an 8-bit RGB PIL image, for every reader.

:func:`open_image` is the one place where dgmr decodes an image (distill's folder, list and
shard readers, eval's datasets). It either returns a fully decoded RGB image or raises
:class:`UnreadableImage` (a :class:`DgmrError`, so an uncaught one is a clean
``dgmr: error:`` line) whose message names the file and the reason:

* only regular files are opened: a FIFO or a device named by a ``--data`` list would block
  ``open`` forever or read without end. The file is opened non-blocking and checked with
  ``fstat`` before a byte is read (no window between a check and the open).
* decompression bombs (more than :data:`MAX_PIXELS` pixels) are refused from the header,
  before any pixel is decoded; Pillow's warning for the 1x-2x range is folded into that.
* 16-bit images (modes ``I;16*``, and ``I`` with values in 0..65535, which is how Pillow
  opens 16-bit PNG/TIFF) are scaled to 8 bits by their bit depth; ``convert("RGB")`` would
  clip them to 255 (almost white). Float images (mode ``F``, e.g. float TIFF) with values in
  [0, 1] are scaled by 255; other ranges and non-finite values are refused (there is no
  right scaling to guess; ``convert`` would make them black).

:func:`printable` makes a file name that is not valid UTF-8 (Python holds those bytes as
lone surrogates) safe to print or hash.
"""
from __future__ import annotations

import io
import os
import struct
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..core.errors import DgmrError
from .files import RefusedFile, read_regular_file

# Pillow's own bomb threshold (its default Image.MAX_IMAGE_PIXELS, ~89.5 MP), read once so a
# caller changing Pillow's global does not change what dgmr accepts
MAX_PIXELS = 89_478_485
MAX_IMAGE_BYTES = 1 << 30  # the largest image file read (a bigger one is no image we can decode in memory)
# file names dgmr reads as images (folders, list files, shard members, labeled splits)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class UnreadableImage(DgmrError, ValueError):
    """An image that cannot be used: ``name`` (printable) and ``reason``; the message is both."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


def printable(name: str) -> str:
    """``name`` with bytes that are not UTF-8 shown as ``\\xNN`` (printing or encoding the
    raw name raises UnicodeEncodeError)."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogateescape") if _escaped_only(name) else name.encode("utf-8", "surrogatepass")
        return raw.decode("utf-8", "backslashreplace")


def _escaped_only(name: str) -> bool:
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in name)


def read_image_file(path: str | os.PathLike, limit: int | None = None, what: str = "file") -> bytes:
    """The bytes of ``path`` if it is a regular file (at most ``limit`` bytes), else :class:`UnreadableImage`."""
    name = printable(os.fspath(path))
    try:
        return read_regular_file(path, limit)
    except RefusedFile as e:
        if e.kind == "size":
            reason = f"the {what} is {e.detail:,} bytes, more than the {limit or 0:,} allowed"
        elif e.kind == "irregular":
            reason = "not a regular file (a FIFO, device, socket or directory)"
        else:
            reason = f"cannot {e.kind} the {what}: {e.detail}"
        raise UnreadableImage(name, reason) from None


def open_image(src: bytes | str | os.PathLike, name: str | None = None) -> Image.Image:
    """Decode ``src`` (a path or the file's bytes) fully into an 8-bit RGB image; raise
    :class:`UnreadableImage` naming ``name`` (default: the path, or "image bytes")."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data, label = bytes(src), name or "image bytes"
    else:
        data, label = read_image_file(src, MAX_IMAGE_BYTES, "image file"), name or os.fspath(src)
    label = printable(label)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with the size
            img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise UnreadableImage(label, f"{w}x{h} pixels is more than {MAX_PIXELS:,} (a decompression bomb?)")
        img.load()  # decode everything now, so a truncated file fails here and not in a transform
        return to_rgb(img, label)
    except UnreadableImage:
        raise
    except UnidentifiedImageError:
        raise UnreadableImage(label, "not an image (or in a format Pillow cannot read)") from None
    except Image.DecompressionBombError as e:
        raise UnreadableImage(label, f"too many pixels (a decompression bomb?): {e}") from None
    # what Pillow's plugins raise on corrupt data
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, TypeError, IndexError, struct.error) as e:
        raise UnreadableImage(label, f"cannot decode ({type(e).__name__}: {str(e)[:200]})") from None


def to_rgb(img: Image.Image, label: str = "image") -> Image.Image:
    """An already decoded image (a file's, or one a caller holds in memory) as 8-bit RGB, with
    the 16-bit and float rules above."""
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        a = np.asarray(img).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise UnreadableImage(label, f"a 32-bit integer image with values in [{a.min()}, {a.max()}] "
                                  "(only 8- and 16-bit images are supported)")
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all():
            raise UnreadableImage(label, "a float image with NaN or infinite values")
        if a.size and (a.min() < 0 or a.max() > 1):
            raise UnreadableImage(label, f"a float image with values in [{a.min():.4g}, {a.max():.4g}]; "
                                  "only float images in [0, 1] are supported")
        return Image.fromarray(np.rint(a * 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")
