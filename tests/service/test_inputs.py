"""Input decoding and safety policy (pathguard.service.inputs) on real MNIST digits and crafted images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pathguard.service.errors import BadInput, PayloadTooLarge, UnprocessableInput, UnsupportedMediaType
from pathguard.service.inputs import InputSpec, check_media_type, decode_image
from tests.service.conftest import png_bytes

GRAY = InputSpec(1, 28, 28, max_pixels=1_000_000)
RGB = InputSpec(3, 32, 32, max_pixels=1_000_000)


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_png_roundtrip_is_exact(mnist_test):
    x = mnist_test.x[0]  # (1, 28, 28), multiples of 1/255
    out = decode_image(png_bytes(x), GRAY, "PNG")
    assert out.shape == (1, 28, 28) and out.dtype == np.float32
    np.testing.assert_allclose(out, x, atol=1e-6)


def test_jpeg_decodes_close_to_original(mnist_test):
    x = mnist_test.x[1]
    img = Image.fromarray(np.round(x[0] * 255).astype(np.uint8))
    out = decode_image(_encode(img, "JPEG", quality=95), GRAY, "JPEG")
    assert np.abs(out - x).mean() < 0.02


def test_rgb_to_gray_uses_luma_and_gray_to_rgb_replicates():
    rgb = np.zeros((28, 28, 3), np.uint8)
    rgb[..., 0] = 255  # pure red -> L = 0.299 * 255
    out = decode_image(_encode(Image.fromarray(rgb)), GRAY)
    assert out.shape == (1, 28, 28)
    np.testing.assert_allclose(out, round(0.299 * 255) / 255, atol=1 / 255)
    gray = Image.fromarray(np.full((32, 32), 128, np.uint8))
    out = decode_image(_encode(gray), RGB)
    assert out.shape == (3, 32, 32)
    np.testing.assert_allclose(out, 128 / 255)


def test_alpha_dropped_and_16bit_scaled():
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, 0  # fully transparent, colour kept
    np.testing.assert_allclose(decode_image(_encode(Image.fromarray(rgba)), GRAY), 200 / 255, atol=1 / 255)
    img16 = Image.fromarray(np.full((28, 28), 65535 // 2, np.uint16))
    out = decode_image(_encode(img16), GRAY)
    np.testing.assert_allclose(out, (65535 // 2) / 65535, atol=1e-4)


def test_same_aspect_ratio_is_resized_other_sizes_422(mnist_test):
    big = Image.fromarray(np.round(mnist_test.x[0][0] * 255).astype(np.uint8)).resize((56, 56), Image.NEAREST)
    out = decode_image(_encode(big), GRAY)
    assert out.shape == (1, 28, 28)
    assert np.abs(out - mnist_test.x[0]).mean() < 0.05
    with pytest.raises(UnprocessableInput, match="28x28"):
        decode_image(_encode(Image.new("L", (28, 40))), GRAY)


def test_strict_policy_rejects_conversions():
    strict = InputSpec(1, 28, 28, max_pixels=10_000, policy="strict")
    with pytest.raises(UnprocessableInput, match="RGB"):
        decode_image(_encode(Image.new("RGB", (28, 28))), strict)
    with pytest.raises(UnprocessableInput, match="56x56"):
        decode_image(_encode(Image.new("L", (56, 56))), strict)
    assert decode_image(_encode(Image.new("L", (28, 28), 255)), strict).min() == 1.0


@pytest.mark.parametrize(
    ("data", "declared", "error"),
    [
        (b"", "PNG", BadInput),
        (b"GIF89a....", None, UnsupportedMediaType),
        (b"not an image at all", "PNG", BadInput),
    ],
)
def test_rejects_empty_and_foreign(data, declared, error):
    with pytest.raises(error):
        decode_image(data, GRAY, declared)


def test_rejects_truncated_mismatched_and_huge(mnist_test):
    png = png_bytes(mnist_test.x[0])
    with pytest.raises(BadInput, match="truncated|corrupt|decoded"):
        decode_image(png[: len(png) // 2], GRAY, "PNG")
    with pytest.raises(BadInput, match="JPEG"):
        decode_image(png, GRAY, "JPEG")
    gif = _encode(Image.new("L", (28, 28)), "GIF")
    with pytest.raises(UnsupportedMediaType):
        decode_image(gif, GRAY, None)
    # the pixel limit is checked from the header, before the 100 MP are decoded
    huge = _encode(Image.new("1", (10_000, 10_000)))
    with pytest.raises(PayloadTooLarge, match="pixels"):
        decode_image(huge, GRAY, "PNG")


def test_media_types():
    assert check_media_type("image/png") == "PNG"
    assert check_media_type("IMAGE/JPEG; charset=binary") == "JPEG"
    assert check_media_type("application/octet-stream", allow_octet_stream=True) is None
    for bad in ("text/plain", "image/gif", None, "application/octet-stream"):
        with pytest.raises(UnsupportedMediaType):
            check_media_type(bad)
