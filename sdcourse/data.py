"""Turn whatever images a learner has into a clean image-caption dataset.

Sources (``sources.py``: a folder or Drive folder, an uploaded zip, a Hugging Face dataset;
``web.py``: a list of URLs, a booru-style JSON API) each return a list of ``Candidate`` (a
local file plus what is known about it, or why it could not be fetched). ``build_dataset`` decodes
every candidate once, cleans it and writes the Hugging Face ``imagefolder`` layout::

    dataset/images/*.png|jpg   dataset/metadata.csv (file_name,text,tags,source)   dataset/report.csv

Nothing is dropped silently: the report has one row per candidate with what happened and why.
The captions (``captioning``) and the caption editor (``widgets``) read and write the same
metadata.csv through ``read_metadata`` and ``write_metadata``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

LOSSLESS_FORMATS = {"PNG", "GIF", "BMP", "TIFF"}
KEEP_AS_IS_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}  # copied byte for byte when nothing changed


@dataclass
class Candidate:
    """One input image before cleaning, or the record of why it could not be fetched."""
    source: str               # what the learner gave (path, URL, booru post), as shown in the report
    path: Path | None = None  # the local file with its bytes; None when fetching failed
    text: str = ""            # caption, when the source had one
    tags: str = ""            # booru tags, space separated
    origin: str = ""          # where the picture came from (a post's source URL)
    error: str = ""           # why it could not be fetched
    note: str = ""            # something the report should mention (e.g. a caption's encoding)


# --- metadata.csv ---------------------------------------------------------------------------------

def read_metadata(dataset_dir: str | Path) -> pd.DataFrame:
    """``metadata.csv`` as strings (empty captions stay empty strings, not NaN)."""
    path = Path(dataset_dir) / "metadata.csv"
    table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8", encoding_errors="replace")
    if "file_name" not in table.columns:
        raise ValueError(f"{path} has no 'file_name' column (columns: {list(table.columns)}); the imagefolder "
                         "convention is a header line 'file_name,text' and one row per image.")
    return table


def _replace_text(path: Path, text: str, durable: bool = False) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: an interrupted write leaves the old
    file or the new one, whole. ``durable`` also flushes it to the disk before the rename, so that a crash of
    the machine cannot leave a half-written file either."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_metadata(dataset_dir: str | Path, table: pd.DataFrame, sidecars: bool | None = None) -> Path:
    """Write ``metadata.csv`` atomically; ``sidecars``: True writes a .txt per image, None updates existing ones."""
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / "metadata.csv"
    # The line ends the file had (Python's csv module writes \r\n, pandas \n): one caption changed is
    # one line changed, not every line of a dataset kept in git.
    ending = "\n"
    if path.exists():
        with open(path, "rb") as f:
            ending = "\r\n" if f.readline().endswith(b"\r\n") else "\n"
    # csv quoting keeps commas, quotes and newlines
    _replace_text(path, table.to_csv(index=False, lineterminator=ending), durable=True)
    if sidecars is not False and "text" in table.columns:
        for name, text in zip(table["file_name"], table["text"]):
            txt = (dataset_dir / name).with_suffix(".txt")
            if sidecars or txt.exists():
                _replace_text(txt, text)
    return path


def subset(dataset_dir: str | Path, word: str, out_dir: str | Path) -> Path:
    """The images whose caption or booru tags hold ``word`` (a whole word, any case; ``hatsune miku``
    also finds the tag ``hatsune_miku``), copied with their rows into a dataset of their own in
    ``out_dir``: what a LoRA of one concept (a character, a style, a colour) trains on. An empty
    ``word`` keeps the whole dataset and returns ``dataset_dir`` itself."""
    from .runtime import atomic_dir

    word = " ".join(word.replace("_", " ").split())
    if not word:
        return Path(dataset_dir)
    table = read_metadata(dataset_dir)
    pattern = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)
    texts = table.get("text", pd.Series([""] * len(table))).str.replace("_", " ")
    tags = table.get("tags", pd.Series([""] * len(table))).str.replace("_", " ")
    chosen = table[[bool(pattern.search(f"{text} {tag}")) for text, tag in zip(texts, tags)]]
    missing = [name for name in chosen["file_name"] if not (Path(dataset_dir) / name).is_file()]
    if missing:  # reported and left out, as training would skip them
        print(f"Not found, left out: {', '.join(missing)} (in {dataset_dir})")
        chosen = chosen[~chosen["file_name"].isin(missing)]
    if chosen.empty:
        raise ValueError(f"No caption or tag in {Path(dataset_dir) / 'metadata.csv'} holds the word {word!r}. "
                         "Choose a word its captions use (notebook 02 shows them), or leave it empty to train on "
                         "the whole dataset.")
    with atomic_dir(out_dir) as tmp:  # an interrupted copy never leaves half a dataset behind
        for name in chosen["file_name"]:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(dataset_dir) / name, tmp / name)
        write_metadata(tmp, chosen, sidecars=False)
    print(f"{len(chosen)} of {len(table)} images hold {word!r}: {out_dir}")
    return Path(out_dir)


# --- Cleaning -------------------------------------------------------------------------------------

@dataclass
class CleanConfig:
    resolution: int = 512            # the training resolution
    min_side: int | None = None      # shorter side below this is dropped; default resolution // 2
    max_side: int | None = None      # longer side above this is downscaled; default 2 * resolution
    max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485  # header sizes above this are refused (decompression bombs)
    near_duplicate_bits: int = 10    # perceptual hashes this close (of 256 bits) ...
    near_duplicate_colour: float = 4.0   # ... and 8x8 colour thumbnails this close (mean |diff|, 0-255): duplicates
    jpeg_quality: int = 95

    @property
    def min_side_px(self) -> int:
        return self.min_side if self.min_side is not None else self.resolution // 2

    @property
    def max_side_px(self) -> int:
        return self.max_side if self.max_side is not None else 2 * self.resolution


class BadImage(Exception):
    """A file that cannot become a training image; the message is the report's reason."""


