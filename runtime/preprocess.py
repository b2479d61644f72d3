"""Image file -> pixel_values [B,3,crop,crop] float32, with numpy and pillow only.

Numerically this is transformers' PIL backend (CLIPImageProcessorPil for aspect "crop",
LlavaImageProcessorPil(do_pad=True) for aspect "pad"): same RGB conversion, the same
PIL bicubic resize on uint8, the same size rounding and crop offsets, the same float
arithmetic, so results agree to float32 round-off (tests/test_preprocess.py checks 1e-5).
It is NOT the torchvision backend (`backend="torchvision"`, which AutoImageProcessor picks
when torchvision is installed): that one resizes with torch interpolation and differs by
up to a few 1e-2 after normalisation.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from runtime.contract import PreprocessSpec
from runtime.errors import ArtifactError, ImageError

# Refuse images above this many pixels before decoding them (a decompression bomb: a small
# file that claims huge dimensions). 64 MP is an 8k x 8k photo; CLIP sees 336 x 336.
MAX_IMAGE_PIXELS = 64_000_000

RESAMPLE = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
}

# 16-bit integer modes: PIL's convert("RGB") clips them at 255 (a mostly white image), so
# load_image scales them to 8 bits first. preprocess() on an in-memory image does not, to
# stay identical to transformers on the same PIL object.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Opens, fully decodes and EXIF-rotates an image file; returns it as RGB.

    Raises ImageError (one line naming the file) when the file is missing, a directory,
    empty, not an image, truncated or corrupt, or over MAX_IMAGE_PIXELS.
    """
    path = Path(path)
    _check_file(path)
    return _decode(path, path)


def load_image_bytes(data: bytes, name: str) -> Image.Image:
    """An image held in memory (a data URL's payload, a download) -> RGB, with load_image's checks.

    `name` is how the message calls the image (e.g. "image 1" or a shortened URL), since
    there is no file name to give. Raises ImageError when the bytes are empty, not an
    image, truncated or corrupt, or over MAX_IMAGE_PIXELS.
    """
    if not data:
        raise ImageError(f"{name}: image file is empty (0 bytes)")
    return _decode(io.BytesIO(data), name)


def _decode(source: Path | io.BytesIO, name: str | Path) -> Image.Image:
    """Decodes `source` fully, EXIF-rotated, 16-bit modes scaled to 8 bits, as RGB; errors name `name`.

    One body for files and in-memory bytes, so both meet the same bomb and truncation checks.
    """
    try:
        with warnings.catch_warnings():
            # our own limit below is the one that speaks; PIL's warning would only be noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                _check_pixels(name, image.size)
                image.load()  # decode now, so a truncated file fails here and not later
                image = ImageOps.exif_transpose(image)  # a copy, rotated as the camera meant
    except Image.DecompressionBombError as err:
        raise ImageError(f"{name}: image refused as a possible decompression bomb ({err})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (PIL cannot identify its format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError) as err:
        # truncated or corrupt data; PIL's decoders raise all of these
        raise ImageError(f"{name}: image file is truncated or corrupt ({err})") from None
    if image.mode in _SIXTEEN_BIT_MODES:
        # [H,W] uint16 -> [H,W] uint8, keeping the top byte
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8), mode="L")
    return to_rgb(image)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageError(f"{path}: no such image file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: image file is empty (0 bytes)")
    if not os.access(path, os.R_OK):
        raise ImageError(f"{path}: image file is not readable (permission denied)")


def _check_pixels(name: str | Path, size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{name}: image is {width}x{height} = {width * height} pixels, over the "
            f"{MAX_IMAGE_PIXELS}-pixel limit (refused as a possible decompression bomb)"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, as transformers' image_transforms.convert_to_rgb does for PIL.

    Transparency (an alpha band, or a palette/`transparency` entry) is composited over
    white; everything else (L, P, CMYK, YCbCr, I, F, ...) goes through PIL's convert("RGB").
    """
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Pads an RGB image to a max(w,h) square, image centered: original LLaVA's mm_utils.expand2square.

    transformers' LlavaImageProcessorPil.pad_to_square(do_pad=True) gives the same pixels:
    same background (int(m * 255) per channel of the mean) and same offsets
    ((max - h) // 2 rows or (max - w) // 2 columns).
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def resize_shortest_edge(image: Image.Image, size: int, resample: int) -> Image.Image:
    """Resizes so the shorter side is `size`, as transformers' get_resize_output_image_size
    (default_to_square=False) rounds: the long side is int(size * long / short), truncated."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)  # PIL order (w, h)
    return image.resize(new_size, resample=resample)


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """[H,W,C] -> [size,size,C] around the center, as transformers' center_crop: top/left =
    (dim - size) // 2; a side shorter than `size` is first zero-padded ceil(diff / 2) before."""
    height, width = pixels.shape[:2]
    pad_h, pad_w = max(size - height, 0), max(size - width, 0)
    if pad_h or pad_w:
        pixels = np.pad(pixels, (((pad_h + 1) // 2, pad_h // 2), ((pad_w + 1) // 2, pad_w // 2), (0, 0)))
        height, width = pixels.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return pixels[top : top + size, left : left + size]


def normalize(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """[H,W,3] uint8 -> [3,H,W] float32: rescale in float64 then cast, then (x - mean) / std
    in float32, in that order, as transformers' rescale and normalize do."""
    scaled = (pixels.astype(np.float64) * spec.rescale_factor).astype(np.float32)  # [H,W,3]
    mean = np.asarray(spec.mean, dtype=np.float32)  # [3]
    std = np.asarray(spec.std, dtype=np.float32)  # [3]
    return np.ascontiguousarray(((scaled - mean) / std).transpose(2, 0, 1))  # [3,H,W]


def preprocess_one(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """One PIL image of any mode -> [3,crop,crop] float32."""
    resample = RESAMPLE.get(spec.resample)
    if resample is None:
        raise ArtifactError(f"image resample must be one of {sorted(RESAMPLE)}, not {spec.resample!r}")
    image = to_rgb(image)
    if spec.aspect == "pad":
        background = tuple(int(m * 255) for m in spec.mean)  # LLaVA: mean colour in 0..255
        image = expand2square(image, background)  # [side,side]
    image = resize_shortest_edge(image, spec.shortest_edge, resample)  # short side = shortest_edge
    pixels = center_crop(np.asarray(image), spec.crop_size)  # [crop,crop,3] uint8
    return normalize(pixels, spec)  # [3,crop,crop]


def preprocess(images: list[Image.Image], spec: PreprocessSpec) -> np.ndarray:
    """PIL images (any sizes, any modes) -> pixel_values [B,3,crop,crop] float32."""
    if not images:
        raise ImageError("no images to preprocess")
    return np.stack([preprocess_one(image, spec) for image in images])
