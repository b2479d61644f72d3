"""LLaVA-1.6 ("anyres") tiling before the vision graph and feature packing after it, with numpy and pillow only.

Before the vision graph, tiles() turns one image into [1 + rows * cols, 3, S, S] (S = tile_size):

1. pick the grid pinpoint (height, width) that keeps most of the image's pixels and wastes
   least (best_resolution: transformers' select_best_resolution);
2. resize the image keeping its aspect so that it just fits that pinpoint (PIL, on uint8, the
   fitted side exact, the other rounded up: get_patch_output_size);
3. pad it with black (0, on uint8, before any rescaling) to the pinpoint, centred, the odd
   pixel after (LlavaNextImageProcessorPil._pad_for_patching);
4. cut that into S x S tiles, row by row (divide_to_patches), and put first a base tile: the
   whole image squashed to S x S, aspect ignored (get_image_patches);
5. rescale and normalise every tile as LLaVA-1.5 does (runtime.preprocess.normalize, applied
   through a 256-level table: the same float32 values, faster). The processor also resizes
   (shortest edge S) and centre-crops (S) every tile; on S x S tiles both are exact no-ops
   (PIL returns a copy for a same-size resize), so they are skipped.

After the vision graph, pack() turns the tiles' features [tiles, p*p, hidden] (p = patches per
side) into the sequence the prompt's image tokens stand for: the base tile's p*p features,
then the grid's features laid out as one [rows*p, cols*p] map, cropped back to the image's
aspect (the padding of step 3 removed, with transformers' unpad_image rounding), with the
newline vector after every row (LlavaNextModel.pack_image_features).

Sizes are (height, width) in pixels throughout, as in transformers (PIL's are (width, height)).
Numerically this is transformers' PIL backend, not the torchvision one; tests/test_anyres.py
checks tiles() to 1e-5 and pack() exactly against transformers.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from runtime.contract import AnyresSpec, PreprocessSpec, VisionSpec
from runtime.errors import ArtifactError
from runtime.preprocess import RESAMPLE, normalize, to_rgb


def best_resolution(size: tuple[int, int], pinpoints: list[list[int]]) -> tuple[int, int]:
    """(height, width) of the pinpoint the image of `size` (height, width) is tiled at.

    Mirrors transformers' select_best_resolution: the most image pixels kept once the image
    is scaled to fit (each side truncated, capped at the image's own pixel count, so upscaling
    earns nothing), ties broken by the least padding; the first pinpoint wins a full tie.
    The least waste starts at infinity, so an image so thin that it keeps no whole row anywhere
    (1 x 2000) still gets one: the smallest pinpoint (its grid then unpads to nothing).
    """
    height, width = size
    best, most_kept, least_wasted = None, 0, math.inf
    for pin_height, pin_width in pinpoints:
        scale = min(pin_width / width, pin_height / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_width * pin_height - kept
        if kept > most_kept or (kept == most_kept and wasted < least_wasted):
            best, most_kept, least_wasted = (pin_height, pin_width), kept, wasted
    return best


def grid_shape(size: tuple[int, int], spec: AnyresSpec) -> tuple[int, int]:
    """(rows, cols) of grid tiles for an image of `size`: the pinpoint in tiles
    (get_anyres_image_grid_shape; the contract guarantees whole tiles)."""
    pin_height, pin_width = best_resolution(size, spec.grid_pinpoints)
    return pin_height // spec.tile_size, pin_width // spec.tile_size


def tile_count(size: tuple[int, int], spec: AnyresSpec) -> int:
    """Tiles tiles() makes for an image of `size`: the base tile plus the grid
    (image_size_to_num_patches)."""
    rows, cols = grid_shape(size, spec)
    return 1 + rows * cols


def image_token_count(size: tuple[int, int], spec: AnyresSpec, vision: VisionSpec) -> int:
    """Embeddings an image of `size` stands for in the prompt, = len(pack(...)).

    The base tile's p*p, plus the unpadded grid's rows, each with its width plus one newline:
    LlavaNextProcessor._get_number_of_features minus the CLS it counts and "default" drops.
    """
    side = _patches_per_side(spec, vision)
    rows, cols = grid_shape(size, spec)
    top, bottom, left, right = _unpad_box(size, rows * side, cols * side)
    return side * side + (bottom - top) * (right - left + 1)


def max_image_token_count(spec: AnyresSpec, vision: VisionSpec) -> int:
    """The most embeddings any image can stand for: the base tile and the largest grid with a
    newline per row (unpadding only ever removes rows or columns; an image of exactly that
    pinpoint's size reaches it)."""
    side = _patches_per_side(spec, vision)
    grid = max(
        (h // spec.tile_size * side) * (w // spec.tile_size * side + 1) for h, w in spec.grid_pinpoints
    )
    return side * side + grid


def tiles(image: Image.Image, spec: AnyresSpec, preprocess: PreprocessSpec) -> np.ndarray:
    """One PIL image of any mode -> [tile_count, 3, S, S] float32: base tile, then the grid row by row.

    LlavaNextImageProcessorPil's pixel_values for the image, before its batch padding.
    """
    resample = _check_preprocess(spec, preprocess)
    image = to_rgb(image)
    width, height = image.size
    pinpoint = best_resolution((height, width), spec.grid_pinpoints)
    canvas = _fit_and_pad(image, pinpoint, resample)  # [pin_h,pin_w,3] uint8
    side = spec.tile_size
    rows, cols = pinpoint[0] // side, pinpoint[1] // side
    # [pin_h,pin_w,3] -> [rows,S,cols,S,3] -> [rows,cols,S,S,3] -> [rows*cols,S,S,3]: divide_to_patches' order
    grid = canvas.reshape(rows, side, cols, side, 3).transpose(0, 2, 1, 3, 4).reshape(-1, side, side, 3)
    base = np.asarray(image.resize((side, side), resample=resample))  # [S,S,3] uint8, aspect ignored
    return _normalize_tiles(np.concatenate([base[None], grid]), preprocess)  # [1+rows*cols,3,S,S]


def pack(
    features: np.ndarray, size: tuple[int, int], spec: AnyresSpec, vision: VisionSpec, newline: np.ndarray
) -> np.ndarray:
    """[tile_count, p*p, hidden] (tiles()' order) + newline [hidden] -> [image_token_count, hidden].

    LlavaNextModel.pack_image_features for one image: the same values in the same order and
    the features' dtype (the newline is cast to it, as transformers does).
    """
    side = _patches_per_side(spec, vision)
    rows, cols = grid_shape(size, spec)
    hidden = features.shape[-1]
    if features.shape != (1 + rows * cols, side * side, hidden) or newline.shape != (hidden,):
        raise ArtifactError(
            f"anyres features {list(features.shape)} and newline {list(newline.shape)} do not fit a "
            f"{rows}x{cols} grid of {side * side}-token tiles (expected [{1 + rows * cols}, {side * side}, hidden] "
            "and [hidden]); re-export the vision graph"
        )
    # transformers works on [hidden, rows*p, cols*p]; the same map channels-last: [rows*p, cols*p, hidden]
    grid = features[1:].reshape(rows, cols, side, side, hidden).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * side, cols * side, hidden)
    top, bottom, left, right = _unpad_box(size, rows * side, cols * side)
    grid = grid[top:bottom, left:right]  # [h,w,hidden]
    ends = np.broadcast_to(newline.astype(features.dtype), (grid.shape[0], 1, hidden))  # [h,1,hidden]
    lines = np.concatenate([grid, ends], axis=1).reshape(-1, hidden)  # [h*(w+1),hidden], row-major
    return np.concatenate([features[0], lines])  # [p*p + h*(w+1), hidden]


def _fit_and_pad(image: Image.Image, pinpoint: tuple[int, int], resample: int) -> np.ndarray:
    """RGB image -> [pin_h,pin_w,3] uint8: resized to fit the pinpoint keeping its aspect, padded black, centred.

    The size is get_patch_output_size's: the side with the smaller scale fits exactly, the other
    is ceil(side * scale), capped at the pinpoint. The padding is _get_padding_size's:
    (pin - new) // 2 before, the odd pixel after. Both on uint8, as the PIL backend pads before
    it rescales (0 stays black, not -mean/std).
    """
    width, height = image.size
    pin_height, pin_width = pinpoint
    scale_w, scale_h = pin_width / width, pin_height / height
    if scale_w < scale_h:
        new_height, new_width = min(math.ceil(height * scale_w), pin_height), pin_width
    else:
        new_height, new_width = pin_height, min(math.ceil(width * scale_h), pin_width)
    resized = np.asarray(image.resize((new_width, new_height), resample=resample))  # PIL order (w, h)
    top, left = (pin_height - new_height) // 2, (pin_width - new_width) // 2
    canvas = np.zeros((pin_height, pin_width, 3), dtype=np.uint8)
    canvas[top : top + new_height, left : left + new_width] = resized
    return canvas


def _normalize_tiles(pixels: np.ndarray, preprocess: PreprocessSpec) -> np.ndarray:
    """[n,S,S,3] uint8 -> [n,3,S,S] float32: normalize() of every tile, through a table.

    normalize() maps each (level, channel) on its own, so running it once on the 256 levels
    and looking the pixels up gives its float32 results bit for bit, about 7x faster.
    """
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)  # [256,1,3]
    table = normalize(levels, preprocess)[:, :, 0]  # [3,256]
    out = np.empty((pixels.shape[0], 3, *pixels.shape[1:3]), dtype=np.float32)
    for channel in range(3):
        np.take(table[channel], pixels[..., channel], out=out[:, channel])
    return out


