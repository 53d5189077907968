"""Practice material for notebook 01 and the tests: a booru on loopback and a folder of broken files.

``LocalBooru`` serves the bundled sample images as booru posts, in the Danbooru (``/posts.json``)
and Gelbooru/Safebooru (``index.php?page=dapi``) styles, on 127.0.0.1 only, with switches for the
trouble real sites give: slow answers, server errors, 429 rate limiting with Retry-After, 401 without
an API key. It stops by itself after ``lifetime`` seconds. ``write_problem_files`` makes the files a real collection
contains sooner or later (truncated, CMYK, 16-bit, decompression bombs, duplicates...).
"""

from __future__ import annotations

import io
import json
import mimetypes
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from PIL import Image

from .sample_data import draw_shape, sample_dataset_dir

API_PATHS = ("/posts.json", "/index.php")


@dataclass
class Trouble:
    delay: float = 0.0         # seconds before every answer
    min_interval: float = 0.0  # API requests closer together than this get 429 with Retry-After
    retry_after: int = 1       # the Retry-After header's seconds
    flaky: dict[str, int] = field(default_factory=dict)  # path -> answer 503 that many times, then work
    broken: set[str] = field(default_factory=set)        # paths that always answer 500
    credentials: dict[str, str] = field(default_factory=dict, repr=False)  # API answers 401 without them (Gelbooru)


class LocalBooru:
    """A booru-style HTTP server on 127.0.0.1 (a random free port). Use as a context manager.

    ``posts``: dicts with ``id``, ``tags`` (space separated), ``file`` (a key of ``files``), ``source``.
    ``files``: URL path (without the leading /) -> bytes. ``log`` records (path, status) of every request.
    """

    def __init__(self, posts: list[dict], files: dict[str, bytes], trouble: Trouble | None = None,
                 lifetime: float = 900):
        self.posts, self.files, self.trouble, self.lifetime = posts, files, trouble or Trouble(), lifetime
        self.log: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._last_api_request = float("-inf")
        self._server: ThreadingHTTPServer | None = None

    @classmethod
    def from_sample(cls, **kwargs) -> "LocalBooru":
        """The sample's shapes as posts tagged like a booru would: ``red_circle white_background ...``."""
        posts, files = [], {}
        for i, path in enumerate(sorted((sample_dataset_dir() / "images").glob("*.png")), start=1):
            colour, shape, _, background = path.stem.split("_")
            files[f"images/{path.name}"] = path.read_bytes()
            posts.append({"id": i, "file": f"images/{path.name}", "source": f"https://example.com/shapes/{path.stem}",
                          "tags": f"{colour}_{shape} {background}_background simple_background highres"})
        return cls(posts, files, **kwargs)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "LocalBooru":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        stopper = threading.Timer(self.lifetime, self.stop)  # never outlive a forgotten notebook
        stopper.daemon = True
        stopper.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def statuses(self, path: str | None = None) -> list[int]:
        """HTTP statuses answered so far (for ``path`` only, if given)."""
        with self._lock:
            return [status for p, status in self.log if path is None or p == path]

    def answer(self, path: str, query: dict[str, list[str]]) -> tuple[int, dict, bytes]:
        """(status, headers, body) for one GET request."""
        trouble = self.trouble
        with self._lock:
            if path in trouble.broken:
                return 500, {}, b"broken on purpose"
            if trouble.flaky.get(path, 0) > 0:
                trouble.flaky[path] -= 1
                return 503, {}, b"flaky on purpose"
            if path in API_PATHS:
                now = time.monotonic()
                too_soon = now - self._last_api_request < trouble.min_interval
                self._last_api_request = now
                if too_soon:
                    return 429, {"Retry-After": str(trouble.retry_after)}, b"slow down"
        if path in API_PATHS:
            if any(query.get(name) != [value] for name, value in trouble.credentials.items()):
                return 401, {}, b'"Missing authentication"'
            return 200, {"Content-Type": "application/json"}, json.dumps(self.search(path, query)).encode()
        body = self.files.get(path.lstrip("/"))
        if body is None:
            return 404, {}, b"not found"
        return 200, {"Content-Type": mimetypes.guess_type(path)[0] or "application/octet-stream"}, body

    def search(self, path: str, query: dict[str, list[str]]) -> list[dict]:
        """One page of posts having all the queried tags, newest first, in the API's own shape."""
        wanted = query.get("tags", [""])[0].split()
        found = sorted((p for p in self.posts if all(t in p["tags"].split() for t in wanted)), key=lambda p: -p["id"])
        limit = int(query.get("limit", ["20"])[0])
        if path == "/posts.json":  # Danbooru: page is 1-based
            start = (int(query.get("page", ["1"])[0]) - 1) * limit
            return [{"id": p["id"], "file_url": f"{self.url}/{p['file']}", "large_file_url": f"{self.url}/{p['file']}",
                     "tag_string": p["tags"], "source": p["source"]} for p in found[start:start + limit]]
        start = int(query.get("pid", ["0"])[0]) * limit  # Gelbooru dapi: pid is 0-based
        return [{"id": p["id"], "directory": str(Path(p["file"]).parent), "image": Path(p["file"]).name,
                 "file_url": f"{self.url}/{p['file']}", "sample_url": "", "tags": p["tags"], "source": p["source"]}
                for p in found[start:start + limit]]


