"""runtime.preprocess: parity with transformers' PIL image processors, and load_image's errors.

"crop" is checked against CLIPImageProcessorPil, "pad" against LlavaImageProcessorPil(do_pad=True),
whose pad_to_square gives the same pixels as original LLaVA's expand2square (same mean colour,
same offsets), so it serves as the reference directly.
"""

import functools
import pathlib
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from runtime import preprocess as pp
from runtime.contract import PreprocessSpec
from runtime.errors import ArtifactError, ImageError

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

SIZES = [(17, 31), (64, 64), (300, 200), (33, 500), (1, 1)]  # (width, height)
MODES = ["RGB", "RGBA", "LA", "L", "P", "P+transparency", "CMYK"]
SMALL_SPECS = [
    (32, 32),
    (40, 32),
    (25, 32),
]  # (shortest_edge, crop): equal, crop smaller, crop larger (odd pad)
ASPECTS = ["crop", "pad"]


def make_image(width: int, height: int, mode: str, seed: int = 0) -> Image.Image:
    """A deterministic noise image in `mode` (a smooth gradient plus noise, so resizing matters)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width * height).reshape(height, width, 1)
    rgba = np.clip(ramp + rng.integers(-60, 60, (height, width, 4)), 0, 255).astype(np.uint8)
    if mode == "RGB":
        return Image.fromarray(rgba[..., :3])
    if mode == "RGBA":
        return Image.fromarray(rgba)
    if mode == "L":
        return Image.fromarray(rgba[..., 0])
    if mode == "LA":
        return Image.merge("LA", [Image.fromarray(rgba[..., 0]), Image.fromarray(rgba[..., 3])])
    if mode == "P":
        return Image.fromarray(rgba[..., :3]).quantize(16)
    if mode == "P+transparency":
        image = Image.fromarray(rgba[..., :3]).quantize(16)
        image.info["transparency"] = 3  # palette index 3 is transparent
        return image
    if mode == "CMYK":
        return Image.frombytes("CMYK", (width, height), rgba.tobytes())
    raise ValueError(mode)


def spec_for(shortest: int, crop: int, aspect: str) -> PreprocessSpec:
    return PreprocessSpec(shortest_edge=shortest, crop_size=crop, mean=CLIP_MEAN, std=CLIP_STD, aspect=aspect)


@functools.cache
def hf_processor(shortest: int, crop: int, aspect: str):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    kwargs = dict(
        size={"shortest_edge": shortest},
        crop_size={"height": crop, "width": crop},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    if aspect == "pad":
        return LlavaImageProcessorPil(do_pad=True, **kwargs)
    return CLIPImageProcessorPil(**kwargs)


def hf_pixels(images: list[Image.Image], shortest: int, crop: int, aspect: str) -> np.ndarray:
    out = hf_processor(shortest, crop, aspect)(images=images, return_tensors="np")["pixel_values"]
    return np.asarray(out)


def assert_parity(images, shortest, crop, aspect):
    ours = pp.preprocess(images, spec_for(shortest, crop, aspect))
    ref = hf_pixels([image.copy() for image in images], shortest, crop, aspect)
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape == (len(images), 3, crop, crop)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("aspect", ASPECTS)
@pytest.mark.parametrize("shortest,crop", SMALL_SPECS)
@pytest.mark.parametrize("mode", MODES)
def test_parity_small_grid(mode, shortest, crop, aspect):
    # every size of the grid in one batch: also checks that mixed sizes stack
    images = [make_image(w, h, mode, seed=i) for i, (w, h) in enumerate(SIZES)]
    assert_parity(images, shortest, crop, aspect)


@pytest.mark.parametrize("aspect", ASPECTS)
@pytest.mark.parametrize("size,mode", [((300, 200), "RGB"), ((33, 500), "RGBA"), ((17, 31), "P")])
def test_parity_llava_336(size, mode, aspect):
    assert_parity([make_image(*size, mode, seed=7)], 336, 336, aspect)


def test_pad_mode_is_llava_expand2square():
    # a 4x2 white image in pad mode: rows 0 and 3 of the 4x4 square carry the mean colour
    square = pp.expand2square(Image.new("RGB", (4, 2), (255, 255, 255)), (122, 116, 104))
    pixels = np.asarray(square)
    assert square.size == (4, 4)
    assert (pixels[[0, 3]] == (122, 116, 104)).all() and (pixels[[1, 2]] == 255).all()
    # odd difference: the extra background column goes to the right (offset (5-2)//2 = 1)
    tall = np.asarray(pp.expand2square(Image.new("RGB", (2, 5), (255, 255, 255)), (0, 0, 0)))
    assert (tall[:, 0] == 0).all() and (tall[:, 1:3] == 255).all() and (tall[:, 3:] == 0).all()


def test_load_image_parity_end_to_end(tmp_path):
    path = tmp_path / "photo.png"
    make_image(300, 200, "RGBA", seed=3).save(path)
    ours = pp.preprocess([pp.load_image(path)], spec_for(32, 32, "pad"))[0]
    ref = hf_pixels([Image.open(path)], 32, 32, "pad")[0]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_load_image_converts_modes(tmp_path):
    for mode in ["RGBA", "LA", "L", "P", "CMYK"]:
        path = tmp_path / f"image_{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        make_image(20, 10, mode).save(path)
        image = pp.load_image(path)
        assert image.mode == "RGB" and image.size == (20, 10), mode


def test_load_image_sixteen_bit_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "depth16.png"
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(path)
    image = pp.load_image(path)
    assert image.mode == "RGB"
    assert np.asarray(image)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_exif_orientation_applied(tmp_path):
    # 40x20: left half red, right half blue; orientation 6 means "rotate 90 degrees clockwise to view"
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    image = pp.load_image(path)
    assert image.size == (20, 40)
    loaded = np.asarray(image).astype(int)
    assert loaded[:15, :, 0].mean() > 200 and loaded[25:, :, 2].mean() > 200  # red on top, blue below


def write_png_header(path, width: int, height: int) -> None:
    """A PNG with a valid IHDR claiming width x height and no pixel data."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def truncated(tmp_path, suffix: str):
    path = tmp_path / f"cut{suffix}"
    make_image(128, 128, "RGB").save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_bad_input(folder, case: str):
    """Writes the bad file for `case` into folder; returns its path."""
    if case == "missing":
        return folder / "nope.jpg"
    if case == "directory":
        (folder / "folder.jpg").mkdir()
        return folder / "folder.jpg"
    if case == "empty":
        (folder / "empty.png").write_bytes(b"")
        return folder / "empty.png"
    if case in ("truncated_png", "truncated_jpeg"):
        return truncated(folder, ".png" if case == "truncated_png" else ".jpg")
    if case == "text_as_jpg":
        (folder / "notes.jpg").write_text("hello, not a picture\n")
        return folder / "notes.jpg"
    if case == "bomb_over_our_limit":  # 81 MP: over our 64 MP, under PIL's own 89 MP warning
        write_png_header(folder / "bomb.png", 9000, 9000)
        return folder / "bomb.png"
    if case == "bomb_over_pil_limit":  # 10 GP: PIL itself raises DecompressionBombError on open
        write_png_header(folder / "huge.png", 100000, 100000)
        return folder / "huge.png"
    raise ValueError(case)


