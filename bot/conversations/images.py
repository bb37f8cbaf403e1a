"""Images people send: which are taken, and the form they are stored in.

Pure functions on bytes (with Pillow), like attachments.py for text files: the
platform adapter downloads, the chat service calls `prepare` off the event loop
and stores the result. An image is taken when it decodes as PNG, JPEG, WebP, GIF
(its first frame) or BMP and is no bigger than IMAGE_MAX_KB; one with more than
IMAGE_MAX_PIXELS pixels is scaled down, never refused for that. It is stored as
PNG or JPEG, the two formats every OpenAI-compatible server and llama.cpp's own
image loader read: a PNG or JPEG that needs no change keeps its exact bytes.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass

from bot.conversations.attachments import human_size, safe_name
from bot.conversations.store import StoredImage

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what Pillow may decode here
KEEP_AS_IS = {"PNG": ("RGB", "RGBA", "L", "LA", "P"), "JPEG": ("RGB", "L")}  # stored unchanged when small enough
MAX_DECODE_PIXELS = 80_000_000  # larger is a decompression bomb, not a photo: refused
JPEG_QUALITY = 90


@dataclass(frozen=True)
class ImageInput:
    """An image as a platform hands it over: its file name and the bytes downloaded."""

    filename: str
    data: bytes


class Refused(ValueError):
    """An image that is not taken; the message says why, for a note."""


def too_big(filename: str, size: int, max_kb: int) -> str | None:
    """The note for an image whose (declared or real) size is over IMAGE_MAX_KB, else None."""
    if size > max_kb * 1024:
        return f"I did not look at {safe_name(filename)} ({human_size(size)}): images may be at most {human_size(max_kb * 1024)} here."
    return None


def prepare(item: ImageInput, *, max_kb: int, max_pixels: int) -> tuple[StoredImage, bytes]:
    """The image as it is stored (description and bytes). Raises Refused with a note."""
    name = safe_name(item.filename)
    note = too_big(item.filename, len(item.data), max_kb)
    if note:
        raise Refused(note)
    from PIL import Image as PILImage

    unreadable = Refused(f"I could not look at {name}: it is not an image I can read (PNG, JPEG, WebP or GIF), or it is damaged.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            with PILImage.open(io.BytesIO(item.data), formats=FORMATS) as img:
                fmt = img.format or ""
                width, height = img.size
                if width * height > MAX_DECODE_PIXELS:
                    raise Refused(f"I did not look at {name}: {width}x{height} pixels is more than I can read.")
                img.seek(0)  # an animation's first frame
                img.load()
                if fmt in KEEP_AS_IS and img.mode in KEEP_AS_IS[fmt] and width * height <= max_pixels and not getattr(img, "is_animated", False):
                    data, mime = item.data, f"image/{fmt.lower()}"
                else:
                    data, mime, width, height = _convert(img, fmt, max_pixels)
    except Refused:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, PILImage.DecompressionBombError, PILImage.DecompressionBombWarning):
        raise unreadable from None
    digest = hashlib.sha256(data).hexdigest()
    return StoredImage(item.filename[:200] or "image", digest, mime, width, height, len(data)), data


def _convert(img, fmt: str, max_pixels: int) -> tuple[bytes, str, int, int]:  # noqa: ANN001 (a PIL image)
    """Scale down to `max_pixels` (keeping the shape) and write as PNG (images that may be
    transparent or are drawings) or JPEG (photos)."""
    from PIL import Image as PILImage

    width, height = img.size
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        width, height = max(1, int(width * scale)), max(1, int(height * scale))
    alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    img = img.convert("RGBA" if alpha else "RGB")
    if img.size != (width, height):
        img = img.resize((width, height), PILImage.Resampling.LANCZOS)
    out = io.BytesIO()
    if alpha or fmt in ("PNG", "GIF", "BMP"):
        img.save(out, "PNG", optimize=False)
        return out.getvalue(), "image/png", width, height
    img.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue(), "image/jpeg", width, height
