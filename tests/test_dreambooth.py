"""DreamBooth's dataset: prior images from the model itself, resumable; subject rows balanced against them."""

import shutil

import pandas as pd
import pytest
from PIL import Image

from sdcourse import dreambooth, models
from sdcourse.training_set import CaptionedImages


@pytest.fixture(scope="module")
def pipe(tiny_sd_path):
    return models.load_pipeline(tiny_sd_path)


def test_prior_images_are_generated_once_and_reproducibly(pipe, tmp_path):
    paths = dreambooth.prior_images(pipe, "a circle", 3, tmp_path / "prior", steps=2, size=64, seed=5)
    assert [p.name for p in paths] == ["prior_0000.png", "prior_0001.png", "prior_0002.png"]
    assert all(Image.open(p).size == (64, 64) for p in paths)
    stamps = [p.stat().st_mtime_ns for p in paths]
    paths[1].unlink()  # an interrupted run: the missing image is made again, the others are kept
    again = dreambooth.prior_images(pipe, "a circle", 3, tmp_path / "prior", steps=2, size=64, seed=5)
    assert [again[0].stat().st_mtime_ns, again[2].stat().st_mtime_ns] == [stamps[0], stamps[2]]
    fresh = dreambooth.prior_images(pipe, "a circle", 2, tmp_path / "fresh", steps=2, size=64, seed=5)
    assert Image.open(fresh[1]).tobytes() == Image.open(again[1]).tobytes()
    assert not list((tmp_path / "prior").glob(".*"))


def subject_and_prior(sample_dir, tmp_path, subject: tuple[str, int], prior: tuple[str, int]):
    """Folders of subject photos and prior images: the first ``count`` sample images matching each pattern."""
    folders = tmp_path / "instance", tmp_path / "prior"
    for folder, (pattern, count) in zip(folders, (subject, prior)):
        folder.mkdir()
        for p in sorted((sample_dir / "images").glob(pattern))[:count]:
            shutil.copy(p, folder)
    return folders


def test_dataset_balances_subject_and_prior(sample_dir, tmp_path):
    instance, prior = subject_and_prior(sample_dir, tmp_path, ("red_*", 2), ("blue_*", 6))
    (instance / "notes.txt").write_text("not an image")
    out = dreambooth.build_dataset(instance, "a sks shape", prior, "a shape", tmp_path / "db")
    table = pd.read_csv(out / "metadata.csv")
    assert (table.text == "a sks shape").sum() == 6 and (table.text == "a shape").sum() == 6
    assert table.file_name.str.startswith("instance/").sum() == 6 and table.file_name.nunique() == 8
    data = CaptionedImages(out, 64, 64)
    assert len(data) == 12 and all("pixels" in data[i] for i in range(len(data)))


def test_dataset_repeats_whichever_half_is_smaller(sample_dir, tmp_path):
    # 6 subject photos and 2 prior images: the prior half is the one repeated (3x), not the subject's.
    instance, prior = subject_and_prior(sample_dir, tmp_path, ("blue_*", 6), ("red_*", 2))
    table = pd.read_csv(dreambooth.build_dataset(instance, "a sks shape", prior, "a shape", tmp_path / "db") / "metadata.csv")
    assert (table.text == "a sks shape").sum() == 6 and (table.text == "a shape").sum() == 6
    assert table[table.text == "a shape"].file_name.value_counts().tolist() == [3, 3]


def test_empty_folder_is_named(tmp_path):
    (tmp_path / "instance").mkdir(), (tmp_path / "prior").mkdir()
    with pytest.raises(ValueError, match="instance"):
        dreambooth.build_dataset(tmp_path / "instance", "a sks dog", tmp_path / "prior", "a dog", tmp_path / "db")
