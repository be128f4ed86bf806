"""prepare_image: bad files are refused with a message naming the file and the problem; good ones are
downscaled keeping their aspect, flattened to RGB and encoded once, deterministically."""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib

import pytest
from PIL import Image

import router_client
from lora_router.images import InvalidImageError, PreparedImage, prepare_image

pytestmark = pytest.mark.timeout(20)


def png_bytes(size=(120, 80), color=(10, 120, 200), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def noise_png(size=(300, 300)) -> bytes:
    """A PNG of random pixels (it does not compress, so cutting it loses pixel data)."""
    buf = io.BytesIO()
    Image.frombytes("RGB", size, random.Random(0).randbytes(size[0] * size[1] * 3)).save(buf, format="PNG")
    return buf.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header (with a valid CRC) claims width x height: a decompression bomb's signature."""
    data = bytearray(png_bytes(size=(1, 1)))
    ihdr = 8 + 8  # signature, then IHDR's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def decode(prepared: PreparedImage) -> Image.Image:
    header, payload = prepared.data_url.split(",", 1)
    assert header == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(payload)))


@pytest.mark.parametrize("case, content, message", [
    ("truncated PNG", noise_png()[:20_000], "truncated or corrupt image data"),
    ("text file named .png", b"just some notes, not pixels\n", "not an image"),
    ("0-byte file", b"", "empty file"),
    ("over the pixel cap", png_claiming_size(10_000, 5_000),
     "too many pixels (10000x5000 = 50,000,000, limit 40,000,000)"),
    # Past PIL's own decompression-bomb limit (2 x 89,478,485): the cap, from the header, still answers.
    ("far over the pixel cap", png_claiming_size(20_000, 20_000),
     "too many pixels (20000x20000 = 400,000,000, limit 40,000,000)"),
])
def test_bad_images_are_refused_with_file_and_problem(tmp_path, case, content, message):
    path = tmp_path / "screen.png"
    path.write_bytes(content)
    with pytest.raises(InvalidImageError) as caught:
        prepare_image(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_a_cap_above_pils_own_limit_is_the_one_that_applies():
    with pytest.raises(InvalidImageError, match=r"too many pixels \(20000x20000 = 400,000,000, limit 300,000,000\)"):
        prepare_image(png_claiming_size(20_000, 20_000), max_image_pixels=300_000_000)


def test_missing_file(tmp_path):
    with pytest.raises(InvalidImageError, match="missing.png: file not found"):
        prepare_image(tmp_path / "missing.png")


def test_pixel_cap_is_configurable_and_applies_to_pil_images():
    with pytest.raises(InvalidImageError, match=r"<PIL image>: too many pixels \(100x100"):
        prepare_image(Image.new("RGB", (100, 100)), max_image_pixels=5_000)
    with pytest.raises(InvalidImageError, match="<bytes>: too many pixels"):
        prepare_image(png_bytes(size=(100, 100)), max_image_pixels=5_000)


def test_downscale_to_max_pixels_keeps_aspect(tmp_path):
    path = tmp_path / "wide.png"
    path.write_bytes(png_bytes(size=(1600, 400)))
    prepared = prepare_image(path, max_pixels=40_000)
    image = decode(prepared)
    assert image.size == (prepared.width, prepared.height) == (400, 100)
    assert image.mode == "RGB"
    assert prepared.source == str(path)


def test_small_images_are_not_upscaled():
    prepared = prepare_image(png_bytes(size=(30, 20)), max_pixels=40_000)
    assert (prepared.width, prepared.height) == (30, 20)


def test_transparency_is_flattened_onto_white_rgb():
    prepared = prepare_image(Image.new("RGBA", (8, 8), (0, 0, 0, 0)))
    image = decode(prepared)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)


def test_same_image_gives_identical_bytes_from_path_bytes_and_pil(tmp_path):
    data = png_bytes()
    path = tmp_path / "screen.png"
    path.write_bytes(data)
    urls = {prepare_image(path).data_url, prepare_image(data).data_url,
            prepare_image(Image.open(io.BytesIO(data))).data_url}
    assert len(urls) == 1
    prepared = prepare_image(path)
    assert prepare_image(prepared) is prepared


def test_router_client_prepare_image_raises_the_clients_error_and_servings():
    # The client's public prepare_image: a RouterClientError for the client's callers, serving's error for the
    # gateway's, with the same message.
    with pytest.raises(router_client.InvalidImageError, match="<bytes>: empty file") as caught:
        router_client.prepare_image(b"")
    assert isinstance(caught.value, router_client.RouterClientError) and isinstance(caught.value, InvalidImageError)
    assert router_client.PreparedImage is PreparedImage


@pytest.mark.parametrize("data", [b"\x00", b"BM", b"\x89PN", b"GIF8"])
def test_a_few_bytes_are_no_image(data):
    with pytest.raises(InvalidImageError, match="not an image"):
        prepare_image(data)
