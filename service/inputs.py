"""Input decoding and safety: image bytes or Open Inference Protocol tensors -> float32 (C, H, W) in [0, 1].

Policy (documented in docs/service.md):

- formats: PNG and JPEG only, recognised from the bytes themselves; a declared content type must agree;
- the pixel count (width x height) is read from the header and checked before any pixel is decoded;
- empty, truncated or corrupt images are 400;
- channels: the bundle's input has 1 (grayscale) or 3 (RGB) channels. Under the ``convert`` policy, RGB is
  converted to grayscale with the ITU-R 601-2 luma transform, grayscale is replicated to RGB, alpha is dropped,
  palette images are expanded, 16-bit grayscale is scaled by its bit depth (value / 65535, the same at every
  image size). Under ``strict`` a mismatch is 422;
- size: under ``convert``, an image with the bundle's aspect ratio (within 2 %) is resized to the bundle's
  height x width (bilinear with antialiasing); any other size is 422. Under ``strict`` the size must match;
- tensors (OIP): FP32, shape (N, C, H, W) equal to the bundle's (C, H, W), finite values in [0, 1], data length
  equal to the shape's product; anything else is 400.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from pathguard.service.errors import BadInput, PayloadTooLarge, UnprocessableInput, UnsupportedMediaType

__all__ = ["IMAGE_TYPES", "InputSpec", "check_media_type", "decode_image", "decode_images"]

IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG"}
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"))
_ASPECT_TOLERANCE = 0.02


@dataclass(frozen=True)
class InputSpec:
    """The bundle's input: channels, height, width, and the conversion policy."""

    channels: int
    height: int
    width: int
    max_pixels: int
    policy: Literal["convert", "strict"] = "convert"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


def check_media_type(content_type: str | None, allow_octet_stream: bool = False) -> str | None:
    """Return the image format named by ``content_type`` ('PNG' / 'JPEG'), or None for octet-stream if allowed.

    Raises
    ------
    UnsupportedMediaType
        Any other content type.
    """
    base = (content_type or "").split(";", 1)[0].strip().lower()
    if base in IMAGE_TYPES:
        return IMAGE_TYPES[base]
    if allow_octet_stream and base in ("", "application/octet-stream"):
        return None
    allowed = ", ".join(IMAGE_TYPES)
    raise UnsupportedMediaType(f"unsupported content type {base or '(none)'!r}; use {allowed} or multipart/form-data")


def _sniff(data: bytes, declared: str | None) -> str:
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if declared is not None:
        raise BadInput(f"body is not a {declared} image")
    raise UnsupportedMediaType("image is neither PNG nor JPEG")


def _open(data: bytes, spec: InputSpec) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge("image has too many pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BadInput(f"image cannot be decoded: {exc}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise BadInput("image has no pixels")
    if w * h > spec.max_pixels:
        raise PayloadTooLarge(f"image has {w}x{h} = {w * h} pixels; the limit is {spec.max_pixels}")
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadInput(f"image is truncated or corrupt: {exc}") from None
    return img


def _integer_to_float(img: Image.Image, data: bytes) -> Image.Image:
    """A 16-bit (or 32-bit integer) grayscale image as mode 'F' in [0, 1], scaled by its bit depth: the full
    scale is 2**depth - 1 whatever the pixel values or the image size (a PNG's IHDR names the depth)."""
    depth = data[24] if data.startswith(_MAGIC[0][0]) and len(data) > 24 and data[24] in (8, 16) else 16
    arr = np.asarray(img, dtype=np.float64) / float(2**depth - 1)  # (H, W)
    return Image.fromarray(np.clip(arr, 0.0, 1.0).astype(np.float32))  # mode F


def _to_array(img: Image.Image, channels: int, policy: str) -> np.ndarray:
    """Pixels as float32 (H, W, C) in [0, 1] with the bundle's channel count."""
    mode = img.mode
    native = 1 if mode in ("1", "L", "LA", "F") else 3
    if policy == "strict" and native != channels:
        kind = {1: "grayscale", 3: "RGB"}
        raise UnprocessableInput(f"image is {kind[native]} but the model expects {kind.get(channels, channels)}")
    if mode == "F":  # 16-bit grayscale, already scaled to [0, 1]
        gray = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)[:, :, None]  # (H, W, 1)
        return np.repeat(gray, channels, axis=2) if channels == 3 else gray
    if channels not in (1, 3):
        raise UnprocessableInput(f"the model expects {channels} channels; only 1 or 3 are supported for images")
    converted = img.convert("L" if channels == 1 else "RGB")
    arr8 = np.asarray(converted, dtype=np.uint8)
    arr8 = arr8[:, :, None] if arr8.ndim == 2 else arr8  # (H, W, C)
    return arr8.astype(np.float32) / 255.0


def _fit_size(img: Image.Image, spec: InputSpec) -> Image.Image:
    w, h = img.size
    if (w, h) == (spec.width, spec.height):
        return img
    expected = f"{spec.width}x{spec.height}"
    if spec.policy == "strict":
        raise UnprocessableInput(f"image is {w}x{h}; the model expects {expected}")
    if abs((w / h) / (spec.width / spec.height) - 1.0) > _ASPECT_TOLERANCE:
        raise UnprocessableInput(f"image is {w}x{h}; the model expects {expected} or the same aspect ratio")
    if img.mode not in ("L", "RGB", "F"):
        img = img.convert("RGBA" if "A" in img.mode else "RGB")
    return img.resize((spec.width, spec.height), Image.Resampling.BILINEAR, reducing_gap=None)


def decode_image(data: bytes, spec: InputSpec, declared: str | None = None) -> np.ndarray:
    """Decode one PNG/JPEG into float32 (C, H, W) in [0, 1] following the input policy.

    Parameters
    ----------
    data : bytes
        The encoded image.
    spec : InputSpec
        The bundle's input shape, pixel limit and policy.
    declared : {'PNG', 'JPEG'} or None
        The format named by the request's content type; must agree with the bytes when given.
    """
    if not data:
        raise BadInput("empty image")
    fmt = _sniff(data, declared)
    if declared is not None and declared != fmt:
        raise BadInput(f"content type says {declared} but the image is {fmt}")
    img = _open(data, spec)
    if img.mode.startswith("I"):  # 16-bit (or 32-bit integer) grayscale: scaled before any resize
        img = _integer_to_float(img, data)
    arr = _to_array(_fit_size(img, spec), spec.channels, spec.policy)  # (H, W, C)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))  # (C, H, W)


def decode_images(items: list[tuple[bytes, str | None]], spec: InputSpec) -> np.ndarray:
    """Decode several images into one float32 (n, C, H, W) array (one call, for a worker thread); an error in a
    request of several images names the image's position."""
    arrays = []
    for i, (data, declared) in enumerate(items):
        try:
            arrays.append(decode_image(data, spec, declared))
        except (BadInput, PayloadTooLarge, UnprocessableInput, UnsupportedMediaType) as exc:
            if len(items) > 1:
                exc.message = f"image {i}: {exc.message}"
            raise
    return np.stack(arrays)  # (n, C, H, W)