def _unpad_box(size: tuple[int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the image's part of a [height, width] feature map, as unpad_image crops.

    The map is the pinpoint at feature resolution; the image fills one side of it and is centred
    on the other. That side is round(side * scale, 7) (the 7-digit round absorbs float error in
    a product that should be whole), truncated; an equal amount is cut from both ends, so an odd
    difference leaves the map one row (or column) wider than the image. Equal aspects go to the
    width branch, as transformers' strict `>` sends them.
    """
    image_height, image_width = size
    if image_width / image_height > width / height:
        new_height = int(round(image_height * (width / image_width), 7))
        cut = (height - new_height) // 2
        return cut, height - cut, 0, width
    new_width = int(round(image_width * (height / image_height), 7))
    cut = (width - new_width) // 2
    return 0, height, cut, width - cut


def _patches_per_side(spec: AnyresSpec, vision: VisionSpec) -> int:
    """p: one tile's tokens are p x p patches; only for the "default" strategy (CLS dropped)."""
    if vision.select_strategy != "default":
        raise ArtifactError(
            f"anyres needs vision select_strategy 'default', not {vision.select_strategy!r} "
            "(a CLS token per tile has no place in the packed grid); re-export the model"
        )
    if vision.image_size != spec.tile_size:
        raise ArtifactError(
            f"anyres tile_size {spec.tile_size} differs from the vision image_size {vision.image_size}; "
            "re-export the model"
        )
    return vision.image_size // vision.patch_size


def _check_preprocess(spec: AnyresSpec, preprocess: PreprocessSpec) -> int:
    """The PIL resample filter; refuses a preprocess spec whose tiles would not be tile_size squares."""
    if preprocess.shortest_edge != spec.tile_size or preprocess.crop_size != spec.tile_size:
        raise ArtifactError(
            f"anyres needs preprocess shortest_edge and crop_size equal to tile_size {spec.tile_size}, "
            f"not {preprocess.shortest_edge} and {preprocess.crop_size}; re-export the model"
        )
    resample = RESAMPLE.get(preprocess.resample)
    if resample is None:
        raise ArtifactError(f"image resample must be one of {sorted(RESAMPLE)}, not {preprocess.resample!r}")
    return resample