BAD_INPUTS = {  # case -> words the message must contain
    "missing": "no such image file",
    "directory": "is a directory",
    "empty": "empty",
    "truncated_png": "truncated or corrupt",
    "truncated_jpeg": "truncated or corrupt",
    "text_as_jpg": "not an image",
    "bomb_over_our_limit": "decompression bomb",
    "bomb_over_pil_limit": "decompression bomb",
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_image_error(tmp_path, case):
    path = make_bad_input(tmp_path, case)
    with pytest.raises(ImageError) as info:
        pp.load_image(path)
    message = str(info.value)
    assert path.name in message and BAD_INPUTS[case] in message
    assert "\n" not in message


def test_pixel_limit_is_read_at_call_time(tmp_path, monkeypatch):
    path = tmp_path / "modest.png"
    make_image(20, 20, "RGB").save(path)
    assert pp.load_image(path).size == (20, 20)
    monkeypatch.setattr(pp, "MAX_IMAGE_PIXELS", 399)
    with pytest.raises(ImageError, match="modest.png.*400 pixels"):
        pp.load_image(path)


def test_spec_errors():
    with pytest.raises(ImageError):
        pp.preprocess([], spec_for(32, 32, "crop"))
    spec = spec_for(32, 32, "crop")
    spec.resample = "sinc"
    with pytest.raises(ArtifactError, match="sinc"):
        pp.preprocess([make_image(8, 8, "RGB")], spec)


def test_runtime_does_not_import_torch_or_transformers():
    code = (
        "import sys, runtime.preprocess\n"
        "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).parents[1])
