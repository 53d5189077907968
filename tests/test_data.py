"""Dataset building: every bad input of issue 3, cleaning, names, captions, zip, and HTTP on loopback."""

import io
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sdcourse import data, practice, sources, web
from sdcourse.practice import LocalBooru, Trouble, _png_header_only
from sdcourse.sample_data import draw_shape

FAST = web.HttpConfig(timeout=(2, 2), retries=2, backoff=0.05, workers=4)


def shape(colour="red", shape_name="circle", background="white", size=128, seed=0):
    import random
    return draw_shape(shape_name, colour, background, random.Random(seed), size=size)


def png_bytes(img, fmt="PNG", **kwargs):
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def clean(tmp_path, files: dict, config=data.CleanConfig(resolution=64), **kwargs):
    """Write ``files`` into a folder, build a dataset from it; (report indexed by source, output dir)."""
    src = tmp_path / "src"
    for name, content in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(content)
    out = tmp_path / "out"
    report = data.build_dataset(sources.from_folder(src), out, config, **kwargs)
    return report.set_index("source"), out


def output_image(out, report, source):
    img = Image.open(out / report.loc[source, "file_name"])
    img.load()  # reads and closes the file
    return img


# --- Bad and unusual files --------------------------------------------------------------------------

def test_broken_files_are_reported_not_fatal(tmp_path):
    good = png_bytes(shape())
    report, out = clean(tmp_path, {
        "good.png": good,
        "empty.png": b"",
        "truncated.jpg": png_bytes(shape(size=256), "JPEG")[:1200],
        "page.jpg": b"<html>not an image</html>",
        "bomb.png": _png_header_only(60000, 60000),      # over twice Pillow's limit: Pillow refuses
        "big header.png": _png_header_only(12000, 12000),  # 144 Mpx: only our max_pixels check catches it
        "dot.png": png_bytes(Image.new("RGB", (1, 1))),
    })
    assert report.loc["good.png", "status"] == "kept"
    expected = {"empty.png": "empty file", "truncated.jpg": "truncated", "page.jpg": "not an image",
                "bomb.png": "decompression bomb", "big header.png": "decompression bomb"}
    for source, reason in expected.items():
        assert report.loc[source, "status"] == "error"
        assert reason in report.loc[source, "reason"]
    assert report.loc["dot.png", "status"] == "dropped" and "too small: 1x1" in report.loc["dot.png", "reason"]
    assert len(report) == 7  # every input has a row
    assert pd.read_csv(out / "report.csv").shape[0] == 7
    assert list(data.read_metadata(out)["file_name"]) == [report.loc["good.png", "file_name"]]


def test_unusual_modes_become_correct_rgb(tmp_path):
    palette = Image.new("P", (96, 96), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (48, 0, 96, 96))  # right half red, left half the transparent colour 0
    rgba = Image.new("RGBA", (96, 96), (0, 0, 255, 0))
    frames = [Image.new("RGB", (96, 96), c) for c in ("green", "blue")]
    exif = Image.Exif()
    exif[0x0112] = 6
    sixteen = Image.fromarray(np.tile(np.linspace(0, 65535, 128).astype(np.uint16), (96, 1)))  # I;16 gradient
    report, out = clean(tmp_path, {
        "cmyk.jpg": png_bytes(Image.new("RGB", (96, 96), (220, 40, 40)).convert("CMYK"), "JPEG", quality=95),
        "sixteen.png": png_bytes(sixteen),
        "palette.png": png_bytes(palette, transparency=0),
        "rgba.png": png_bytes(rgba),
        "anim.gif": png_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "rotated.jpg": png_bytes(Image.new("RGB", (128, 96), "gray"), "JPEG", exif=exif),
    })
    assert (report["status"] == "kept").all(), report["reason"]
    for source in report.index:
        assert output_image(out, report, source).mode == "RGB"
    r, g, b = output_image(out, report, "cmyk.jpg").getpixel((48, 48))
    assert r > 180 and g < 90 and b < 90
    grey = np.asarray(output_image(out, report, "sixteen.png"))[..., 0]
    assert grey[0, 0] < 5 and grey[0, -1] > 250 and len(np.unique(grey)) > 100  # scaled, not clipped to white
    assert output_image(out, report, "palette.png").getpixel((10, 10)) == (255, 255, 255)  # transparent -> white
    assert output_image(out, report, "palette.png").getpixel((80, 10)) == (255, 0, 0)
    assert output_image(out, report, "rgba.png").getpixel((10, 10)) == (255, 255, 255)
    assert output_image(out, report, "anim.gif").getpixel((10, 10)) == (0, 128, 0)  # the first frame
    assert "first frame" in report.loc["anim.gif", "reason"]
    assert output_image(out, report, "rotated.jpg").size == (96, 128)
    assert "EXIF" in report.loc["rotated.jpg", "reason"]


