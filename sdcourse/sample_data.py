"""The bundled sample dataset: coloured shapes on coloured backgrounds, with matching captions.

Small enough to ship and to train on a CPU, regular enough that a model visibly learns it
("a red circle on a gray background"), and holding one colour the miniature model has never
seen (purple), so that fine-tuning on it visibly teaches something. Layout is the Hugging Face
``imagefolder`` convention: ``images/*.png`` plus ``metadata.csv`` with columns ``file_name,text``.

Regenerate the committed copy with ``python -m sdcourse.sample_data data/sample``.
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

from . import world

# Purple is the new concept: the miniature model (sdcourse/miniature) never saw it, and notebook
# 03's fine-tune on this sample teaches it. The other three colours it knows.
COLOURS = ("red", "green", "blue", "purple")
BACKGROUNDS = tuple(world.BACKGROUNDS)
SHAPES = world.BASE_SHAPES
draw_shape = world.draw  # 128 px by default; the name practice.py and the tests import


def sample_records(seed: int = 0):
    """(file_name, caption, image) for every shape x colour x background, deterministically."""
    rng = random.Random(seed)
    for shape in SHAPES:
        for colour in COLOURS:
            for background in BACKGROUNDS:
                name = f"images/{colour}_{shape}_on_{background}.png"
                caption = world.caption(shape, colour, background)
                yield name, caption, draw_shape(shape, colour, background, rng)


def write_sample_dataset(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        for name, caption, img in sample_records():
            img.save(out / name, optimize=True)
            writer.writerow([name, caption])
    return out


def sample_dataset_dir() -> Path:
    """The bundled ``data/sample`` of a clone; in a pip install (Colab), the same data generated once."""
    from .runtime import REPO_ROOT
    from .tiny import cache_dir

    bundled = REPO_ROOT / "data" / "sample"
    if (bundled / "metadata.csv").exists():
        return bundled
    generated = cache_dir() / "sample"
    if not (generated / "metadata.csv").exists():
        write_sample_dataset(generated)
    return generated


if __name__ == "__main__":
    print(write_sample_dataset(sys.argv[1] if len(sys.argv) > 1 else "data/sample"))
