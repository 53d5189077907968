"""BLIP captioning on the tiny model, tag-style captions and the caption editor."""

import shutil

import pytest
import torch
from PIL import Image

from sdcourse import data
from sdcourse.captioning import CaptionConfig, Captioner, caption_dataset, caption_from_tags, tags_to_caption
from sdcourse.models import ModelLoadError


@pytest.fixture(scope="module")
def captioner():
    from sdcourse import tiny
    with Captioner.load(tiny.blip_path(), "cpu", torch.float16) as loaded:  # fp16 request on CPU -> fp32
        yield loaded


@pytest.fixture
def dataset(tmp_path, sample_dir):
    """A copy of the first 6 sample images; two have no caption, one has a sidecar .txt."""
    shutil.copytree(sample_dir / "images", tmp_path / "images")
    table = data.read_metadata(sample_dir).head(6).copy()
    table.loc[[1, 4], "text"] = ""
    data.write_metadata(tmp_path, table)
    (tmp_path / table.at[0, "file_name"]).with_suffix(".txt").write_text(table.at[0, "text"])
    return tmp_path


def test_tags_to_caption():
    assert tags_to_caption("1girl maid_outfit holding_teapot highres absurdres commentary_request") == \
        "1girl, maid outfit, holding teapot"
    assert tags_to_caption("^_^ smile") == "^_^, smile"  # emoticons keep their underscores
    assert tags_to_caption("long_hair blue_eyes red_bow", max_tags=2) == "long hair, blue eyes"
    assert tags_to_caption("") == ""


def test_load_uses_fp32_on_cpu_and_explains_missing_models(captioner, tmp_path):
    assert captioner.model.dtype == torch.float32 and not captioner.model.training
    with pytest.raises(ModelLoadError, match="no-such-folder"):
        Captioner.load(str(tmp_path / "no-such-folder"))


def test_caption_batches_beam_and_sampling(captioner, sample_dir):
    images = [Image.open(p) for p in sorted((sample_dir / "images").glob("*.png"))[:3]]
    beam = captioner.caption(images, CaptionConfig(num_beams=2, max_length=12))
    assert len(beam) == 3 and all(isinstance(c, str) and c for c in beam)
    assert beam == captioner.caption(images, CaptionConfig(num_beams=2, max_length=12))  # deterministic
    sampled = captioner.caption(images, CaptionConfig(sampling=True, seed=1, max_length=12))
    assert sampled == captioner.caption(images, CaptionConfig(sampling=True, seed=1, max_length=12))
    assert all(len(c.split()) <= 12 for c in sampled)


def test_caption_dataset_keeps_existing_captions_and_adds_affixes(captioner, dataset):
    before = data.read_metadata(dataset)
    table = caption_dataset(captioner, dataset, CaptionConfig(batch_size=4, max_length=10, prefix="sks", suffix="shape style"))
    assert table.equals(data.read_metadata(dataset))  # what it returns is what it saved
    for row in (0, 2, 3, 5):
        assert table.at[row, "text"] == before.at[row, "text"]
    for row in (1, 4):
        assert table.at[row, "text"].startswith("sks, ") and table.at[row, "text"].endswith(", shape style")


def test_caption_dataset_overwrite_other_column_and_sidecars(captioner, dataset):
    before = data.read_metadata(dataset)
    caption_dataset(captioner, dataset, CaptionConfig(column="blip", max_length=10))
    table = data.read_metadata(dataset)
    assert table["text"].tolist() == before["text"].tolist() and (table["blip"] != "").all()
    caption_dataset(captioner, dataset, CaptionConfig(overwrite=True, batch_size=5, max_length=10), save_every=1)
    table = data.read_metadata(dataset)
    assert table["text"].tolist() == table["blip"].tolist()  # same model, same beam search
    sidecar = (dataset / table.at[0, "file_name"]).with_suffix(".txt")
    assert sidecar.read_text() == table.at[0, "text"]
    assert not (dataset / table.at[1, "file_name"]).with_suffix(".txt").exists()  # only existing sidecars updated


def test_caption_from_tags_fills_only_tagged_empty_rows(dataset):
    table = data.read_metadata(dataset)
    table["tags"] = ["", "red_circle white_background highres", "", "", "", "x"]
    data.write_metadata(dataset, table)
    result = caption_from_tags(dataset, CaptionConfig(suffix="flat colours"))
    assert result.at[1, "text"] == "red circle, white background, flat colours"
    assert result.at[4, "text"] == ""  # empty, but no tags to caption from
    assert result.at[5, "text"] == table.at[5, "text"]  # had a caption: kept
    assert caption_from_tags(dataset, CaptionConfig(overwrite=True)).at[5, "text"] == "x"


def test_close_releases_the_model():
    from sdcourse import tiny
    captioner = Captioner.load(tiny.blip_path())
    captioner.close()
    assert captioner.model is None and captioner.processor is None


