"""The miniature's world: coloured shapes on plain backgrounds, their captions, and a pixel checker.

The miniature Stable Diffusion (``sdcourse/miniature``, built by ``scripts/build_miniature.py``) is
trained on the ``BASE_COLOURS`` and ``BASE_SHAPES`` part of this world; ``purple`` (the sample
dataset's new concept, learned in notebook 03 and by notebook 06's LoRA), ``pink`` and ``star`` it
never saw.
``check`` reads a picture back: the colour and shape of its main object, so tests can measure
what a model draws instead of only that it draws something.

    img = draw("circle", "red", "white", random.Random(0), size=64)
    check(img)  # -> Verdict(colour="red", shape="circle", ...)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (240, 210, 40),
           "orange": (245, 140, 30), "purple": (140, 50, 190), "pink": (245, 130, 200)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "star")

BASE_COLOURS = ("red", "green", "blue", "yellow", "orange")  # what the base miniature was trained on
BASE_SHAPES = ("circle", "square", "triangle")


def caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def tag_caption(shape: str, colour: str, background: str) -> str:
    """What notebook 01 makes of the practice booru's tags (``captioning.tags_to_caption``)."""
    return f"{colour} {shape}, {background} background, simple background"


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):  # five outer tips, five inner corners at 0.38 r
        angle = -np.pi / 2 + k * np.pi / 5
        rad = r if k % 2 == 0 else 0.38 * r
        points.append((cx + rad * np.cos(angle), cy + rad * np.sin(angle)))
    return points


def draw(shape: str, colour: str, background: str, rng: random.Random, size: int = 128,
         at: tuple[int, int, int] | None = None) -> Image.Image:
    """One scene: the shape at a random position and size (radius a fifth to a third of the picture),
    or at ``at`` = (centre x, centre y, radius) in pixels."""
    for name, table in (("shape", SHAPES), ("colour", COLOURS), ("background", BACKGROUNDS)):
        value = {"shape": shape, "colour": colour, "background": background}[name]
        if value not in table:
            raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(table)}")
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    pen = ImageDraw.Draw(img)
    if at is None:
        r = rng.randint(size // 5, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    else:
        cx, cy, r = at
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        pen.polygon(_star(cx, cy, r), fill=fill)
    return img


def scenes(n: int, colours=BASE_COLOURS, shapes=BASE_SHAPES, backgrounds=tuple(BACKGROUNDS), seed: int = 0,
           size: int = 64, tag_share: float = 0.0):
    """``n`` random (caption, image) pairs, drawn at 128 px and resized like the trainer resizes the sample;
    a ``tag_share`` of the captions in the booru-tag style."""
    rng = random.Random(seed)
    for _ in range(n):
        shape, colour, background = rng.choice(shapes), rng.choice(colours), rng.choice(backgrounds)
        img = draw(shape, colour, background, rng)
        text = (tag_caption if rng.random() < tag_share else caption)(shape, colour, background)
        yield text, img.resize((size, size), Image.BICUBIC)


@dataclass(frozen=True)
class Verdict:
    colour: str | None  # nearest palette colour of the object's pixels; None when no object stands out
    shape: str | None   # nearest ideal shape once the object's bounding box is scaled to a square
    distance: float     # share of that square where the object and the ideal shape disagree
    area: float         # fraction of the picture the object covers

    def matches(self, colour: str | None = None, shape: str | None = None) -> bool:
        return (colour is None or self.colour == colour) and (shape is None or self.shape == shape)

    def describe(self) -> str:
        return f"{self.colour} {self.shape}" if self.colour else "no shape"


TEMPLATE_SIDE = 16


def _templates() -> dict[str, np.ndarray]:
    """Each shape drawn to fill its bounding box, as a TEMPLATE_SIDE x TEMPLATE_SIDE mask."""
    side, big = TEMPLATE_SIDE, 256
    out = {}
    for shape in SHAPES:
        img = Image.new("L", (big, big), 0)
        pen, r = ImageDraw.Draw(img), big / 2
        if shape == "circle":
            pen.ellipse((0, 0, big - 1, big - 1), fill=255)
        elif shape == "square":
            pen.rectangle((0, 0, big - 1, big - 1), fill=255)
        elif shape == "triangle":
            pen.polygon([(r, 0), (0, big - 1), (big - 1, big - 1)], fill=255)
        else:
            points = np.array(_star(0.0, 0.0, 1.0))
            points = (points - points.min(0)) / (points.max(0) - points.min(0)) * (big - 1)
            pen.polygon([tuple(p) for p in points], fill=255)
        out[shape] = np.asarray(img.resize((side, side), Image.BOX), dtype=np.float32) / 255
    return out


TEMPLATES = _templates()


def _distance_from_background(a: np.ndarray) -> np.ndarray:
    """Each pixel's RGB distance from the background, taken as the border's median colour."""
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return np.linalg.norm(a - np.median(border, axis=0), axis=2)


def object_mask(image: Image.Image) -> np.ndarray:
    """Where the main object is, as ``check`` sees it: the pixels far from the border's colour."""
    return _distance_from_background(np.asarray(image.convert("RGB"), dtype=np.float32)) > 60


def object_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom), inclusive, of a mask's object; None when under 1 % of it is set.
    Rows and columns with a stray pixel or two do not stretch the box."""
    rows = np.flatnonzero(mask.sum(1) >= 2)
    cols = np.flatnonzero(mask.sum(0) >= 2)
    if mask.sum() < 0.01 * mask.size or len(rows) == 0 or len(cols) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def check(image: Image.Image) -> Verdict:
    """The main object's colour and shape, read from pixels.

    Background = the border's median colour, object = the pixels far from it. The shape is the ideal
    shape nearest to the object once its bounding box is scaled to a square: a blurred or slightly
    rounded triangle is still far nearer a triangle than a circle, which a sampled picture needs.
    """
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    distance = _distance_from_background(a)
    mask = distance > 60
    box = object_box(mask)
    if box is None:
        return Verdict(None, None, 1.0, float(mask.mean()))
    left, top, right, bottom = box
    crop = Image.fromarray(mask[top:bottom + 1, left:right + 1].astype(np.uint8) * 255)
    seen = np.asarray(crop.resize((TEMPLATE_SIDE, TEMPLATE_SIDE), Image.BOX), dtype=np.float32) / 255
    distances = {shape: float(np.abs(seen - template).mean()) for shape, template in TEMPLATES.items()}
    shape = min(distances, key=distances.get)
    # The colour from the object's core, the half of its pixels farthest from the background: soft
    # edges blend into the background and would pull a small pink star towards purple on black.
    core = mask & (distance >= np.median(distance[mask]))
    median = np.median(a[core], axis=0)
    names = list(COLOURS)
    colour = names[int(np.argmin([np.linalg.norm(median - np.array(COLOURS[c])) for c in names]))]
    return Verdict(colour, shape, distances[shape], float(mask.mean()))


def background(image: Image.Image) -> str:
    """The ``BACKGROUNDS`` name nearest the picture's border colour (its median, as ``check`` takes it)."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), axis=0)
    return min(BACKGROUNDS, key=lambda name: float(np.linalg.norm(border - np.array(BACKGROUNDS[name]))))


