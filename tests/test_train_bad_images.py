"""Training on a folder that holds every kind of unreadable image: each is reported and skipped, the run ends."""

import shutil

import pytest
from PIL import Image

from sdcourse import practice, train
from sdcourse.train import TrainConfig

GOOD = ["red_circle_on_white.png", "green_square_on_black.png", "blue_circle_on_gray.png"]
# file -> what breaks; the first four are real files, the last two fail the way a real disk or decoder can
BAD = {
    "not_an_image.png": "UnidentifiedImageError",
    "empty.png": "UnidentifiedImageError",
    "truncated.jpg": "OSError",
    "bomb.png": "DecompressionBombError",   # not an OSError
    "locked.png": "PermissionError",         # tests run as root here, so chmod cannot make one
    "odd_codec.png": "ValueError",           # what some PIL decoders raise on bad data
    "missing.png": "FileNotFoundError",
}


@pytest.fixture
def bad_folder(tmp_path, sample_dir, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for name in GOOD + ["locked.png", "odd_codec.png"]:
        shutil.copy(sample_dir / "images" / name if name in GOOD else sample_dir / "images" / GOOD[0], data / name)
    problems = tmp_path / "problems"
    practice.write_problem_files(problems)
    for name in ("empty.png", "truncated.jpg", "bomb.png"):
        shutil.copy(problems / name, data / name)
    (data / "not_an_image.png").write_bytes(b"<html>403 Forbidden</html>")
    names = GOOD + list(BAD)
    (data / "metadata.csv").write_text("file_name,text\n" + "".join(f"{n},caption of {n}\n" for n in names))

    real_open = Image.open

    def open_(fp, *args, **kwargs):
        name = getattr(fp, "name", str(fp)).rsplit("/", 1)[-1]
        if name == "locked.png":
            raise PermissionError(13, "Permission denied", str(fp))
        image = real_open(fp, *args, **kwargs)
        if name == "odd_codec.png":
            def load():
                raise ValueError("unknown raw mode")
            image.load = load
        return image

    monkeypatch.setattr(Image, "open", open_)
    return data


# With buckets, sizes come from each file's header first; without the cache, every epoch reads the files again.
@pytest.mark.parametrize("cache_latents, buckets", [(True, True), (False, False)])
def test_every_kind_of_unreadable_image_is_reported_and_skipped(tmp_path, tiny_sd_path, bad_folder, cache_latents,
                                                                 buckets, capsys):
    # One step per file: without the cache, epoch 0 then reads every file; unreadable ones make empty steps.
    steps = len(GOOD) + len(BAD)
    cfg = TrainConfig(model=tiny_sd_path, dataset=str(bad_folder), output_dir=str(tmp_path / "finetune"), width=64,
                      height=64, batch_size=1, max_steps=steps, checkpoint_every=100, validate_every=0,
                      num_workers=0, cache_latents=cache_latents, buckets=buckets, optimizer="adamw")
    result = train.train(cfg)
    assert sorted(result.skipped) == sorted(BAD)
    for name, kind in BAD.items():
        assert result.skipped[name].startswith(kind + ":"), (name, result.skipped[name])
    printed = capsys.readouterr()
    for name in BAD:
        assert f"Skipping unreadable image {bad_folder / name}" in printed.out + printed.err
    # with the cache every step trains; without it, the steps of epoch 0 that met an unreadable file train on nothing
    assert len(result.losses) == (steps if cache_latents else len(GOOD))
    assert (result.final_dir / "model_index.json").exists()