def test_caption_editor_edits_navigates_and_saves(dataset):
    import ipywidgets as w

    from sdcourse.widgets import caption_editor

    panel = caption_editor(dataset, size=64)
    buttons = {b.description: b for b in panel.children[0].children if isinstance(b, w.Button)}
    [text_box] = [c for c in panel.children if isinstance(c, w.Textarea)]
    [picture] = [c for c in panel.children if isinstance(c, w.Image)]
    status = panel.children[-1]
    first = data.read_metadata(dataset)
    lines = (dataset / "metadata.csv").read_bytes().splitlines(keepends=True)
    assert text_box.value == first.at[0, "text"] and bytes(picture.value).startswith(b"\x89PNG")
    text_box.value = 'a "fixed'
    text_box.value = 'a "fixed", caption'  # typed on: still one caption to save
    assert status.value == "1 caption(s) not saved yet"
    buttons["Next"].click()
    assert text_box.value == first.at[1, "text"]
    text_box.value = "typed, then typed back"
    text_box.value = first.at[1, "text"]
    assert status.value == "1 caption(s) not saved yet"  # row 1 is as on disk again
    buttons["Previous"].click()
    assert text_box.value == 'a "fixed", caption'  # the unsaved edit is kept across moves
    buttons["Previous"].click()  # wraps around to the last image
    assert text_box.value == first.at[5, "text"]
    assert data.read_metadata(dataset).equals(first)  # nothing written before Save
    buttons["Save"].click()
    saved = data.read_metadata(dataset)
    assert saved.at[0, "text"] == 'a "fixed", caption' and saved.drop(index=0).equals(first.drop(index=0))
    after = (dataset / "metadata.csv").read_bytes().splitlines(keepends=True)
    assert after[2:] == lines[2:] and after[:1] == lines[:1] and after[1] != lines[1]  # only row 0's line
    assert status.value.startswith("saved 1 caption(s) to ") and status.value.endswith("metadata.csv")
    assert (dataset / saved.at[0, "file_name"]).with_suffix(".txt").read_text() == 'a "fixed", caption'


def test_caption_editor_says_what_it_cannot_show_or_save(dataset, monkeypatch):
    import ipywidgets as w

    from sdcourse import widgets

    table = data.read_metadata(dataset)
    (dataset / table.at[1, "file_name"]).unlink()  # a learner deleted a bad picture, its row is still there
    panel = widgets.caption_editor(dataset, size=64)
    buttons = {b.description: b for b in panel.children[0].children if isinstance(b, w.Button)}
    [text_box] = [c for c in panel.children if isinstance(c, w.Textarea)]
    position, status = panel.children[0].children[-1], panel.children[-1]
    buttons["Next"].click()
    assert position.value.startswith("2 / 6: ") and status.value.startswith(f"cannot show {table.at[1, 'file_name']}")
    text_box.value = "its caption, fixed anyway"
    buttons["Next"].click()
    assert status.value == "1 caption(s) not saved yet"

    def full_disk(*_):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(data, "write_metadata", full_disk)
    buttons["Save"].click()
    assert status.value.startswith("NOT saved (") and "No space left" in status.value
    assert status.value.endswith("1 caption(s) not saved yet") and data.read_metadata(dataset).equals(table)
    monkeypatch.undo()
    buttons["Save"].click()
    assert data.read_metadata(dataset).at[1, "text"] == "its caption, fixed anyway"
    data.write_metadata(dataset, table.head(0))
    with pytest.raises(ValueError, match="metadata.csv has no rows"):
        widgets.caption_editor(dataset)


def test_caption_fit_counts_the_captions_clip_cuts_and_shows_the_lost_words(tiny_sd_path):
    from transformers import CLIPTokenizer
    from sdcourse.captioning import caption_fit
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    tags = ", ".join(["red circle"] * 30) + ", blue square"  # 30 x 3 tokens + 2 + markers: past 77
    fit = caption_fit(tokenizer, ["a red circle", tags, "a blue square"])
    assert (fit.total, fit.limit, len(fit.too_long)) == (3, 77, 1)
    caption, n_tokens, lost = fit.too_long[0]
    assert caption == tags and n_tokens == len(tokenizer(tags).input_ids) > 77
    assert lost.endswith("blue square")  # the end of the caption is what training never sees
    kept = tokenizer(tags, truncation=True, max_length=77).input_ids
    assert len(kept) - 2 + len(tokenizer(lost).input_ids) - 2 == n_tokens - 2  # kept + lost = the whole caption
    assert str(fit).startswith("1 of 3 captions are longer than the text encoder's 77 tokens")
    assert str(caption_fit(tokenizer, ["a red circle"])) == "All 1 captions fit the text encoder's 77 tokens."
