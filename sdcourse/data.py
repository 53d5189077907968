"""Turn whatever images a learner has into a clean image-caption dataset.

Sources each return a list of ``Candidate`` (a local file plus what is known about it, or why it
could not be fetched): a folder or Drive folder, an uploaded zip, a list of URLs, a booru-style
JSON API, a Hugging Face dataset. ``build_dataset`` decodes every candidate once, cleans it and
writes the Hugging Face ``imagefolder`` layout::

    dataset/images/*.png|jpg   dataset/metadata.csv (file_name,text,tags,source)   dataset/report.csv

Nothing is dropped silently: the report has one row per candidate with what happened and why.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import re
import shutil
import threading
import time
import unicodedata
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from .captioning import tags_to_caption

TEXT_SUFFIXES = {".txt", ".csv", ".json", ".jsonl"}  # captions and metadata, not images
VIDEO_SUFFIXES = {".mp4", ".webm", ".zip", ".swf"}  # booru posts we skip without downloading (.zip: ugoira)
LOSSLESS_FORMATS = {"PNG", "GIF", "BMP", "TIFF"}
KEEP_AS_IS_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}  # copied byte for byte when nothing changed
RETRY_STATUSES = {429, 500, 502, 503, 504}


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


# --- Sources: local files -------------------------------------------------------------------------

def read_caption_file(path: Path) -> tuple[str, str]:
    """A caption file's text and a note: UTF-8 (with or without BOM); other bytes become U+FFFD, noted."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig").strip(), ""
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace").strip(), (
            f"{path.name} is not UTF-8: undecodable bytes became U+FFFD; re-save it as UTF-8 or fix the caption in notebook 02")


def read_metadata(dataset_dir: str | Path) -> pd.DataFrame:
    """``metadata.csv`` as strings (empty captions stay empty strings, not NaN)."""
    path = Path(dataset_dir) / "metadata.csv"
    table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8", encoding_errors="replace")
    if "file_name" not in table.columns:
        raise ValueError(f"{path} has no 'file_name' column (columns: {list(table.columns)}); the imagefolder "
                         "convention is a header line 'file_name,text' and one row per image.")
    return table


def write_metadata(dataset_dir: str | Path, table: pd.DataFrame, sidecars: bool | None = None) -> Path:
    """Write ``metadata.csv`` atomically; ``sidecars``: True writes a .txt per image, None updates existing ones."""
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / "metadata.csv"
    tmp = path.with_suffix(".csv.tmp")
    table.to_csv(tmp, index=False, encoding="utf-8")  # csv quoting keeps commas, quotes and newlines
    os.replace(tmp, path)
    if sidecars is not False and "text" in table.columns:
        for name, text in zip(table["file_name"], table["text"]):
            txt = (dataset_dir / name).with_suffix(".txt")
            if sidecars or txt.exists():
                txt.write_text(text, encoding="utf-8")
    return path


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


# --- Sources: HTTP --------------------------------------------------------------------------------

class FetchError(Exception):
    """A download that failed for good (after retries, or not worth retrying)."""