def test_small_dropped_and_large_downscaled_relative_to_resolution(tmp_path):
    config = data.CleanConfig(resolution=128)  # min side 64, max side 256
    report, out = clean(tmp_path, {"small.png": png_bytes(shape(size=60)), "ok.png": png_bytes(shape(size=64)),
                                   "large.png": png_bytes(shape(size=1000).resize((1000, 500))),
                                   "large.jpg": png_bytes(shape(size=2000, colour="blue"), "JPEG")}, config)
    assert report.loc["small.png", "status"] == "dropped"
    assert report.loc["ok.png", "status"] == "kept"
    assert output_image(out, report, "large.png").size == (256, 128)
    assert output_image(out, report, "large.jpg").size == (256, 256)
    assert "downscaled from 1000x500" in report.loc["large.png", "reason"]
    assert "downscaled from 2000x2000" in report.loc["large.jpg", "reason"]


def test_unchanged_files_are_copied_byte_for_byte_changed_ones_reencoded(tmp_path):
    original = png_bytes(shape(), "JPEG", quality=70)
    report, out = clean(tmp_path, {"photo.jpg": original, "big.webp": png_bytes(shape("blue", size=400), "WEBP"),
                                   "big.gif": png_bytes(shape("green", "square", size=400), "GIF")})
    assert (out / report.loc["photo.jpg", "file_name"]).read_bytes() == original
    assert report.loc["big.webp", "file_name"].endswith(".jpg")  # downscaled: lossy stays lossy, at quality 95
    assert report.loc["big.gif", "file_name"].endswith(".png")  # lossless stays lossless


def test_exact_and_near_duplicates_dropped(tmp_path):
    picture = shape("red", "circle", "white", size=128, seed=3)
    report, _ = clean(tmp_path, {
        "a.png": png_bytes(picture), "b copy.png": png_bytes(picture),
        "c smaller.jpg": png_bytes(picture.resize((100, 100)), "JPEG", quality=80),
        "d other colour.png": png_bytes(shape("blue", "circle", "white", size=128, seed=3)),
        "e moved.png": png_bytes(shape("red", "circle", "white", size=128, seed=4)),
    })
    assert report.loc["a.png", "status"] == "kept"
    assert report.loc["b copy.png", "reason"].startswith("exact duplicate of " + report.loc["a.png", "file_name"])
    assert report.loc["c smaller.jpg", "reason"].startswith("near duplicate of")
    assert report.loc["d other colour.png", "status"] == "kept"
    assert report.loc["e moved.png", "status"] == "kept"


def test_sample_dataset_has_no_false_duplicates(tmp_path, sample_dir):
    report = data.build_dataset(sources.from_folder(sample_dir), tmp_path / "out", data.CleanConfig(resolution=64))
    assert (report["status"] == "kept").all(), report[report["status"] != "kept"]


def test_output_names_are_safe_unique_and_stable(tmp_path):
    files = {"a b.png": png_bytes(shape(seed=1)), "a_b.png": png_bytes(shape(seed=2)),
             "ネコ の 写真.png": png_bytes(shape(seed=3)), "sub/a b.png": png_bytes(shape(seed=4)),
             "Café Noël.png": png_bytes(shape(seed=5))}
    report, out = clean(tmp_path, files)
    names = list(report["file_name"])
    assert len(set(names)) == 5
    for name in names:
        assert name.startswith("images/") and name.isascii() and " " not in name
    assert report.loc["Café Noël.png", "file_name"].startswith("images/Cafe_Noel_")
    again = data.build_dataset(sources.from_folder(tmp_path / "src"), tmp_path / "again", data.CleanConfig(resolution=64))
    assert list(again["file_name"]) == names