def _handler(booru: LocalBooru):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            parts = urlsplit(self.path)
            time.sleep(booru.trouble.delay)
            status, headers, body = booru.answer(parts.path, parse_qs(parts.query))
            with booru._lock:
                booru.log.append((parts.path, status))
            try:
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                pass

        def log_message(self, *args):  # keep notebooks and test output quiet
            pass

    return Handler


# --- A folder of problem files --------------------------------------------------------------------

def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but holds almost no data: a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _encoded(img: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def write_problem_files(folder: str | Path) -> dict[str, str]:
    """Write files that break naive pipelines into ``folder`` (emptied first); returns {file name: what is special}."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "sub folder").mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    picture = draw_shape("triangle", "green", "white", rng, size=320)
    red_circle = draw_shape("circle", "red", "white", rng, size=320)
    animated = [draw_shape("circle", colour, "black", rng, size=320) for colour in ("red", "green", "blue")]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; viewers rotate the picture 90 degrees
    palette = draw_shape("square", "blue", "white", rng, size=320).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    sixteen_bit = Image.linear_gradient("L").resize((384, 288)).point(lambda v: v * 257, "I").convert("I;16")
    files = {
        "empty.png": (b"", "zero bytes (an interrupted copy)"),
        "truncated.jpg": (_encoded(picture, "JPEG")[:1500], "a JPEG cut short (an interrupted download)"),
        "notes.jpg": (b"<html>403 Forbidden</html>", "an HTML error page saved with an image extension"),
        "bomb.png": (_png_header_only(60000, 60000), "a PNG header claiming 60000x60000 px (3.6 Gpx): a decompression bomb"),
        "dot.png": (_encoded(Image.new("RGB", (1, 1), "red"), "PNG"), "a 1x1 image (a tracking pixel)"),
        "cmyk.jpg": (_encoded(picture.convert("CMYK"), "JPEG"), "a CMYK JPEG (print workflow); captioned in metadata.csv"),
        "sixteen_bit.png": (_encoded(sixteen_bit, "PNG"), "a 16-bit greyscale PNG"),
        "sub folder/palette with transparency.png": (
            _encoded(palette, "PNG", transparency=0), "a palette image with a transparent colour, in a sub-folder"),
        "animated.gif": (_encoded(animated[0], "GIF", save_all=True, append_images=animated[1:], duration=200, loop=0),
                         "an animated GIF (3 frames)"),
        "rotated.jpg": (_encoded(draw_shape("square", "yellow", "gray", rng, size=384).resize((384, 256)), "JPEG", exif=exif),
                        "a JPEG whose EXIF says 'rotate 90 degrees'"),
        "huge.png": (_encoded(draw_shape("circle", "yellow", "black", rng, size=2400), "PNG"), "2400x2400 px: larger than needed"),
        "ネコ の 写真.png": (_encoded(draw_shape("circle", "blue", "gray", rng, size=320), "PNG"),
                          "a non-ASCII file name with spaces; its caption file is not UTF-8"),
        "ネコ の 写真.txt": ('a blue circle, "quoted",\non two lines '.encode() + b"caf\xe9", "a caption: commas, quotes, a newline, a Latin-1 byte"),
        "red circle.png": (_encoded(red_circle, "PNG"), "a red circle"),
        "sub folder/red circle.png": (_encoded(red_circle, "PNG"), "the same file again, in another folder"),
        "sub folder/red circle small.jpg": (_encoded(red_circle.resize((280, 280)), "JPEG", quality=80),
                                            "the same picture, resized and re-compressed"),
        "metadata.csv": ('file_name,text\ncmyk.jpg,"a green triangle, printed in ""CMYK"""\nmissing.png,a caption whose image is gone\n'.encode(),
                         "captions; one row names a file that does not exist"),
    }
    for name, (content, _) in files.items():
        (folder / name).write_bytes(content)
    return {name: what for name, (_, what) in files.items()}
