"""The validation loss (fixed images, timesteps and noise) and random crops drawn from the latent cache."""

import pytest
import torch

from sdcourse import latent_cache, models, train, training_set, validation
from sdcourse.train import TrainConfig


@pytest.fixture(scope="module")
def tiny_models(tiny_sd_path):
    return models.load_models(tiny_sd_path, torch.float32)


def no_errors(i, error):
    raise AssertionError(f"image {i} unreadable: {error}")


def test_validation_loss_is_the_same_for_the_same_weights(tiny_models, sample_dir):
    data = training_set.CaptionedImages(sample_dir, 64, 64, crop="random", flip=True)
    first = validation.build_validation_set(data, tiny_models, [0, 5], True, seed=0, report=no_errors)
    again = validation.build_validation_set(data, tiny_models, [0, 5], True, seed=0, report=no_errors)
    unet = tiny_models.unet.train()
    loss = train.validation_loss(unet, tiny_models.noise_scheduler, first, "cpu")
    torch.manual_seed(123)  # the global RNG plays no part
    assert train.validation_loss(unet, tiny_models.noise_scheduler, again, "cpu") == loss
    assert unet.training  # left in training mode, as it was found
    assert first.timesteps.tolist() == [100, 300, 500, 700, 900]
    with torch.no_grad():
        unet.conv_in.bias.add_(0.5)
    try:
        assert train.validation_loss(unet, tiny_models.noise_scheduler, first, "cpu") != loss
    finally:
        with torch.no_grad():
            unet.conv_in.bias.sub_(0.5)


def test_validation_images_are_held_out_only_from_a_large_enough_dataset():
    picked, held_out = validation.validation_indices(list(range(36)), 4, seed=0)
    assert len(set(picked)) == 4 and held_out
    assert validation.validation_indices(list(range(36)), 4, seed=0) == (picked, True)
    assert validation.validation_indices(list(range(36)), 4, seed=1)[0] != picked
    assert validation.validation_indices(list(range(19)), 4, seed=0)[1] is False


def test_a_file_on_several_rows_is_never_a_validation_image(tmp_path, sample_dir):
    import shutil

    shutil.copytree(sample_dir, tmp_path / "data")
    csv = tmp_path / "data" / "metadata.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines + lines[1:3]) + "\n")  # the first two images twice, as DreamBooth repeats its photos
    data = training_set.CaptionedImages(tmp_path / "data", 64, 64)
    assert validation.validation_candidates(data) == list(range(2, 36))


def test_validation_loss_falls_during_a_smoke_run_and_the_held_out_images_are_not_trained_on(
        tmp_path, untrained_sd_path, sample_dir, monkeypatch):
    # From the miniature's untrained weights, so that learning shows in the loss within 30 steps.
    seen = set()
    real = latent_cache.cached_latents

    def recording(cache, sizes, indices, *args):
        seen.update(indices)
        return real(cache, sizes, indices, *args)
    monkeypatch.setattr(latent_cache, "cached_latents", recording)
    cfg = TrainConfig(model=untrained_sd_path, dataset=str(sample_dir), output_dir=str(tmp_path / "finetune"),
                      width=64, height=64, lr=1e-3, max_steps=30, val_loss_every=10, validate_every=0,
                      checkpoint_every=100, num_workers=0)
    result = train.train(cfg)
    history = result.history
    assert history["val_steps"] == [0, 10, 20, 30]
    first, last = history["val_losses"][0], history["val_losses"][-1]
    assert last < 0.8 * first, history["val_losses"]
    held_out, _ = validation.validation_indices(list(range(36)), 4, seed=0)
    assert seen == set(range(36)) - set(held_out)
    assert (tmp_path / "finetune" / "loss.png").exists()