# --- Captions and metadata ------------------------------------------------------------------------

TRICKY = 'a girl, "quoted" words,\nand a second line'


def test_captions_round_trip_and_load_with_datasets(tmp_path):
    import datasets

    report, out = clean(tmp_path, {
        "one.png": png_bytes(shape(seed=1)), "one.txt": TRICKY.encode(),
        "two.png": png_bytes(shape(seed=2)), "two.txt": b"caf\xe9, cr\xe8me",  # Latin-1, not UTF-8
        "three.png": png_bytes(shape(seed=3)),  # no caption
    }, sidecar_captions=True)
    table = data.read_metadata(out).set_index("file_name")
    assert table.loc[report.loc["one.png", "file_name"], "text"] == TRICKY
    assert table.loc[report.loc["two.png", "file_name"], "text"] == "caf\ufffd, cr\ufffdme"
    assert "not UTF-8" in report.loc["two.png", "reason"]
    assert table.loc[report.loc["three.png", "file_name"], "text"] == ""
    sidecar = (out / report.loc["one.png", "file_name"]).with_suffix(".txt")
    assert sidecar.read_text(encoding="utf-8") == TRICKY
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert loaded.num_rows == 3
    assert TRICKY in loaded["text"]
    assert loaded[0]["image"].size == (128, 128)


def test_write_metadata_keeps_the_line_ends_and_changes_only_the_edited_row(tmp_path, monkeypatch):
    import csv
    with open(tmp_path / "metadata.csv", "w", newline="", encoding="utf-8") as f:  # \r\n, as sample_data writes
        csv.writer(f).writerows([["file_name", "text"], ["a.png", "a red circle"], ["b.png", TRICKY], ["c.png", "x"]])
    before = (tmp_path / "metadata.csv").read_bytes()
    table = data.read_metadata(tmp_path)
    table.at[2, "text"] = "a fixed, caption"
    data.write_metadata(tmp_path, table)
    after = (tmp_path / "metadata.csv").read_bytes()
    assert before.endswith(b"\r\nc.png,x\r\n") and after == before[:-len(b"c.png,x\r\n")] + b'c.png,"a fixed, caption"\r\n'
    assert data.read_metadata(tmp_path).equals(table) and not (tmp_path / "metadata.csv.tmp").exists()
    def disk_full(_):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(data.os, "fsync", disk_full)
    table.at[0, "text"] = "never written"
    with pytest.raises(OSError, match="No space"):
        data.write_metadata(tmp_path, table)
    assert (tmp_path / "metadata.csv").read_bytes() == after and not (tmp_path / "metadata.csv.tmp").exists()
    monkeypatch.undo()
    (tmp_path / "new").mkdir()
    data.write_metadata(tmp_path / "new", table)  # a new file: pandas' \n
    assert b"\r" not in (tmp_path / "new" / "metadata.csv").read_bytes()


