"""Grids, sidecars, latent previews, GIFs, plots and the step scrubber."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdcourse import visualization as viz


def tiles(n, size=(40, 30)):
    return [Image.new("RGB", size, (40 * i % 256, 90, 200)) for i in range(n)]


def test_bare_grid_is_exactly_the_tiles():
    grid = viz.image_grid(tiles(6), rows=2, cols=3)
    assert grid.size == (3 * 40, 2 * 30)
    assert grid.getpixel((40 * 2 + 5, 30 + 5)) == tiles(6)[5].getpixel((0, 0))


def test_labels_add_margins_and_are_drawn():
    images = tiles(6)
    bare = np.asarray(viz.image_grid(images, 2, 3))
    labelled = viz.image_grid(images, 2, 3, row_labels=["base", "fine-tuned"],
                              col_labels=["seed 0", "seed 1", "seed 2"],
                              title="a girl in a maid outfit holding a teapot")
    left = labelled.width - bare.shape[1]
    top = labelled.height - bare.shape[0]
    assert left > 0 and top > 0
    pixels = np.asarray(labelled)
    assert np.array_equal(pixels[top:, left:], bare)  # the tiles themselves are untouched
    assert (pixels[top:, :left] < 128).any()           # row titles: dark text in the left margin
    assert (pixels[:top, left:] < 128).any()           # title and column titles above the tiles


def test_text_pixels_sit_where_the_label_is():
    images = tiles(2)
    with_label = np.asarray(viz.image_grid(images, 1, 2, col_labels=["left", ""]))
    top = with_label.shape[0] - 30
    header = with_label[:top]
    assert (header[:, :40] < 128).any() and not (header[:, 40:] < 128).any()


def test_long_labels_wrap_instead_of_widening_the_grid():
    grid = viz.image_grid(tiles(2, (64, 64)), 1, 2, col_labels=["a girl in a maid outfit holding a teapot"] * 2)
    assert grid.width == 128 and grid.height > 64 + 2 * 14


def test_mixed_sizes_are_centred_not_stretched():
    small, big = Image.new("RGB", (20, 10), "red"), Image.new("RGB", (40, 30), "blue")
    grid = viz.image_grid([small, big], 1, 2)
    assert grid.size == (80, 30)
    red = np.all(np.asarray(grid) == (255, 0, 0), axis=-1)
    ys, xs = np.nonzero(red)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 29, 10, 19)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rows=2, cols=2), "3 images for 2 rows x 2 columns"),
    (dict(rows=1, cols=3, row_labels=["a", "b"]), "row_labels has 2 entries"),
    (dict(rows=1, cols=3, col_labels=["a"]), "col_labels has 1 entries"),
])
def test_grid_rejects_mismatched_counts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        viz.image_grid(tiles(3), **kwargs)


def test_save_with_settings_writes_png_and_json(tmp_path):
    settings = {"prompt": "a teapot", "seeds": [0, 1], "scheduler": "DDIM", "outputs": tmp_path}
    png = viz.save_with_settings(tiles(1)[0], tmp_path / "compare" / "base_vs_ft", settings)
    assert png.suffix == ".png" and Image.open(png).size == (40, 30)
    recorded = json.loads(png.with_suffix(".json").read_text())
    assert recorded["seeds"] == [0, 1] and recorded["outputs"] == str(tmp_path)


def test_latent_preview_applies_the_linear_factors():
    latents = torch.zeros(4, 2, 3)
    latents[0] = 1.0  # only channel 0: RGB = (1 + its row of factors) / 2
    preview = viz.latents_to_rgb(latents)
    assert preview.size == (3 * 8, 2 * 8)
    expected = ((1 + viz.SD1_LATENT_RGB_FACTORS[0]) / 2 * 255).round().numpy()
    assert np.allclose(np.asarray(preview)[5, 5], expected, atol=1)
    assert np.allclose(np.asarray(viz.latents_to_rgb(torch.zeros(4, 1, 1)))[0, 0], 128, atol=1)  # zero -> mid grey


def test_enlarge_keeps_the_aspect_ratio_with_whole_factors():
    assert viz.enlarge(Image.new("RGB", (64, 32)), min_side=100).size == (256, 128)
    assert viz.enlarge(Image.new("RGB", (512, 512))).size == (512, 512)


def test_fit_shrinks_large_images_only_and_keeps_the_aspect_ratio():
    assert viz.fit(Image.new("RGB", (512, 384)), 256).size == (256, 192)
    assert viz.fit(Image.new("RGB", (64, 64)), 256).size == (64, 64)


def test_tensor_to_image_maps_pixel_range_and_greyscale():
    rgb = viz.tensor_to_image(torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 2, 2))
    assert np.asarray(rgb)[0, 0].tolist() == [0, 128, 255]
    grey = viz.tensor_to_image(torch.tensor([[2.0, 4.0]]))
    assert np.asarray(grey).tolist() == [[0, 255]]


def test_gif_has_every_frame_and_loops(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "green", "blue")]
    path = viz.save_gif(frames, tmp_path / "denoising")
    gif = Image.open(path)
    assert path.suffix == ".gif" and gif.n_frames == 3 and gif.info["loop"] == 0


def test_plots_have_titles_and_axis_labels(tiny_sd_path):
    import matplotlib.pyplot as plt
    from diffusers import PNDMScheduler
    scheduler = PNDMScheduler.from_pretrained(tiny_sd_path, subfolder="scheduler")
    figures = [viz.plot_noise_schedule(scheduler), viz.plot_latent_channels(torch.randn(4, 8, 8), "latent"),
               viz.plot_attention_maps(Image.new("RGB", (64, 64)), ["red", "circle"], torch.rand(2, 8, 8), "maps")]
    for fig in figures:
        for ax in fig.axes:
            if ax.get_label() == "<colorbar>" or not ax.axison:  # colour bars, unused grid slots
                continue
            assert ax.get_title() and ax.get_xlabel()
        plt.close(fig)


def test_step_scrubber_swaps_frames():
    from sdcourse import widgets
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    panel = widgets.step_scrubber(frames, ["step 1", "step 40"])
    slider, picture = panel.children
    first = bytes(picture.value)
    assert slider.label == "step 1" and picture.layout.width == "16px"  # its own size, not the output's width
    slider.value = 1
    assert bytes(picture.value) != first and slider.label == "step 40"  # the readout is the frame shown
    with pytest.raises(ValueError, match="one label per frame"):
        widgets.step_scrubber(frames, ["only one"])


def test_min_cell_enlarges_small_tiles_by_whole_factors():
    grid = viz.image_grid(tiles(2, (64, 32)), 1, 2, min_cell=100)
    assert grid.size == (2 * 256, 128)


def test_denoising_pictures_one_column_and_one_frame_per_step(tiny_sd_path):
    from sdcourse import models, sampling
    pipe = models.load_pipeline(tiny_sd_path)
    sampling.set_scheduler(pipe, "Euler")
    trace = sampling.trace_denoising(pipe, "a red circle", seed=0, steps=4, capture=[1, 4], height=64, width=64)
    bare = viz.image_grid([Image.new("RGB", (64, 64))] * 6, rows=3, cols=2, min_cell=192)
    grid, frames = viz.denoising_pictures(pipe, trace, min_cell=192)
    assert len(frames) == 2 and frames[0].width >= 2 * 192
    assert grid.width > bare.width and grid.height > bare.height  # three rows of two steps, plus labels
    assert grid.width - bare.width < 192  # ... and no third column