def retry_after_seconds(header: str | None, default: float) -> float:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), else ``default``."""
    if not header:
        return default
    if header.strip().isdigit():
        return float(header)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(header).timestamp() - time.time())
    except (TypeError, ValueError):
        return default


class RateLimiter:
    """At most one call per ``min_interval`` seconds, across threads."""

    def __init__(self, min_interval: float):
        self.min_interval = min_interval
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            delay = self._next - now
            self._next = max(now, self._next) + self.min_interval
        if delay > 0:
            time.sleep(delay)


@dataclass
class HttpConfig:
    timeout: tuple[float, float] = (10.0, 60.0)  # seconds to connect, seconds between bytes
    retries: int = 4          # extra attempts after 429, 5xx and network errors
    backoff: float = 1.0      # first wait in seconds, doubled each attempt (unless Retry-After says otherwise)
    max_wait: float = 120.0   # never sleep longer than this for one retry
    max_bytes: int = 50 * 2**20  # larger downloads are aborted
    workers: int = 4          # parallel downloads
    user_agent: str = "sdcourse dataset builder (https://github.com/sdcourse/sdcourse)"


def new_session(config: HttpConfig):
    import requests

    session = requests.Session()
    session.headers["User-Agent"] = config.user_agent
    return session


def get_with_retries(session, url: str, handle, config: HttpConfig, params: dict | None = None,
                     limiter: RateLimiter | None = None):
    """GET ``url`` and return ``handle(response)``; retry 429/5xx and network errors with back-off.

    Other HTTP errors (404, 403...) are not retried. Raises FetchError when it gives up.
    """
    import requests

    error = ""
    for attempt in range(config.retries + 1):
        wait = config.backoff * 2 ** attempt
        if limiter:
            limiter.wait()
        try:
            with session.get(url, params=params, timeout=config.timeout, stream=True) as response:
                if response.status_code in RETRY_STATUSES:
                    error = f"HTTP {response.status_code} {response.reason}"
                    wait = retry_after_seconds(response.headers.get("Retry-After"), wait)
                elif response.status_code >= 400:
                    raise FetchError(f"HTTP {response.status_code} {response.reason}")
                else:
                    return handle(response)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            error = type(e).__name__  # its message repeats the URL, which may carry an API key
        if attempt < config.retries:
            time.sleep(min(wait, config.max_wait))
    raise FetchError(f"{error} (gave up after {config.retries + 1} attempts)")


def url_file_name(url: str) -> str:
    """A safe, stable local file name for a URL: a readable part plus a hash of the whole URL."""
    path = PurePosixPath(urlsplit(url).path)
    suffix = path.suffix.lower() if re.fullmatch(r"\.[a-z0-9]{2,5}", path.suffix.lower()) else ".img"
    return f"{safe_stem(path.stem)}_{_short_hash(url)}{suffix}"


def is_valid_image(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # any decoding failure means "fetch it again"
        return False


def download(session, url: str, dest: Path, config: HttpConfig) -> Path:
    """Fetch ``url`` into ``dest`` (via a .part file) unless a valid image is already there."""
    if dest.exists() and is_valid_image(dest):
        return dest
    part = dest.with_name(dest.name + ".part")

    def save(response):
        size = int(response.headers.get("Content-Length") or 0)
        if size > config.max_bytes:
            raise FetchError(f"{size / 2**20:.1f} MiB, over the {config.max_bytes / 2**20:.0f} MiB cap")
        written = 0
        with open(part, "wb") as out:
            for chunk in response.iter_content(1 << 16):
                written += len(chunk)
                if written > config.max_bytes:
                    raise FetchError(f"over the {config.max_bytes / 2**20:.0f} MiB cap; aborted")
                out.write(chunk)

    try:
        get_with_retries(session, url, save, config)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def download_all(jobs: list[tuple[Candidate, str, str]], folder: Path, config: HttpConfig, session=None) -> list[Candidate]:
    """Download each (candidate, url, file name) into ``folder`` in parallel; failures are recorded on the candidate."""
    folder.mkdir(parents=True, exist_ok=True)
    session = session or new_session(config)

    def fetch(job):
        candidate, url, file_name = job
        try:
            candidate.path = download(session, url, folder / file_name, config)
        except (FetchError, OSError) as e:
            candidate.error = f"download failed: {e}"
        return candidate

    with ThreadPoolExecutor(config.workers) as pool:
        return list(tqdm(pool.map(fetch, jobs), total=len(jobs), desc="Downloading", unit="img"))


def from_urls(urls: list[str], folder: str | Path, config: HttpConfig = HttpConfig()) -> list[Candidate]:
    """Download a list of image URLs (blank lines and # comments ignored); resumable."""
    urls = [u.strip() for u in urls if u.strip() and not u.strip().startswith("#")]
    return download_all([(Candidate(source=u), u, url_file_name(u)) for u in urls], Path(folder), config)


# --- Sources: a booru-style API -------------------------------------------------------------------

@dataclass
class BooruConfig:
    url: str = "https://safebooru.org"
    api: str = "dapi"            # "dapi" (Gelbooru, Safebooru: index.php?page=dapi) or "danbooru" (/posts.json)
    page_size: int = 100         # posts per API request (sites cap it; Danbooru at 200)
    min_interval: float = 1.0    # seconds between API requests: stay well under the site's rate limit
    prefer_sample: bool = True   # the site's resized copy (~850 px) instead of the original: 5-10x less to download
    credentials: dict = field(default_factory=dict, repr=False)  # API key parameters; sent to this API only, never printed


# Sites whose API answers 401 Unauthorized without these parameters (Gelbooru since 2025):
# site -> {API parameter: the Colab secret or environment variable that holds it}.
REQUIRED_CREDENTIALS = {"gelbooru.com": {"api_key": "GELBOORU_API_KEY", "user_id": "GELBOORU_USER_ID"}}
CREDENTIALS_PAGE = {"gelbooru.com": "https://gelbooru.com/index.php?page=account&s=options"}


def required_credentials(config: BooruConfig) -> dict[str, str]:
    """{API parameter: secret name} that ``config.url``'s site requires: api_key and user_id for Gelbooru."""
    host = (urlsplit(config.url).hostname or "").lower()
    return next((names for site, names in REQUIRED_CREDENTIALS.items() if host == site or host.endswith("." + site)), {})


def fill_credentials(config: BooruConfig) -> BooruConfig:
    """Put the site's required credentials into ``config.credentials``, each read by ``runtime.read_secret``
    (a Colab secret, else an environment variable, else hidden input): for Gelbooru ``GELBOORU_API_KEY``
    and ``GELBOORU_USER_ID``. Nothing is printed."""
    from .runtime import read_secret

    for name, secret in required_credentials(config).items():
        if not config.credentials.get(name):
            config.credentials[name] = read_secret(secret)
    return config


def _missing_credentials_message(config: BooruConfig, missing) -> str:
    host = (urlsplit(config.url).hostname or "").lower()
    page = next((url for site, url in CREDENTIALS_PAGE.items() if host.endswith(site)), "the site's account settings")
    secrets = " and ".join(required_credentials(config)[name] for name in missing)
    return (f"{host} answers 401 without {' and '.join(missing)}: copy them from {page} (logged in, under 'API "
            f"Access Credentials') into Colab secrets (or environment variables) named {secrets}, which "
            "data.fill_credentials reads (notebook 01 calls it), or pass BooruConfig(credentials={...}).")


@dataclass
class Post:
    id: int
    file_url: str
    tags: str
    source: str


def parse_posts(payload, config: BooruConfig) -> list[Post]:
    """Posts from one API page: Danbooru's list, Safebooru's list or Gelbooru's {"post": [...]}."""
    if isinstance(payload, dict):
        payload = payload.get("post", [])
    posts = []
    for raw in payload or []:
        if config.api == "danbooru":
            url = (config.prefer_sample and raw.get("large_file_url")) or raw.get("file_url") or ""
            tags = raw.get("tag_string", "")
        else:
            url = (config.prefer_sample and raw.get("sample_url")) or raw.get("file_url") or ""
            if not url and raw.get("directory") and raw.get("image"):
                url = f"{config.url.rstrip('/')}/images/{raw['directory']}/{raw['image']}"
            tags = raw.get("tags", "")
        if url.startswith("//"):
            url = "https:" + url
        posts.append(Post(id=int(raw["id"]), file_url=url, tags=" ".join(tags.split()), source=raw.get("source") or ""))
    return posts


def page_request(config: BooruConfig, tags: str, page: int) -> tuple[str, dict]:
    """URL and parameters of result page ``page`` (0-based) for ``tags``."""
    base = config.url.rstrip("/")
    if not base.startswith(("https://", "http://")):  # requests' own error would print the URL, API key included
        raise ValueError(f"BooruConfig.url must start with https://, got {base!r}")
    if config.api == "danbooru":
        return f"{base}/posts.json", {"tags": tags, "page": page + 1, "limit": config.page_size}
    if config.api == "dapi":
        return f"{base}/index.php", {"page": "dapi", "s": "post", "q": "index", "json": 1,
                                     "tags": tags, "pid": page, "limit": config.page_size}
    raise ValueError(f"BooruConfig.api must be 'danbooru' or 'dapi', got {config.api!r}")


def search_booru(config: BooruConfig, tags: str, limit: int, http: HttpConfig = HttpConfig(),
                 session=None) -> tuple[list[Post], list[Candidate]]:
    """Up to ``limit`` distinct posts matching ``tags``, page by page at most one request per ``min_interval``.

    Returns the posts and report entries for pages that failed (paging stops at the first one).
    """
    def parse(response):
        try:
            return parse_posts(response.json() if response.content.strip() else [], config)
        except ValueError as e:
            raise FetchError(f"not a JSON page of posts ({e})") from None

    missing = [name for name in required_credentials(config) if not config.credentials.get(name)]
    if missing:
        raise ValueError(_missing_credentials_message(config, missing))
    session = session or new_session(http)
    limiter = RateLimiter(config.min_interval)
    posts: dict[int, Post] = {}
    failed = []
    page = 0
    while len(posts) < limit:
        url, params = page_request(config, tags, page)
        try:
            found = get_with_retries(session, url, parse, http, params={**params, **config.credentials}, limiter=limiter)
        except FetchError as e:
            hint = " (this API wants credentials: BooruConfig(credentials=...))" if "HTTP 401" in str(e) else ""
            failed.append(Candidate(source=f"{url} tags={tags!r} page {page}", error=f"API page failed: {e}{hint}"))
            break
        for post in found:
            posts.setdefault(post.id, post)  # pages shift while new posts arrive: keep each post once
        if len(found) < config.page_size:
            break
        page += 1
    return list(posts.values())[:limit], failed


def from_booru(config: BooruConfig, tags: str, folder: str | Path, limit: int, tag_captions: bool = False,
               http: HttpConfig = HttpConfig()) -> list[Candidate]:
    """Search a booru, download the posts' images (skipping files already there), keep tags and source.

    ``tag_captions`` puts a tag-style caption (``captioning.tags_to_caption``) in ``text``.
    """
    session = new_session(http)
    posts, failed = search_booru(config, tags, limit, http, session)
    jobs, skipped = [], []
    for post in posts:
        candidate = Candidate(source=f"{config.url.rstrip('/')} post {post.id}", tags=post.tags, origin=post.source,
                              text=tags_to_caption(post.tags) if tag_captions else "")
        suffix = PurePosixPath(urlsplit(post.file_url).path).suffix.lower()
        if not post.file_url:
            candidate.error = "post has no file URL (deleted, or restricted to logged-in users)"
            skipped.append(candidate)
        elif suffix in VIDEO_SUFFIXES:
            candidate.error = f"post is a {suffix} file (video or animation), not a still image; not downloaded"
            skipped.append(candidate)
        else:
            jobs.append((candidate, post.file_url, f"post_{post.id}{suffix or '.img'}"))
    return failed + skipped + download_all(jobs, Path(folder), http, session)


# --- Sources: a Hugging Face dataset --------------------------------------------------------------

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


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _printable(text: str) -> str:
    """File names with non-UTF-8 bytes reach Python as surrogates, which cannot be written to a CSV."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def output_name(candidate: Candidate, suffix: str) -> str:
    """Stable, unique, safe: the input's readable stem plus a hash of where it came from."""
    stem = Path(candidate.path).stem if candidate.path else candidate.source
    return f"images/{safe_stem(stem)}_{_short_hash(candidate.source)}{suffix}"


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