def test_write_metadata_updates_sidecar_captions_whole_or_not_at_all(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("old caption", encoding="utf-8")  # kohya-style sidecars: only a.png has one
    table = pd.DataFrame({"file_name": ["a.png", "b.png"], "text": ["new caption", "b's caption"]})
    data.write_metadata(tmp_path, table)
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "new caption" and not (tmp_path / "b.txt").exists()
    table.at[0, "text"] = "never written"
    real_replace = data.os.replace
    def interrupted(src, dst):  # the kernel interrupted between writing a sidecar and renaming it
        if str(dst).endswith(".txt"):
            raise KeyboardInterrupt
        real_replace(src, dst)
    monkeypatch.setattr(data.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.write_metadata(tmp_path, table)
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "new caption"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "metadata.csv"]  # no temporary file left


def test_metadata_csv_rows_naming_missing_files_are_reported(tmp_path):
    metadata = 'file_name,text\none.png,"a red circle, on white"\ngone.png,lost caption\n'
    report, out = clean(tmp_path, {"one.png": png_bytes(shape()), "metadata.csv": metadata.encode()})
    assert report.loc["metadata.csv: gone.png", "status"] == "error"
    assert "missing" in report.loc["metadata.csv: gone.png", "reason"]
    assert data.read_metadata(out)["text"].tolist() == ["a red circle, on white"]


def test_subset_keeps_the_images_whose_caption_or_tags_hold_the_word(tmp_path):
    source = tmp_path / "dataset"
    (source / "images").mkdir(parents=True)
    rows = [("a.png", "purple circle, white background", "purple_circle white_background"),
            ("b.png", "a red square", "red_square"),
            ("c.png", "a girl", "hatsune_miku 1girl"),
            ("d.png", "purplish haze", ""),  # "purple" only inside a longer word
            ("gone.png", "a Purple star", "")]  # named in metadata.csv, not on disk
    for name, _, _ in rows[:-1]:
        (source / "images" / name).write_bytes(png_bytes(shape(seed=len(name))))
    pd.DataFrame([(f"images/{n}", t, g) for n, t, g in rows], columns=["file_name", "text", "tags"]).to_csv(
        source / "metadata.csv", index=False)
    purple = data.subset(source, "PURPLE", tmp_path / "purple")
    table = data.read_metadata(purple)
    assert table["file_name"].tolist() == ["images/a.png"]  # whole words, any case; the missing file left out
    assert (purple / "images" / "a.png").read_bytes() == (source / "images" / "a.png").read_bytes()
    assert not (purple / "images" / "b.png").exists()
    assert data.read_metadata(data.subset(source, "hatsune miku", tmp_path / "miku"))["file_name"].tolist() == ["images/c.png"]
    assert data.subset(source, "  ", tmp_path / "all") == source  # empty: the whole dataset, nothing copied
    assert not (tmp_path / "all").exists()
    with pytest.raises(ValueError, match=r"metadata.csv holds the word 'pink'"):
        data.subset(source, "pink", tmp_path / "pink")
    data.subset(source, "red", tmp_path / "purple")  # a new subset replaces the old one whole
    assert data.read_metadata(tmp_path / "purple")["file_name"].tolist() == ["images/b.png"]
    assert not (tmp_path / "purple" / "images" / "a.png").exists()


def test_metadata_csv_without_file_name_column_says_so(tmp_path):
    (tmp_path / "x.png").write_bytes(png_bytes(shape()))
    (tmp_path / "metadata.csv").write_text("image,caption\nx.png,hi\n")
    with pytest.raises(ValueError, match="metadata.csv has no 'file_name' column"):
        sources.from_folder(tmp_path)


def test_empty_and_missing_folders_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="is empty"):
        sources.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="No folder at"):
        sources.from_folder(tmp_path / "nope")


def test_nothing_kept_raises_after_saving_the_report(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="No image survived cleaning"):
        data.build_dataset(sources.from_folder(tmp_path / "src"), tmp_path / "out")
    assert pd.read_csv(tmp_path / "out" / "report.csv")["reason"].tolist() == ["empty file (0 bytes)"]


def test_a_dataset_cannot_be_rebuilt_from_itself(tmp_path):
    report, out = clean(tmp_path, {"one.png": png_bytes(shape())})
    with pytest.raises(ValueError, match="inside .*out, the folder being written"):
        data.build_dataset(sources.from_folder(out), out, overwrite=True)
    assert data.read_metadata(out)["file_name"].tolist() == [report.loc["one.png", "file_name"]]  # untouched


def test_existing_dataset_is_not_replaced_unless_asked(tmp_path):
    report, out = clean(tmp_path, {"one.png": png_bytes(shape())})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        data.build_dataset(sources.from_folder(tmp_path / "src"), out)
    (tmp_path / "src" / "one.png").unlink()
    (tmp_path / "src" / "two.png").write_bytes(png_bytes(shape(seed=9)))
    data.build_dataset(sources.from_folder(tmp_path / "src"), out, data.CleanConfig(resolution=64), overwrite=True)
    assert len(list((out / "images").iterdir())) == 1  # the old image is gone with the old dataset


# --- Zip uploads ----------------------------------------------------------------------------------