def load_image(path: Path, config: CleanConfig) -> tuple[Image.Image, str, tuple[int, int], list[str]]:
    """Decode once: (RGB image, original format, original size, notes on what changed). Raises BadImage."""
    if path.stat().st_size == 0:
        raise BadImage("empty file (0 bytes)")
    notes = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit below
            source = Image.open(path)
        with source:
            if source.width * source.height > config.max_pixels:
                raise BadImage(f"header claims {source.width}x{source.height} = {source.width * source.height / 1e6:.0f} Mpx, "
                               f"over max_pixels ({config.max_pixels / 1e6:.0f} Mpx): a decompression bomb or a huge scan")
            fmt, original_size = source.format or "", source.size
            if getattr(source, "n_frames", 1) > 1:
                notes.append(f"animated ({source.n_frames} frames): first frame kept")
            if fmt == "JPEG" and max(source.size) > 2 * config.max_side_px:
                source.draft("RGB", (config.max_side_px, config.max_side_px))  # the JPEG decoder downscales: much faster
            source.load()
            if source.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                notes.append("rotated by its EXIF orientation")
            img = ImageOps.exif_transpose(source)  # always a copy, so the file can be closed
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb refused by Pillow: {e}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (Pillow cannot identify the content, whatever the extension)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"truncated or corrupt: {e}") from None
    if img.mode != "RGB":
        notes.append(f"converted {img.mode} to RGB")
        img = to_rgb(img)
    return img, fmt, original_size, notes


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any mode: 16/32-bit scaled to 8-bit, transparency composited on white."""
    if img.mode.startswith("I"):  # 16-bit PNGs open as I;16 or I: scale 0..65535 to 0..255, not clip
        pixels = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


HASH_SIDE = 16  # the difference hash has HASH_SIDE**2 bits


def fingerprint(img: Image.Image) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(hash of the exact pixels, 256-bit difference hash, 8x8 colour thumbnail) of an RGB image.

    The difference hash (dHash) records whether each pixel of a 17x16 grey thumbnail is darker than
    its right neighbour: it survives resizing and re-compression. It ignores colour, hence the
    colour thumbnail as a second check.
    """
    exact = hashlib.sha1(f"{img.size}".encode() + img.tobytes()).digest()
    grey = np.asarray(img.convert("L").resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.BILINEAR), dtype=np.int16)
    dhash = np.packbits(grey[:, 1:] > grey[:, :-1])
    colour = np.asarray(img.resize((8, 8), Image.Resampling.BILINEAR), dtype=np.float32).ravel()
    return exact, dhash, colour


POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint16)  # set bits per byte value


