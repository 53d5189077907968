"""Images from the web: a list of URLs, or a booru-style JSON API searched by tags.

Downloads go easy on the sites and on the disk: retried with a doubling back-off after 429, 5xx and
network errors (or as long as ``Retry-After`` asks, up to a cap), one API request per
``min_interval``, a size cap per file, written via a .part file, and resumable (a valid image already
there is not fetched again). API keys go to the API and nowhere else, never into a message.
Like the local sources (``sources.py``) they return ``data.Candidate`` lists, a failed download as
a candidate with its reason, for ``data.build_dataset`` to clean and report.
"""

from __future__ import annotations

import email.utils
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from PIL import Image
from tqdm.auto import tqdm

from .captioning import tags_to_caption
from .data import Candidate, safe_stem, short_hash

VIDEO_SUFFIXES = {".mp4", ".webm", ".zip", ".swf"}  # booru posts we skip without downloading (.zip: ugoira)
RETRY_STATUSES = {429, 500, 502, 503, 504}


# --- HTTP -----------------------------------------------------------------------------------------

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
    return f"{safe_stem(path.stem)}_{short_hash(url)}{suffix}"


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


# --- A booru-style API ----------------------------------------------------------------------------

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
            "web.fill_credentials reads (notebook 01 calls it), or pass BooruConfig(credentials={...}).")


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