def test_zip_entries_cannot_escape_the_target(tmp_path):
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("photos/ok.png", png_bytes(shape()))
        z.writestr("../escaped.png", png_bytes(shape(seed=1)))
        z.writestr("photos/../../also_escaped.png", png_bytes(shape(seed=2)))
        z.writestr("/etc/absolute.png", png_bytes(shape(seed=3)))
        z.writestr("__MACOSX/photos/._ok.png", b"resource fork")
    target = tmp_path / "a" / "target"
    candidates = sources.extract_zip(archive, target)
    assert not (tmp_path / "a" / "escaped.png").exists() and not (tmp_path / "also_escaped.png").exists()
    assert [p.relative_to(target).as_posix() for p in target.rglob("ok.png")] == ["photos/ok.png"]
    refused = [c for c in candidates if c.error]
    assert len(refused) == 3 and all("outside the target" in c.error for c in refused)
    assert [c.source for c in candidates if not c.error] == ["photos/ok.png"]


# --- HTTP on loopback -----------------------------------------------------------------------------

@pytest.fixture
def server():
    image = png_bytes(shape())
    files = {"img/ok.png": image, "img/flaky.png": image, "img/broken.png": image, "img/slow.png": image,
             "img/big.png": png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 600, 3), np.uint8))),
             "img/page.jpg": b"<html>login required</html>"}
    with LocalBooru([], files, Trouble(flaky={"/img/flaky.png": 2}, broken={"/img/broken.png"}), lifetime=60) as booru:
        yield booru


def test_url_downloads_retry_record_failures_and_resume(server, tmp_path):
    urls = [f"{server.url}/img/{name}" for name in ("ok.png", "flaky.png", "broken.png", "missing.png", "big.png", "page.jpg")]
    config = web.HttpConfig(timeout=(2, 2), retries=2, backoff=0.05, max_bytes=200_000)
    results = {c.source.rsplit("/", 1)[1]: c for c in web.from_urls(urls + ["# a comment", ""], tmp_path, config)}
    assert results["ok.png"].path.exists() and not results["ok.png"].error
    assert results["flaky.png"].path.exists() and server.statuses("/img/flaky.png") == [503, 503, 200]
    assert "HTTP 500" in results["broken.png"].error and "3 attempts" in results["broken.png"].error
    assert "HTTP 404" in results["missing.png"].error and server.statuses("/img/missing.png") == [404]  # not retried
    assert "cap" in results["big.png"].error and not list(tmp_path.glob("big*"))
    assert results["page.jpg"].path.exists()  # downloaded; the cleaner will call it "not an image"
    [no_scheme] = web.from_urls(["www.example.com/a.png"], tmp_path, config)
    assert "No scheme" in no_scheme.error  # recorded, not raised
    requests_before = len(server.log)
    again = web.from_urls(urls[:2], tmp_path, config)
    assert len(server.log) == requests_before  # resumed: valid files are not fetched again
    assert [c.path for c in again] == [results["ok.png"].path, results["flaky.png"].path]


def test_slow_server_times_out_and_is_recorded(tmp_path):
    with LocalBooru([], {"img/slow.png": png_bytes(shape())}, Trouble(delay=0.6), lifetime=60) as slow:
        config = web.HttpConfig(timeout=(1, 0.2), retries=1, backoff=0.01)
        [candidate] = web.from_urls([f"{slow.url}/img/slow.png"], tmp_path, config)
    assert candidate.path is None and "Timeout" in candidate.error


def test_retry_after_header():
    assert web.retry_after_seconds("3", 1.0) == 3.0
    assert web.retry_after_seconds(None, 1.5) == 1.5
    assert web.retry_after_seconds("soon", 2.0) == 2.0
    assert web.retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", 2.0) == 0.0  # a date in the past