def expectations(combos, style=caption) -> list[tuple[str, str, str]]:
    """(prompt, colour, shape) for each (colour, shape, background): what a prompt should draw."""
    return [(style(shape, colour, background), colour, shape) for colour, shape, background in combos]


def colour_prompts(colour: str, style=caption, repeat: int = 4) -> list[tuple[str, str, None]]:
    """``colour`` asked on every base shape and background, ``repeat`` times over (for ``hit_rate``,
    one seed each): what counts is the colour, any shape."""
    combos = [(colour, shape, background) for shape in BASE_SHAPES for background in BACKGROUNDS]
    return [(prompt, colour, None) for prompt, _, _ in expectations(combos, style)] * repeat


def hit_rate(pipe, expected, seed: int = 0, steps: int = 20, guidance_scale: float = 7.5, batch: int = 16) -> float:
    """Share of ``expected`` (prompt, colour, shape) that ``pipe`` draws right, one picture each with
    seeds ``seed``, ``seed + 1``, ... (drawn on the CPU: the same everywhere). A colour or shape of
    None accepts any."""
    import torch

    expected = list(expected)
    hits = 0
    for start in range(0, len(expected), batch):
        chunk = expected[start:start + batch]
        images = pipe([prompt for prompt, _, _ in chunk], num_inference_steps=steps, guidance_scale=guidance_scale,
                      height=64, width=64,
                      generator=[torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]).images
        hits += sum(check(img).matches(colour, shape) for (_, colour, shape), img in zip(chunk, images))
    return hits / len(expected)
