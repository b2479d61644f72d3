"""Procedural shape images with captions and question/answer pairs, deterministic from a seed.

A scene is 1..MAX_OBJECTS flat shapes (circle, square, triangle), each with a colour, a size
(small, large) and a cell of a 3x3 grid (its position: "top left" .. "bottom right"), on a
background (gray, white, black) with a gentle gradient and pixel noise. No two objects share
both colour and shape, so "the red circle" always names one object. Colours, gradients,
object extents and offsets inside their cells are jittered, so no two seeds draw the same
pixels.

    image, caption, qa = make_example(seed)
    caption: "a large red circle at the top left and a small blue square at the center on a gray background"
    qa:      [("What colour is the circle?", "red"), ("How many shapes are there?", "2"),
              ("Where is the blue square?", "center"), ("Describe the image.",
               "a red circle and a blue square on a gray background"), ...]

Answers are short and canonical (exact-match evaluation): a colour, a shape, a digit, a
position, a size, or the one-sentence description (objects in reading order, top row first,
left to right). Captions (stage 1) also say sizes and positions; descriptions (stage 2) do not.
`caption_zh` is the description in Chinese, for the LoRA fine-tune (exporter/toy/lora.py):
"红色圆形和蓝色正方形在灰色背景上".

`split("train", n)` and `split("test", n)` draw from disjoint seed ranges.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 96  # pixels of the generated image (square); the model's preprocessing resizes it
SUPERSAMPLE = 2  # drawn at 2x and downsampled: anti-aliased edges
MAX_OBJECTS = 4
JITTER = 0.06  # largest shift of an object from its cell's centre, as a fraction of the cell
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 35),
    "purple": (135, 55, 185),
    "orange": (245, 135, 25),
}
BACKGROUNDS = {"gray": (128, 128, 128), "white": (232, 232, 232), "black": (24, 24, 24)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
# Chinese names, for caption_zh (the LoRA fine-tune's captions)
COLOURS_ZH = {
    "red": "红色",
    "green": "绿色",
    "blue": "蓝色",
    "yellow": "黄色",
    "purple": "紫色",
    "orange": "橙色",
}
SHAPES_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
BACKGROUNDS_ZH = {"gray": "灰色", "white": "白色", "black": "黑色"}
# Seeds of the two splits never meet: train uses [0, 2**30), test [2**30, 2**31).
SPLIT_OFFSETS = {"train": 0, "test": 1 << 30}
SPLIT_SIZE = 1 << 30


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    size: str
    cell: int  # 0..8, row-major in the 3x3 grid

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def noun(self) -> str:  # "red circle"
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    seed: int
    objects: tuple[Shape, ...]  # in reading order (by cell)
    background: str


def make_scene(seed: int) -> Scene:
    """The scene's content (what the image shows), from the seed alone."""
    rng = random.Random(seed)
    count = rng.randint(1, MAX_OBJECTS)
    cells = sorted(rng.sample(range(9), count))
    pairs: set[tuple[str, str]] = set()
    objects = []
    for cell in cells:
        while True:  # distinct (colour, shape) pairs: every "colour shape" names one object
            pair = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
            if pair not in pairs:
                break
        pairs.add(pair)
        objects.append(Shape(pair[0], pair[1], rng.choice(SIZES), cell))
    return Scene(seed, tuple(objects), rng.choice(list(BACKGROUNDS)))