@pytest.mark.parametrize("api", ["danbooru", "dapi"])
def test_booru_search_pages_filters_and_keeps_tags(api, tmp_path):
    with LocalBooru.from_sample(lifetime=60) as booru:
        config = web.BooruConfig(booru.url, api=api, page_size=5, min_interval=0.0)
        candidates = web.from_booru(config, "white_background simple_background", tmp_path / "dl", limit=11,
                                     tag_captions=True, http=FAST)
        api_calls = [p for p, _ in booru.log if p in ("/posts.json", "/index.php")]
    assert len(candidates) == 11 and len(api_calls) == 3  # 5 + 5 + 1 of the 12 white-background posts
    assert all(c.path.exists() and not c.error for c in candidates)
    assert all("white_background" in c.tags and c.origin.startswith("https://example.com/") for c in candidates)
    assert all(c.text.endswith("white background, simple background") for c in candidates)
    report = data.build_dataset(candidates, tmp_path / "out", data.CleanConfig(resolution=64))
    table = data.read_metadata(tmp_path / "out")
    assert (report["status"] == "kept").all()
    assert list(table.columns) == ["file_name", "text", "tags", "source"] and table["tags"].str.contains("highres").all()


def test_booru_stops_at_the_last_page(tmp_path):
    with LocalBooru.from_sample(lifetime=60) as booru:
        config = web.BooruConfig(booru.url, api="danbooru", page_size=5, min_interval=0.0)
        posts, failed = web.search_booru(config, "red_circle", limit=100, http=FAST)
    assert len(posts) == 3 and not failed and len(booru.log) == 1


def test_booru_rate_limit_is_respected_or_recovered(tmp_path):
    trouble = Trouble(min_interval=0.2, retry_after=1)
    with LocalBooru.from_sample(trouble=trouble, lifetime=60) as booru:
        polite = web.BooruConfig(booru.url, api="dapi", page_size=4, min_interval=0.4)  # margin for jitter
        posts, _ = web.search_booru(polite, "", limit=12, http=FAST)
        assert len(posts) == 12 and 429 not in booru.statuses()
        booru.log.clear()
        hasty = web.BooruConfig(booru.url, api="dapi", page_size=4, min_interval=0.0)
        posts, failed = web.search_booru(hasty, "", limit=12, http=web.HttpConfig(retries=3, backoff=0.01))
        assert len(posts) == 12 and not failed
        assert 429 in booru.statuses()  # throttled, waited Retry-After, then got every page


def test_booru_page_failure_is_reported_and_secrets_stay_out(tmp_path):
    with LocalBooru.from_sample(trouble=Trouble(broken={"/posts.json"}), lifetime=60) as booru:
        config = web.BooruConfig(booru.url, api="danbooru", min_interval=0.0, credentials={"api_key": "SECRET123"})
        candidates = web.from_booru(config, "red_circle", tmp_path, limit=10, http=FAST)
    unreachable = web.BooruConfig("http://127.0.0.1:9", api="danbooru", credentials={"api_key": "SECRET123"})
    candidates += web.from_booru(unreachable, "x", tmp_path, limit=10, http=FAST)
    assert [c.path for c in candidates] == [None, None]
    assert "API page failed: HTTP 500" in candidates[0].error
    assert "ConnectionError" in candidates[1].error
    assert all("SECRET123" not in c.error + c.source for c in candidates)
    assert "SECRET123" not in repr(config)


def test_parse_posts_handles_each_api_shape():
    dapi = web.BooruConfig("https://gel.example", api="dapi", prefer_sample=False)
    gelbooru = {"@attributes": {"count": 2}, "post": [
        {"id": 7, "file_url": "https://img.example/7.jpg", "tags": " a_b  c ", "source": "https://src/7"},
        {"id": 8, "directory": "ab/cd", "image": "8.png", "tags": "x"}]}
    posts = web.parse_posts(gelbooru, dapi)
    assert [(p.id, p.file_url, p.tags, p.source) for p in posts] == [
        (7, "https://img.example/7.jpg", "a_b c", "https://src/7"), (8, "https://gel.example/images/ab/cd/8.png", "x", "")]
    danbooru = web.BooruConfig("https://dan.example", api="danbooru", prefer_sample=True)
    [post] = web.parse_posts([{"id": 1, "file_url": "//cdn/1.png", "large_file_url": "//cdn/sample-1.jpg",
                                "tag_string": "t", "source": ""}], danbooru)
    assert post.file_url == "https://cdn/sample-1.jpg"
    assert web.parse_posts([], danbooru) == []
    with pytest.raises(ValueError, match="must start with https://"):
        web.page_request(web.BooruConfig("safebooru.org", credentials={"api_key": "k"}), "x", 0)
    with pytest.raises(ValueError, match="'danbooru' or 'dapi'"):
        web.page_request(web.BooruConfig(api="moebooru"), "x", 0)


