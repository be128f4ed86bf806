"""Screenshots in, PNG data URLs out: checked, capped, downscaled and encoded once. The one image preparation of
the project: the client, the benchmarks, served validation and the server's own probes all send images made here.

The router request and the expert request of one screenshot must carry the identical data URL (vLLM's
multimodal cache keys on the bytes, so the vision encoder then runs once per screenshot): prepare the image
once with prepare_image() and pass the PreparedImage to both.
"""

from __future__ import annotations

import base64
import io
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

# Refuse more pixels than this before decoding (decompression bombs).
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# PNG level 1: encoding time, not upload size, dominates next to the server.
PNG_COMPRESS_LEVEL = 1


class InvalidImageError(ValueError):
    """An image that cannot be sent: the message names the file and the problem."""


class TooManyPixelsError(InvalidImageError):
    """An image over the pixel cap, found from its header before a pixel was decoded."""

    def __init__(self, source: str, width: int, height: int, limit: int) -> None:
        super().__init__(f"{source}: too many pixels ({width}x{height} = {width * height:,}, limit {limit:,})")
        self.width, self.height, self.limit = width, height, limit


@dataclass(frozen=True)
class PreparedImage:
    """A screenshot ready to send: PNG bytes as a data URL, the size sent, and where it came from."""

    data_url: str
    width: int
    height: int
    source: str

    @property
    def png(self) -> bytes:
        """The PNG bytes the data URL carries."""
        return base64.b64decode(self.data_url.partition(",")[2])


ImageInput = str | os.PathLike | bytes | Image.Image | PreparedImage


def prepare_image(image: ImageInput, *, max_pixels: int | None = None,
                  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> PreparedImage:
    """Check, downscale and PNG-encode an image given as a path, bytes or PIL image (a PreparedImage is
    returned as is).

    The pixel count is checked against `max_image_pixels` from the header, before any decoding; an image
    over `max_pixels` (None: no limit) is downscaled keeping its aspect ratio. Raises InvalidImageError
    naming the file and the problem: not found, empty file, not an image, too many pixels, truncated.
    """
    if isinstance(image, PreparedImage):
        return image
    if isinstance(image, Image.Image):
        source = "<PIL image>"
        _check_pixels(source, image.size, max_image_pixels)
        try:
            image.load()
        except Exception as exc:  # PIL raises many exception types on corrupt data
            raise InvalidImageError(f"{source}: truncated or corrupt image data ({exc})") from exc
        return _encode(source, image, max_pixels)
    if isinstance(image, bytes):
        return _encode("<bytes>", _decode("<bytes>", image, max_image_pixels), max_pixels)
    source = str(image)
    try:
        data = Path(image).read_bytes()
    except FileNotFoundError:
        raise InvalidImageError(f"{source}: file not found") from None
    except OSError as exc:
        raise InvalidImageError(f"{source}: cannot read file ({exc.strerror or exc})") from None
    return _encode(source, _decode(source, data, max_image_pixels), max_pixels)


def _check_pixels(source: str, size: tuple[int, int], cap: int) -> None:
    width, height = size
    if width * height > cap:
        raise TooManyPixelsError(source, width, height, cap)


def open_header(data: bytes) -> Image.Image:
    """The image `data` holds, its header read and no pixel decoded: what Image.open does, without PIL's own
    decompression-bomb refusal, so that the caller's pixel cap, checked on the size before decoding, is the one that
    answers (with its own name and limit). Raises UnidentifiedImageError when no format reads it."""
    Image.init()
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        try:
            if accept is None or accept(data[:16]) is True:
                return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # as Image.open: that format's reader does not take it (a short prefix too); the next may
    raise UnidentifiedImageError("cannot identify image data")


def _decode(source: str, data: bytes, max_image_pixels: int) -> Image.Image:
    """Decode fully checked image bytes: header, pixel cap, structure (verify) and pixel data (load)."""
    if not data:
        raise InvalidImageError(f"{source}: empty file")
    try:
        header = open_header(data)
    except (UnidentifiedImageError, ValueError, OSError):
        raise InvalidImageError(f"{source}: not an image (unrecognised format)") from None
    _check_pixels(source, header.size, max_image_pixels)
    try:
        header.verify()
        image = open_header(data)
        image.load()
    except Exception as exc:  # PIL raises many exception types on corrupt data
        raise InvalidImageError(f"{source}: truncated or corrupt image data ({exc})") from None
    return image


def _encode(source: str, image: Image.Image, max_pixels: int | None) -> PreparedImage:
    """RGB (transparency flattened onto white), downscaled to max_pixels, encoded once as PNG."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    width, height = image.size
    if max_pixels and width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        width, height = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return PreparedImage(data_url=url, width=width, height=height, source=source)