def test_two_epochs_draw_different_crops_of_one_cached_image(tiny_models, sample_dir, tmp_path):
    import shutil

    data_dir = tmp_path / "one"
    (data_dir / "images").mkdir(parents=True)
    shutil.copy(sample_dir / "images" / sorted(p.name for p in (sample_dir / "images").iterdir())[0],
                data_dir / "images" / "a.png")
    (data_dir / "metadata.csv").write_text("file_name,text\nimages/a.png,a shape\n")
    data = training_set.CaptionedImages(data_dir, 64, 64, crop="random", flip=True)
    cache = latent_cache.build_cache(latent_cache.cache_view(data, 0.25), tiny_models, 1, 0, no_errors, flip=True)
    full, flipped = cache.latents[0], cache.flipped[0]
    assert full.shape == (4, 10, 10)  # 64 px + 25 % = 80 px: 10 latent pixels for 8
    sizes = {0: (64, 64)}
    crops = [latent_cache.cached_latents(cache, sizes, [0], 0, epoch, "random")[0] for epoch in range(8)]
    assert all(c.shape == (4, 8, 8) for c in crops)
    windows = {(src, top, left): s[:, top:top + 8, left:left + 8] for src, s in (("plain", full), ("flip", flipped))
               for top in range(3) for left in range(3)}
    drawn = [next(k for k, w in windows.items() if torch.equal(w, c)) for c in crops]
    assert drawn[0] != drawn[1], drawn  # epochs 0 and 1 with seed 0
    assert len(set(drawn)) > 3 and {k[0] for k in drawn} == {"plain", "flip"}, drawn
    assert torch.equal(latent_cache.cached_latents(cache, sizes, [0], 0, 1, "random")[0], crops[1])  # the same after a resume
    centre = latent_cache.cached_latents(cache, sizes, [0], 0, 0, "center")[0]
    assert torch.equal(centre, full[:, 1:9, 1:9])
    report = latent_cache.cache_report(cache, data.sizes, 0.25, 1.0)
    assert "3.12x" in report and "flipped images" in report  # (80/64)^2 = 1.5625, twice for the flips


def test_crop_margin_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="crop_margin"):
        TrainConfig(crop_margin=1.5).check()


def test_config_panel_estimate_follows_the_model_and_settings(tiny_sd_path, tmp_path):
    from sdcourse import memory, widgets

    cfg = TrainConfig(model="sd15", output_dir=str(tmp_path))
    panel = widgets.training_config_panel(cfg, config_path=tmp_path / "run.json")
    boxes = {box.description: box for column in panel.children[0].children for box in column.children}
    estimate = panel.children[2]
    assert "for SD 1.5 " in estimate.value
    before = estimate.value
    boxes["batch size"].value = 8
    assert cfg.batch_size == 8 and estimate.value != before
    assert panel.children[-1].value == "batch_size = 8: used when the Train cell runs next"
    assert "when the Train cell runs" in panel.children[1].value
    boxes["optimizer"].value = "adamw"
    assert cfg.optimizer == "adamw" and "optimizer states" in estimate.value
    sd15 = memory.estimate_for_config(cfg)
    cfg.model = "sd2"
    sd2 = memory.estimate_for_config(cfg)
    assert sd2.model.startswith("SD 2") and sd2.parts["VAE + text encoder"] == sd15.parts["VAE + text encoder"] == 0
    assert 1.0 < sd2.parts["UNet weights (fp32 master copy)"] / sd15.parts["UNet weights (fp32 master copy)"] < 1.01
    cfg.model = tiny_sd_path  # a local folder: its own configs, a tiny fraction of SD 1.5
    tiny = memory.estimate_for_config(cfg)
    weights = "UNet weights (fp32 master copy)"
    assert tiny.model == f"the model in {tiny_sd_path}" and tiny.parts[weights] < 0.01 * sd15.parts[weights]
    cfg.mixed_precision = "fp32"
    assert memory.estimate_for_config(cfg).parts["activations"] > tiny.parts["activations"]


def test_only_the_harmless_library_lines_are_silenced(caplog):
    import logging

    from sdcourse import runtime

    runtime.quiet_harmless_warnings()
    runtime.quiet_harmless_warnings()  # once per notebook: filters are not stacked
    for name, words in runtime.HARMLESS_LOG_LINES:
        logger = logging.getLogger(name)
        assert len(logger.filters) == 1
        logger.warning(f"prefix {words} suffix")
        logger.warning("a different warning")
    assert [r.getMessage() for r in caplog.records] == ["a different warning"] * 2


def test_config_panel_labels_fit_their_column_in_jupyterlabs_font():
    # JupyterLab on Linux draws labels in DejaVu Sans at 13 px, where a 150 px column cut
    # "min-SNR gamma (0: off)" (158 px of text); ipywidgets adds 8 px of padding to a label.
    from pathlib import Path

    from PIL import ImageFont

    from sdcourse import widgets

    path = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
    if not path.exists():
        pytest.skip("DejaVu Sans is not installed here")
    font = ImageFont.truetype(str(path), 13)
    panel = widgets.training_config_panel(TrainConfig())
    boxes = [box for column in panel.children[0].children for box in column.children]
    described = [b for b in boxes if b.style.description_width]
    assert len(described) > 15
    too_long = [(b.description, font.getlength(b.description) + 8, b.style.description_width) for b in described
                if font.getlength(b.description) + 8 > int(b.style.description_width.removesuffix("px"))]
    assert not too_long