def test_posts_without_files_or_with_videos_are_reported(tmp_path):
    files = {"img/a.png": png_bytes(shape()), "img/b.webm": b"video"}
    posts = [{"id": 1, "file": "img/a.png", "tags": "t", "source": ""}, {"id": 2, "file": "img/b.webm", "tags": "t", "source": ""}]
    with LocalBooru(posts, files, lifetime=60) as booru:
        candidates = web.from_booru(web.BooruConfig(booru.url, api="danbooru", min_interval=0), "t", tmp_path, 10, http=FAST)
    by_source = {c.source.rsplit(" ", 1)[1]: c for c in candidates}
    assert "video" in by_source["2"].error and by_source["1"].path.exists()
    assert "/img/b.webm" not in [p for p, _ in booru.log]


# --- Hugging Face datasets, practice files, pictures ----------------------------------------------

def test_from_hf_dataset_streams_original_bytes(tmp_path, sample_dir):
    candidates = sources.from_hf_dataset("imagefolder", tmp_path, text_column="text", limit=5, data_dir=str(sample_dir))
    assert len(candidates) == 5 and all(c.path.suffix == ".png" and c.text.startswith("a ") for c in candidates)
    originals = {p.read_bytes() for p in (sample_dir / "images").glob("*.png")}
    assert all(c.path.read_bytes() in originals for c in candidates)
    with pytest.raises(ValueError, match="no column 'picture'"):
        sources.from_hf_dataset("imagefolder", tmp_path, image_column="picture", data_dir=str(sample_dir))
    with pytest.raises(ValueError, match=r"no column 'caption'; its columns are \['image', 'text'\]"):
        sources.from_hf_dataset("imagefolder", tmp_path, text_column="caption", data_dir=str(sample_dir))


def test_practice_problem_files_teach_what_they_say(tmp_path):
    described = practice.write_problem_files(tmp_path / "problems")
    report = data.build_dataset(sources.from_folder(tmp_path / "problems"), tmp_path / "out",
                                data.CleanConfig(resolution=64)).set_index("source")
    images = [name for name in described if not name.endswith((".txt", ".csv"))]
    assert set(images) <= set(report.index)
    statuses = report["status"].to_dict()
    assert {n for n, s in statuses.items() if s == "error"} == {
        "empty.png", "truncated.jpg", "notes.jpg", "bomb.png", "metadata.csv: missing.png"}
    assert {n for n, s in statuses.items() if s == "dropped"} == {"dot.png", "sub folder/red circle.png",
                                                                    "sub folder/red circle small.jpg"}
    kept_circle = report.loc["red circle.png", "file_name"]
    assert report.loc["sub folder/red circle.png", "reason"] == f"exact duplicate of {kept_circle}"
    assert report.loc["sub folder/red circle small.jpg", "reason"].startswith(f"near duplicate of {kept_circle}")


def test_summary_and_plots(tmp_path, sample_dir):
    report = data.build_dataset(sources.from_folder(sample_dir), tmp_path / "out", data.CleanConfig(resolution=64))
    assert data.summary(report).to_dict("records") == [{"status": "kept", "reason": "unchanged", "count": 36}]
    mixed = pd.DataFrame({"status": ["kept", "kept", "dropped"], "reason": [
        "converted CMYK to RGB; downscaled from 900x900", "downscaled from 800x600", "exact duplicate of images/a.png"]})
    assert data.summary(mixed).to_dict("records") == [
        {"status": "kept", "reason": "downscaled", "count": 2}, {"status": "kept", "reason": "converted CMYK to RGB", "count": 1},
        {"status": "dropped", "reason": "exact duplicate", "count": 1}]
    assert len(data.plot_sizes(report).axes) == 2
    figure = data.plot_preview(tmp_path / "out", n=6, cols=3)
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert len(titles) == 6 and all("background" in t for t in titles)
