"""The training set: a dataset folder's captioned images as pixel tensors for the VAE, batch by batch.

``CaptionedImages`` reads ``metadata.csv`` (``file_name,text``, what notebooks 01 and 02 write) and
crops and resizes each image to the training size or, with aspect-ratio buckets, to the bucket
nearest its shape (``bucket_sizes``). ``epoch_batches`` shuffles an epoch into batches of one size
each. Crops, flips and batch order are drawn from (seed, epoch, index), so a resumed run sees the
same ones. An image that cannot be read never ends a run: ``Unreadable`` names it once and the run
goes on without it. The latent cache (``latent_cache.py``) encodes these pixels once, before training.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def bucket_sizes(width: int, height: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """NovelAI-style buckets: sizes with about the area of width x height, aspect ratios up to 2:1.

    Sides are multiples of 1/8 of the shorter side, rounded to the VAE's 8 px (64 px at 512x512).
    """
    step = max(8, min(width, height) // 64 * 8)
    area, sizes = width * height, set()
    for w in range(step, int(math.sqrt(area * max_ratio)) + 1, step):
        h = area // w // step * step
        if max(w / h, h / w) <= max_ratio:
            sizes |= {(w, h), (h, w)}
    return sorted(sizes)


class CaptionedImages(torch.utils.data.Dataset):
    """Images and captions from ``metadata.csv`` (columns ``file_name,text``), ready for the VAE.

    Item ``i`` is ``{"index", "text", "pixels" (3, H, W) in [-1, 1]}``, or ``"error"`` instead of
    pixels when the image cannot be read: the training loop reports and skips it. Crops and flips
    are drawn from (seed, epoch, index), so they are the same after a resume. ``captions=False``
    (Textual Inversion, which writes its own) also reads a plain folder of images, captioned "".
    """

    def __init__(self, folder: str | Path, width: int, height: int, crop: str = "random", flip: bool = False,
                 buckets: bool = False, seed: int = 0, captions: bool = True):
        import pandas as pd

        self.folder, self.crop, self.flip, self.seed, self.epoch = Path(folder), crop, flip, seed, 0
        csv = self.folder / "metadata.csv"
        if not captions and not csv.exists():
            self.files = sorted(p.name for p in self.folder.iterdir()
                                if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            self.texts = [""] * len(self.files)
        else:
            if not csv.exists():
                raise FileNotFoundError(f"{csv} does not exist. A dataset folder holds the images and a metadata.csv "
                                        "with columns file_name,text (notebooks 01 and 02 write one).")
            table = pd.read_csv(csv, dtype=str, keep_default_na=False)
            missing = {"file_name", "text"} - set(table.columns)
            if missing:
                raise ValueError(f"{csv} has no column {sorted(missing)}; it needs file_name,text "
                                 f"(it has {list(table.columns)}).")
            blank = [i + 2 for i, name in enumerate(table.file_name) if not name.strip()]  # +2: header, 1-based
            if blank:
                raise ValueError(f"{csv}: empty file_name on line(s) {blank}. Fix or delete those lines.")
            self.files, self.texts = list(table.file_name), list(table.text)
        self.unreadable: dict[int, str] = {}
        if buckets:
            choices = bucket_sizes(width, height)
            self.sizes = [self._bucket(i, choices) for i in range(len(self.files))]
        else:
            self.sizes = [(width, height)] * len(self.files)

    def _bucket(self, i: int, choices: list[tuple[int, int]]) -> tuple[int, int] | None:
        try:
            with Image.open(self.folder / self.files[i]) as img:  # reads the header only
                w, h = img.size
        except Exception as e:  # any failure of one image, as in __getitem__
            self.unreadable[i] = f"{type(e).__name__}: {e}"
            return None
        return min(choices, key=lambda s: abs(math.log(s[0] / s[1]) - math.log(w / h)))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        item = {"index": i, "text": self.texts[i]}
        try:
            with Image.open(self.folder / self.files[i]) as img:
                item["pixels"] = self._transform(img.convert("RGB"), self.sizes[i], random.Random(f"{self.seed}/{self.epoch}/{i}"))
        # Whatever one image raises (missing, truncated, not an image, no permission, a decoder's ValueError,
        # PIL's DecompressionBombError, which is no OSError) is that image's problem: report it, skip it.
        except Exception as e:
            item["error"] = f"{type(e).__name__}: {e}"
        return item

    def _transform(self, img: Image.Image, size: tuple[int, int], rng: random.Random) -> torch.Tensor:
        w, h = size
        scale = max(w / img.width, h / img.height)  # cover the target, then crop the overhang
        img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.BICUBIC)
        dx, dy = img.width - w, img.height - h
        left, top = (rng.randint(0, dx), rng.randint(0, dy)) if self.crop == "random" else (dx // 2, dy // 2)
        img = img.crop((left, top, left + w, top + h))
        if self.flip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
        return pixels.permute(2, 0, 1)


def collate(items: list[dict]) -> dict:
    good = [it for it in items if "pixels" in it]
    return {"indices": [it["index"] for it in good], "texts": [it["text"] for it in good],
            "pixels": torch.stack([it["pixels"] for it in good]) if good else None,
            "errors": {it["index"]: it["error"] for it in items if "error" in it}}


def epoch_batches(sizes: dict[int, tuple[int, int]], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's batches of dataset indices: shuffled, every batch from one size (bucket)."""
    rng = random.Random(f"{seed}/{epoch}")
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, size in sorted(sizes.items()):
        by_size.setdefault(size, []).append(i)
    batches = []
    for indices in by_size.values():
        rng.shuffle(indices)
        batches += [indices[k:k + batch_size] for k in range(0, len(indices), batch_size)]
    rng.shuffle(batches)
    return batches


class Unreadable:
    """The images a run skips (file name -> why), each reported once wherever it turns up: reading the
    headers for buckets, encoding the cache or the validation images, loading a batch. Called as
    ``report(index, error)``; ``show=False`` (the other processes) records without printing."""

    def __init__(self, dataset: CaptionedImages, show: bool):
        self.dataset, self.show = dataset, show
        self.skipped: dict[str, str] = {}
        for i, error in dataset.unreadable.items():
            self(i, error)

    def __call__(self, i: int, error: str) -> None:
        name = self.dataset.files[i]
        if name not in self.skipped:
            self.skipped[name] = error
            if self.show:
                tqdm.write(f"Skipping unreadable image {self.dataset.folder / name}: {error}")