class DuplicateFinder:
    """Remembers kept images' fingerprints; says which earlier image a new one duplicates."""

    def __init__(self, config: CleanConfig):
        self.config = config
        self.exact: dict[bytes, str] = {}
        self.names: list[str] = []
        # Preallocated and doubled when full: appending row by row would copy O(n^2) bytes.
        self.hashes = np.zeros((256, HASH_SIDE**2 // 8), dtype=np.uint8)
        self.colours = np.zeros((256, 8 * 8 * 3), dtype=np.float32)

    def check(self, img: Image.Image, name: str) -> str | None:
        """The reason ``img`` is a duplicate, or None (and then it is remembered as ``name``)."""
        exact, dhash, colour = fingerprint(img)
        if exact in self.exact:
            return f"exact duplicate of {self.exact[exact]}"
        n = len(self.names)
        bits = POPCOUNT[self.hashes[:n] ^ dhash].sum(1)
        close = np.flatnonzero(bits <= self.config.near_duplicate_bits)
        close = close[np.abs(self.colours[close] - colour).mean(1) <= self.config.near_duplicate_colour]
        if close.size:
            i = close[np.argmin(bits[close])]
            return f"near duplicate of {self.names[i]} ({bits[i]} of {HASH_SIDE**2} hash bits differ)"
        if n == len(self.hashes):
            self.hashes = np.concatenate([self.hashes, np.zeros_like(self.hashes)])
            self.colours = np.concatenate([self.colours, np.zeros_like(self.colours)])
        self.hashes[n], self.colours[n] = dhash, colour
        self.exact[exact] = name
        self.names.append(name)
        return None


def safe_stem(name: str) -> str:
    """ASCII letters, digits, ``-`` and ``_`` only (accents dropped, others become ``_``), at most 60 chars."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9-]+", "_", ascii_name).strip("_")[:60] or "image"


def short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _printable(text: str) -> str:
    """File names with non-UTF-8 bytes reach Python as surrogates, which cannot be written to a CSV."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def output_name(candidate: Candidate, suffix: str) -> str:
    """Stable, unique, safe: the input's readable stem plus a hash of where it came from."""
    stem = Path(candidate.path).stem if candidate.path else candidate.source
    return f"images/{safe_stem(stem)}_{short_hash(candidate.source)}{suffix}"


def clean_one(candidate: Candidate, out_dir: Path, config: CleanConfig, duplicates: DuplicateFinder) -> dict:
    """Decode, check and write one candidate; returns its report row."""
    row = {"source": _printable(candidate.source), "status": "error", "reason": candidate.error,
           "file_name": "", "width": None, "height": None}
    if candidate.error:
        return row
    try:
        img, fmt, original_size, notes = load_image(Path(candidate.path), config)
    except BadImage as e:
        row["reason"] = str(e)
        return row
    except OSError as e:  # unreadable file (permissions, vanished)
        row["reason"] = f"cannot read the file: {e}"
        return row
    width, height = img.size
    if min(width, height) < config.min_side_px:
        return {**row, "status": "dropped", "width": width, "height": height,
                "reason": f"too small: {width}x{height}, shorter side under min_side={config.min_side_px} px"}
    if max(width, height) > config.max_side_px:
        img.thumbnail((config.max_side_px, config.max_side_px), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if sorted(img.size) != sorted(original_size):  # (sorted: an EXIF rotation swaps the sides)
        notes.append("downscaled from {}x{}".format(*original_size))
    unchanged = not notes and fmt in KEEP_AS_IS_FORMATS
    suffix = KEEP_AS_IS_FORMATS[fmt] if unchanged else ".png" if fmt in LOSSLESS_FORMATS else ".jpg"
    name = output_name(candidate, suffix)
    duplicate = duplicates.check(img, name)
    if duplicate:
        return {**row, "status": "dropped", "reason": duplicate, "width": img.width, "height": img.height}
    dest = out_dir / name
    if unchanged:
        shutil.copyfile(candidate.path, dest)  # keep the original bytes: no re-encoding loss
    elif suffix == ".jpg":
        img.save(dest, quality=config.jpeg_quality)
    else:
        img.save(dest)
    if candidate.note:
        notes.append(candidate.note)
    return {**row, "status": "kept", "reason": "; ".join(notes), "file_name": name, "width": img.width, "height": img.height}


def build_dataset(candidates: list[Candidate], out_dir: str | Path, config: CleanConfig = CleanConfig(),
                  sidecar_captions: bool = False, overwrite: bool = False) -> pd.DataFrame:
    """Clean every candidate into ``out_dir`` (imagefolder layout); return and save the report.

    ``out_dir/metadata.csv`` gets ``file_name,text,tags,source``; ``out_dir/report.csv`` one row per
    candidate. ``sidecar_captions`` also writes ``images/<name>.txt`` (kohya / AUTOMATIC1111 style).
    """
    out_dir = Path(out_dir)
    inside = [c.source for c in candidates if c.path and out_dir.resolve() in Path(c.path).resolve().parents]
    if inside:
        raise ValueError(f"{len(inside)} inputs (e.g. {inside[0]}) are inside {out_dir}, the folder being written: "
                         "read from the original images, or write the dataset to another folder.")
    if (out_dir / "metadata.csv").exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a dataset (captions you edited in notebook 02 live in its "
                              "metadata.csv). Pass overwrite=True to replace it, or choose another folder.")
    shutil.rmtree(out_dir / "images", ignore_errors=True)  # no stale images from an earlier build
    (out_dir / "metadata.csv").unlink(missing_ok=True)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    duplicates = DuplicateFinder(config)
    rows, metadata = [], []
    for candidate in tqdm(candidates, desc="Cleaning", unit="img"):
        row = clean_one(candidate, out_dir, config, duplicates)
        rows.append(row)
        if row["status"] == "kept":
            metadata.append({"file_name": row["file_name"], "text": _printable(candidate.text),
                             "tags": candidate.tags, "source": _printable(candidate.origin or candidate.source)})
    report = pd.DataFrame(rows, columns=["source", "status", "reason", "file_name", "width", "height"])
    report.to_csv(out_dir / "report.csv", index=False, encoding="utf-8")
    if not metadata:
        raise ValueError(f"No image survived cleaning ({len(rows)} inputs); see the reasons in {out_dir / 'report.csv'}.")
    write_metadata(out_dir, pd.DataFrame(metadata), sidecars=sidecar_captions)
    counts = report["status"].value_counts()
    print(f"{len(rows)} inputs: {counts.get('kept', 0)} kept, {counts.get('dropped', 0)} dropped, "
          f"{counts.get('error', 0)} errors. Report: {out_dir / 'report.csv'}")
    return report


# --- Looking at the result ------------------------------------------------------------------------

def summary(report: pd.DataFrame) -> pd.DataFrame:
    """How often each reason occurs per status, details (sizes, file names) left out; most common first.

    An image can have several notes ("converted CMYK to RGB; downscaled"): each is counted.
    """
    notes = report.assign(reason=report["reason"].fillna("").str.split("; ")).explode("reason")
    notes["reason"] = notes["reason"].str.replace(r" (of|from) .*| \(.*|: .*", "", regex=True).replace("", "unchanged")
    return (notes.groupby(["status", "reason"]).size().rename("count").reset_index()
            .sort_values(["status", "count"], ascending=[False, False], ignore_index=True))


def plot_sizes(report: pd.DataFrame):
    """Histograms of the kept images' longer side and aspect ratio (a matplotlib figure)."""
    import matplotlib.pyplot as plt

    kept = report[report["status"] == "kept"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
    ax1.hist(kept[["width", "height"]].max(axis=1), bins=20, color="tab:blue")
    ax1.set(title="Longer side (px)", xlabel="pixels", ylabel="images")
    ax2.hist(kept["width"] / kept["height"], bins=20, color="tab:orange")
    ax2.set(title="Aspect ratio (width / height)", xlabel="ratio", ylabel="images")
    fig.suptitle(f"{len(kept)} kept images")
    fig.tight_layout()
    return fig


def plot_preview(dataset_dir: str | Path, n: int = 12, cols: int = 4, seed: int = 0, column: str = "text"):
    """A grid of ``n`` random images of a dataset with their captions (a matplotlib figure)."""
    import textwrap

    import matplotlib.pyplot as plt

    dataset_dir = Path(dataset_dir)
    table = read_metadata(dataset_dir)
    shown = table.sample(min(n, len(table)), random_state=seed)
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (_, row) in zip(axes.ravel(), shown.iterrows()):
        with Image.open(dataset_dir / row["file_name"]) as img:
            ax.imshow(img.convert("RGB"))
        caption = textwrap.shorten(row[column], 96, placeholder=" ...") or "(no caption yet)"
        ax.set_title(textwrap.fill(caption, 32), fontsize=8)  # at most 3 lines
    fig.tight_layout()
    return fig
