"""The loops the notebooks write out by hand compute what the library and diffusers compute.

The code is taken from the notebook cells themselves (by cell id), so a learner's notebook and
these tests cannot drift apart.
"""

import types

import nbformat
import numpy as np
import pytest
import torch

from sdcourse import latent_cache, models, sampling, train, training_set
from sdcourse.course import NOTEBOOKS

SAMPLING_LOOP_CELL = ("00_how_stable_diffusion_works.ipynb", "b7c1a002")
TRAINING_STEP_CELL = ("03_finetune_the_unet.ipynb", "c3d1a002")


def cell_source(notebook: str, cell_id: str) -> str:
    book = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    return next(c.source for c in book.cells if c.get("id") == cell_id)


@pytest.fixture(scope="module")
def pipe(tiny_sd_path):
    pipe = models.load_pipeline(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def generate_by_hand():
    namespace = {"torch": torch}
    exec(cell_source(*SAMPLING_LOOP_CELL), namespace)
    return namespace["generate_by_hand"]


def pipe_image(pipe, prompt, seed, steps, guidance_scale=7.5, negative_prompt=None):
    return pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                generator=torch.Generator("cpu").manual_seed(seed)).images[0]


@pytest.mark.parametrize("scheduler", list(sampling.SCHEDULERS))
def test_sampling_loop_by_hand_reproduces_the_pipeline(pipe, generate_by_hand, scheduler):
    sampling.set_scheduler(pipe, scheduler)  # Euler a draws noise inside its steps: the generator must match too
    by_hand = np.asarray(generate_by_hand(pipe, "a red circle", seed=3, steps=4))
    assert np.array_equal(by_hand, np.asarray(pipe_image(pipe, "a red circle", seed=3, steps=4)))
    assert not np.array_equal(by_hand, np.asarray(generate_by_hand(pipe, "a red circle", seed=4, steps=4)))


def test_guidance_and_negative_prompt_by_hand_match_the_pipeline(pipe, generate_by_hand):
    sampling.set_scheduler(pipe, "DDIM")
    kwargs = dict(seed=1, steps=3, guidance_scale=12.0, negative_prompt="a blue square")
    by_hand = np.asarray(generate_by_hand(pipe, "a red circle", **kwargs))
    assert np.array_equal(by_hand, np.asarray(pipe_image(pipe, "a red circle", **kwargs)))
    without_negative = generate_by_hand(pipe, "a red circle", seed=1, steps=3, guidance_scale=12.0)
    assert not np.array_equal(by_hand, np.asarray(without_negative))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_step_by_hand_equals_the_library_loss(tiny_sd_path, tiny_sd_v_path, sample_dir, prediction_type):
    model = tiny_sd_path if prediction_type == "epsilon" else tiny_sd_v_path
    m = models.load_models(model, frozen_dtype=torch.float32)
    dataset = training_set.CaptionedImages(sample_dir, 64, 64)
    batch = training_set.collate([dataset[i] for i in range(4)])
    cfg = train.TrainConfig(model=model, seed=7)
    namespace = {"torch": torch, "train": train, "latent_cache": latent_cache, "m": m, "batch": batch, "cfg": cfg,
                 "rt": types.SimpleNamespace(device=torch.device("cpu"))}
    exec(cell_source(*TRAINING_STEP_CELL), namespace)
    assert m.noise_scheduler.config.prediction_type == prediction_type
    with torch.no_grad():
        expected = train.diffusion_loss(m.unet, m.noise_scheduler, latent_cache.encode_pixels(m.vae, batch["pixels"]).float(),
                                        latent_cache.encode_texts(m.tokenizer, m.text_encoder, batch["texts"]).float(),
                                        torch.Generator().manual_seed(7))
    torch.testing.assert_close(namespace["loss"], expected)
    assert namespace["timesteps"].shape == (4,) and namespace["noisy"].shape == namespace["latents"].shape


def test_sampling_loop_by_hand_reproduces_a_v_prediction_pipeline(tiny_sd_v_path, generate_by_hand):
    v_pipe = models.load_pipeline(tiny_sd_v_path)
    v_pipe.set_progress_bar_config(disable=True)
    sampling.set_scheduler(v_pipe, "DPM++ 2M Karras")  # the UNet's output is a velocity: the scheduler converts
    by_hand = generate_by_hand(v_pipe, "a red circle", seed=2, steps=3)
    assert np.array_equal(np.asarray(by_hand), np.asarray(pipe_image(v_pipe, "a red circle", seed=2, steps=3)))