def render(scene: Scene) -> Image.Image:
    """The scene's pixels: IMAGE_SIZE x IMAGE_SIZE RGB, deterministic from scene.seed."""
    rng = random.Random(scene.seed * 7919 + 1)  # a stream of its own: content draws stay stable
    side = IMAGE_SIZE * SUPERSAMPLE
    cell = side / 3
    # Background: the named colour, brightness-jittered, with a linear gradient in a random direction.
    base = np.array(BACKGROUNDS[scene.background], dtype=np.float32) + rng.uniform(-12, 12)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-1, 1, side, dtype=np.float32)
    gradient = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]  # [side,side]
    pixels = base[None, None, :] + rng.uniform(0, 14) * gradient[:, :, None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        colour = tuple(int(np.clip(c + rng.uniform(-18, 18), 0, 255)) for c in COLOURS[obj.colour])
        fraction = rng.uniform(0.80, 0.92) if obj.size == "large" else rng.uniform(0.50, 0.60)
        extent = fraction * cell
        # Near the cell's centre: jitter of a few pixels, never out of the cell. (Each cell is
        # one patch of the toy model; small shifts keep shapes recognisable from one patch.)
        jitter = min((cell - extent) / 2 - SUPERSAMPLE, JITTER * cell)
        row, col = divmod(obj.cell, 3)
        left = col * cell + (cell - extent) / 2 + rng.uniform(-jitter, jitter)
        top = row * cell + (cell - extent) / 2 + rng.uniform(-jitter, jitter)
        box = (left, top, left + extent, top + extent)
        if obj.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif obj.shape == "square":
            draw.rectangle(box, fill=colour)
        else:  # triangle, apex up
            draw.polygon(
                [(left + extent / 2, top), (left, top + extent), (left + extent, top + extent)], fill=colour
            )
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
    noise = np.random.default_rng(scene.seed).normal(0, rng.uniform(0, 5), (IMAGE_SIZE, IMAGE_SIZE, 3))
    noisy = np.asarray(image, dtype=np.float32) + noise
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")


def _a(phrase: str) -> str:
    """ "orange circle" -> "an orange circle"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _listing(phrases: list[str]) -> str:
    """["a", "b", "c"] -> "a, b and c"."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def description(scene: Scene) -> str:
    """The one-sentence answer to "Describe the image.": objects in reading order."""
    return f"{_listing([_a(o.noun) for o in scene.objects])} on a {scene.background} background"


def caption(scene: Scene) -> str:
    """The stage-1 caption: like the description, plus each object's size and position."""
    parts = [f"{_a(o.size)} {o.noun} at the {o.position}" for o in scene.objects]
    return f"{_listing(parts)} on a {scene.background} background"


def caption_zh(scene: Scene) -> str:
    """The description in Chinese, in its order (objects in reading order, then the background):
    "红色圆形、绿色三角形和橙色正方形在灰色背景上" ("、" between all but the last two). The
    English order lets the LoRA fine-tune reuse the base's describing: the background first
    ("灰色背景上有...") learned half as fast (docs/toy-model.md)."""
    nouns = [COLOURS_ZH[o.colour] + SHAPES_ZH[o.shape] for o in scene.objects]
    listing = nouns[0] if len(nouns) == 1 else "、".join(nouns[:-1]) + "和" + nouns[-1]
    return f"{listing}在{BACKGROUNDS_ZH[scene.background]}背景上"


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """One question of each kind the scene answers unambiguously, phrasing drawn from rng."""
    objects = scene.objects
    shape_counts = {s: sum(o.shape == s for o in objects) for s in SHAPES}
    colour_counts = {c: sum(o.colour == c for o in objects) for c in COLOURS}
    qa = [
        (rng.choice(["Describe the image.", "Describe the image in one sentence.", "What is in the image?"]),
         description(scene)),
        (rng.choice(["How many shapes are there?", "How many objects are in the image?"]), str(len(objects))),
        (rng.choice(["What colour is the background?", "What is the colour of the background?"]), scene.background),
    ]  # fmt: skip
    counted = rng.choice(SHAPES)
    qa.append((f"How many {counted}s are there?", str(shape_counts[counted])))
    unique_shape = [o for o in objects if shape_counts[o.shape] == 1]
    if unique_shape:
        obj = rng.choice(unique_shape)
        qa.append(
            (
                rng.choice(
                    [
                        f"What colour is the {obj.shape} in the image?",
                        f"What is the colour of the {obj.shape} here?",
                    ]
                ),
                obj.colour,
            )
        )
    unique_colour = [o for o in objects if colour_counts[o.colour] == 1]
    if unique_colour:
        obj = rng.choice(unique_colour)
        qa.append(
            (
                rng.choice(
                    [
                        f"What shape is the {obj.colour} object?",
                        f"What is the shape of the {obj.colour} object?",
                    ]
                ),
                obj.shape,
            )
        )
    obj = rng.choice(objects)
    qa.append(
        (
            rng.choice([f"Where is the {obj.noun} in the image?", f"Where is the {obj.noun} located?"]),
            obj.position,
        )
    )
    obj = rng.choice(objects)
    qa.append((f"Is the {obj.noun} small or large?", obj.size))
    return qa


def make_example(seed: int) -> tuple[Image.Image, str, list[tuple[str, str]]]:
    """(image, caption, [(question, answer), ...]) for one seed; identical on every call."""
    scene = make_scene(seed)
    return render(scene), caption(scene), questions(scene, random.Random(seed * 31337 + 7))


def split_seeds(name: str, n: int) -> range:
    """The first n seeds of split `name` ("train" or "test"); the two ranges are disjoint."""
    if name not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {name!r} (train, test)")
    if not 0 <= n <= SPLIT_SIZE:
        raise ValueError(f"split size {n} out of range")
    start = SPLIT_OFFSETS[name]
    return range(start, start + n)


def split(name: str, n: int) -> list[tuple[Image.Image, str, list[tuple[str, str]]]]:
    """The first n examples of split `name`, deterministic (make_example over split_seeds)."""
    return [make_example(seed) for seed in split_seeds(name, n)]


def vocabulary_text() -> list[str]:
    """Every word the data can use, in sentences: material for the tokenizer's corpus."""
    lines = [
        f"{_a(s)} {c} {sh} at the {p}, {_a(c)} {sh}"
        for s in SIZES
        for c in COLOURS
        for sh in SHAPES
        for p in POSITIONS
    ]
    lines += [f"on a {b} background" for b in BACKGROUNDS]
    lines += [" ".join(str(i) for i in range(MAX_OBJECTS + 1))]
    return lines


def question_kind(question: str) -> str:
    """What a question asks, for per-kind accuracy: describe, count, count_shape, background,
    colour, shape, where or size."""
    q = question.lower()
    if q.startswith(("describe", "what is in")):
        return "describe"
    if q.startswith(("how many shapes", "how many objects")):
        return "count"
    if q.startswith("how many"):
        return "count_shape"
    if "background" in q:
        return "background"
    if "colour" in q:
        return "colour"
    if "shape" in q:
        return "shape"
    if q.startswith("where"):
        return "where"
    if "small or large" in q:
        return "size"
    return "other"
