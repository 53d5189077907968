"""Where a dataset's images come from: a folder (or Drive folder), an uploaded zip, a Hugging Face
dataset read through the ``datasets`` library. Images downloaded by URL or from a booru: ``web.py``.

Each source returns a list of ``data.Candidate``: a local file plus what is known about it (its
caption from a metadata.csv or a sidecar .txt), or the reason it could not be had. Nothing is
cleaned here; ``data.build_dataset`` decodes and cleans every candidate once.
"""

from __future__ import annotations

import shutil
import zipfile
from itertools import islice
from pathlib import Path

from tqdm.auto import tqdm

from .data import Candidate, read_metadata

TEXT_SUFFIXES = {".txt", ".csv", ".json", ".jsonl"}  # captions and metadata, not images


# --- Local files ----------------------------------------------------------------------------------

def read_caption_file(path: Path) -> tuple[str, str]:
    """A caption file's text and a note: UTF-8 (with or without BOM); other bytes become U+FFFD, noted."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig").strip(), ""
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace").strip(), (
            f"{path.name} is not UTF-8: undecodable bytes became U+FFFD; re-save it as UTF-8 or fix the caption in notebook 02")


def from_folder(folder: str | Path) -> list[Candidate]:
    """Every file under ``folder`` (recursive), with captions from its metadata.csv or sidecar .txt files.

    Hidden files and ``__MACOSX`` folders are skipped. Rows of metadata.csv that name missing files
    become report entries rather than errors.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"No folder at {folder}. In Colab, mount Drive first and check the path in the file browser.")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(
        part.startswith(".") or part == "__MACOSX" for part in p.relative_to(folder).parts))
    images = [p for p in files if p.suffix.lower() not in TEXT_SUFFIXES]
    if not images:
        raise ValueError(f"{folder} holds no files to use (found {len(files)} caption/metadata files only)."
                         if files else f"{folder} is empty: put images in it (sub-folders are fine).")
    listed: dict[Path, str] = {}
    candidates = []
    if (folder / "metadata.csv").exists():
        table = read_metadata(folder)
        for name, text in zip(table["file_name"], table.get("text", [""] * len(table))):
            path = folder / name
            if path.is_file():
                listed[path] = text
            else:
                candidates.append(Candidate(source=f"metadata.csv: {name}", error="listed in metadata.csv but the file is missing"))
    for path in images:
        candidate = Candidate(source=str(path.relative_to(folder)), path=path, text=listed.get(path, ""))
        sidecar = path.with_suffix(".txt")
        if path not in listed and sidecar.is_file():
            candidate.text, candidate.note = read_caption_file(sidecar)
        candidates.append(candidate)
    return candidates


def extract_zip(zip_path: str | Path, target: str | Path, max_bytes: int = 200 * 2**20) -> list[Candidate]:
    """Extract an uploaded zip safely, then read it as a folder.

    Entries that would land outside ``target`` (``../``, absolute paths) and entries larger than
    ``max_bytes`` are not extracted but listed in the report.
    """
    target = Path(target).resolve()
    target.mkdir(parents=True, exist_ok=True)
    refused = []
    with zipfile.ZipFile(zip_path) as archive:
        for entry in archive.infolist():
            dest = (target / entry.filename).resolve()
            if entry.filename.startswith(("/", "\\")) or not dest.is_relative_to(target) or dest == target:
                refused.append(Candidate(source=f"{Path(zip_path).name}: {entry.filename}",
                                         error="zip entry points outside the target folder; not extracted"))
            elif entry.file_size > max_bytes:
                refused.append(Candidate(source=f"{Path(zip_path).name}: {entry.filename}",
                                         error=f"zip entry is {entry.file_size / 2**20:.0f} MiB, over the {max_bytes / 2**20:.0f} MiB cap"))
            elif not entry.is_dir():
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(entry) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
    return refused + from_folder(target)


# --- A Hugging Face dataset -----------------------------------------------------------------------

def from_hf_dataset(name: str, folder: str | Path, split: str = "train", image_column: str = "image",
                    text_column: str | None = None, limit: int | None = None, **load_kwargs) -> list[Candidate]:
    """Stream a Hugging Face dataset and write its images' original bytes to ``folder``.

    Streaming fetches only the ``limit`` rows used. ``load_kwargs`` go to ``datasets.load_dataset``
    (e.g. ``data_dir=`` for a local ``imagefolder``).
    """
    import datasets

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = datasets.load_dataset(name, split=split, streaming=True, **load_kwargs)
    columns = rows.column_names  # None when a streamed dataset does not declare its features
    for wanted in (image_column, text_column):
        if wanted and columns is not None and wanted not in columns:
            raise ValueError(f"{name} has no column {wanted!r}; its columns are {columns}")
    rows = rows.cast_column(image_column, datasets.Image(decode=False))  # keep the original bytes: decode once, later
    candidates = []
    for i, row in enumerate(tqdm(islice(rows, limit), total=limit, desc=f"Reading {name}", unit="img")):
        image = row[image_column]
        local = image.get("path") and Path(image["path"]).is_file()
        if image.get("bytes") or local:
            dest = folder / f"{i:06d}{Path(image.get('path') or '').suffix.lower() or '.img'}"
            if not dest.exists():
                dest.write_bytes(image["bytes"] or Path(image["path"]).read_bytes())
        else:  # a file in a remote repository: let datasets open it (with the hub token, if any)
            dest = folder / f"{i:06d}.png"
            if not dest.exists():
                datasets.Image().decode_example(image).save(dest)
        text = row.get(text_column) if text_column else ""
        candidates.append(Candidate(source=f"{name}[{split}][{i}]", path=dest, text=str(text or "")))
    return candidates
