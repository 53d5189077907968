"""Sampling on the tiny pipeline: determinism, schedulers, UNet swapping, denoising traces, FreeU."""

import copy

import numpy as np
import pytest
import torch

from sdcourse import models, sampling

PROMPTS = ["a red circle on a blue background"]
SIZE = dict(height=64, width=64)


def same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def pipe(tiny_sd_path):
    return models.load_pipeline(tiny_sd_path)


@pytest.mark.parametrize("name", list(sampling.SCHEDULERS))
def test_same_seed_same_images_for_every_scheduler(pipe, name):
    sampling.set_scheduler(pipe, name)
    first = sampling.generate(pipe, PROMPTS, seeds=[0, 1], steps=3, **SIZE)
    again = sampling.generate(pipe, PROMPTS, seeds=[0, 1], steps=3, **SIZE)
    assert sampling.scheduler_name(pipe) == name
    assert same(first, again)
    assert not same(first[:1], first[1:])  # another seed, another picture


def test_generate_is_prompt_major(pipe):
    sampling.set_scheduler(pipe, "Euler")
    both = sampling.generate(pipe, ["a red circle", "a blue square"], seeds=[3, 4], steps=2, **SIZE)
    second_prompt = sampling.generate(pipe, ["a blue square"], seeds=[3, 4], steps=2, **SIZE)
    assert same(both[2:], second_prompt)


def test_switching_schedulers_carries_no_setting_over(pipe):
    sampling.set_scheduler(pipe, "DPM++ 2M Karras")
    sampling.set_scheduler(pipe, "Euler")
    assert pipe.scheduler.config.use_karras_sigmas is False
    after_switch = sampling.generate(pipe, PROMPTS, seeds=[0], steps=3, **SIZE)
    pipe.scheduler = type(pipe.scheduler).from_pretrained(pipe.name_or_path, subfolder="scheduler")  # never DPM++
    assert same(after_switch, sampling.generate(pipe, PROMPTS, seeds=[0], steps=3, **SIZE))


def test_scheduler_keeps_v_prediction(tiny_sd_v_path):
    v_pipe = models.load_pipeline(tiny_sd_v_path)
    for name in sampling.SCHEDULERS:
        sampling.set_scheduler(v_pipe, name)
        assert v_pipe.scheduler.config.prediction_type == "v_prediction"


def test_unknown_scheduler_is_named_in_the_error(pipe):
    with pytest.raises(ValueError, match="Euler a"):
        sampling.set_scheduler(pipe, "Heun++")


def test_freeu_changes_the_image_and_switches_off_again(pipe):
    sampling.set_scheduler(pipe, "DDIM")
    plain = sampling.generate(pipe, PROMPTS, seeds=[0], steps=3, **SIZE)
    with_freeu = sampling.generate(pipe, PROMPTS, seeds=[0], steps=3, **SIZE, freeu=True)
    assert not same(plain, with_freeu)
    assert same(plain, sampling.generate(pipe, PROMPTS, seeds=[0], steps=3, **SIZE))


@pytest.fixture(scope="module")
def finetune_outputs(pipe, tmp_path_factory):
    """Notebook 03's layout, with UNets that differ from the base: snapshots, a resumable checkpoint
    (not for comparing) and the final pipeline."""
    outputs = tmp_path_factory.mktemp("outputs")
    unet = type(pipe.unet).from_pretrained(pipe.name_or_path, subfolder="unet")
    for step in (1000, 500):  # written out of order: finetuned_unets sorts by step number
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(0.05 * torch.randn_like(p))
        unet.save_pretrained(outputs / "finetune" / "snapshots" / f"step-{step:06d}" / "unet")
    unet.save_pretrained(outputs / "finetune" / "checkpoints" / "step-001500" / "unet")
    (outputs / "finetune" / "snapshots" / "step-000200").mkdir()  # an interrupted save: no unet/
    pipe.save_pretrained(outputs / "finetune" / "final")
    return outputs


def test_finetuned_unets_lists_checkpoints_by_step_then_final(finetune_outputs, tmp_path):
    found = sampling.finetuned_unets(finetune_outputs)
    assert list(found) == ["step 500", "step 1000", "fine-tuned"]
    assert found["fine-tuned"] == finetune_outputs / "finetune" / "final"
    assert sampling.finetuned_unets(tmp_path) == {}


def test_generate_per_unet_swaps_only_the_unet(pipe, finetune_outputs):
    sampling.set_scheduler(pipe, "DDIM")
    base_unet = pipe.unet
    found = sampling.finetuned_unets(finetune_outputs)
    results = sampling.generate_per_unet(pipe, {"base": pipe.unet, **found}, PROMPTS, [0], steps=3, **SIZE)
    assert pipe.unet is base_unet
    assert same(results["base"], sampling.generate(pipe, PROMPTS, [0], steps=3, **SIZE))
    assert same(results["fine-tuned"], results["base"])  # "final" here is the base pipeline saved
    assert not same(results["step 500"], results["base"])
    assert not same(results["step 1000"], results["step 500"])


def test_unet_swapped_restores_after_an_error(pipe):
    original = pipe.unet
    with pytest.raises(RuntimeError):
        with sampling.unet_swapped(pipe, copy.deepcopy(original)) as swapped:
            assert swapped.unet is not original
            raise RuntimeError("boom")
    assert pipe.unet is original


def test_load_unet_explains_a_folder_without_unet(tmp_path):
    with pytest.raises(FileNotFoundError, match="unet/"):
        sampling.load_unet(tmp_path)


def test_trace_returns_exactly_the_requested_steps(pipe):
    sampling.set_scheduler(pipe, "DDIM")
    trace = sampling.trace_denoising(pipe, PROMPTS[0], seed=0, steps=6, capture=[6, 1, 3], **SIZE)
    assert trace.steps == [1, 3, 6]
    assert len(trace.latents) == len(trace.x0) == len(trace.timesteps) == 3
    assert trace.timesteps == sorted(trace.timesteps, reverse=True)  # noise first
    assert trace.latents[0].shape == (4, 8, 8)
    # Watching does not change the result, and the scheduler is left as it was.
    assert same([trace.image], sampling.generate(pipe, PROMPTS, [0], steps=6, **SIZE))
    assert "step" not in vars(pipe.scheduler)
    # At the last step the x0 estimate and the latent nearly agree; at the first they do not.
    gap = [(x0 - lat).abs().mean().item() for x0, lat in zip(trace.x0, trace.latents)]
    assert gap[-1] < 0.1 * gap[0]


@pytest.mark.parametrize("name", ["Euler", "Euler a"])
def test_euler_traces_are_on_the_vaes_scale(pipe, name):
    # Euler's latent after step 1 of 10 is x0 + sigma * noise with sigma ~ 8: the trace divides by
    # sqrt(sigma^2 + 1), so what is decoded has the spread of DDIM's latents (about 1), not ~8.
    sampling.set_scheduler(pipe, "DDIM")
    ddim = sampling.trace_denoising(pipe, PROMPTS[0], seed=0, steps=10, capture=[1, 10], **SIZE)
    sampling.set_scheduler(pipe, name)
    euler = sampling.trace_denoising(pipe, PROMPTS[0], seed=0, steps=10, capture=[1, 10], **SIZE)
    assert float(pipe.scheduler.sigmas[1]) > 4
    for ours, theirs in zip(euler.latents, ddim.latents):
        assert 0.6 < ours.std().item() / theirs.std().item() < 1.6, (ours.std(), theirs.std())


@pytest.mark.parametrize("capture", [[0, 2], [2, 7], []])
def test_trace_rejects_steps_outside_the_run(pipe, capture):
    with pytest.raises(ValueError, match="between 1 and steps=6"):
        sampling.trace_denoising(pipe, PROMPTS[0], seed=0, steps=6, capture=capture, **SIZE)


def test_trace_names_schedulers_without_an_x0_estimate(pipe):
    sampling.set_scheduler(pipe, "PNDM")
    with pytest.raises(ValueError, match="DDIM, Euler or Euler a"):
        sampling.trace_denoising(pipe, PROMPTS[0], seed=0, steps=3, capture=[1], **SIZE)
    assert "step" not in vars(pipe.scheduler)


def test_vae_round_trip_shapes(pipe, sample_dir):
    from PIL import Image
    image = Image.open(next((sample_dir / "images").glob("*.png"))).convert("RGB").resize((64, 64))
    latents = sampling.encode_images(pipe, [image])
    assert latents.shape == (1, 4, 8, 8)  # 8x smaller each side, 4 channels
    decoded = sampling.decode_latents(pipe, latents)
    assert decoded[0].size == (64, 64)


def test_sampler_panel_shows_a_picture_and_regenerates(pipe):
    from sdcourse import widgets
    panel = widgets.sampler_panel(pipe, PROMPTS[0], steps=2, scheduler="Euler a", **SIZE)
    (button, caption), picture = panel.children[-2].children, panel.children[-1]
    first = bytes(picture.value)
    assert first.startswith(b"\x89PNG") and "Euler a, 2 steps" in caption.value
    assert picture.layout.width == "256px"  # the 64 px picture enlarged 4x, not stretched to the output's width
    seed_box = panel.children[3].children[0]
    seed_box.value = 1
    button.click()
    assert bytes(picture.value) != first and "seed 1" in caption.value
    assert sampling.scheduler_name(pipe) == "Euler a"


def test_sampler_panel_model_menu_swaps_unets(pipe):
    from sdcourse import widgets
    other = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    panel = widgets.sampler_panel(pipe, PROMPTS[0], steps=2, unets={"base": pipe.unet, "tuned": other}, **SIZE)
    model_menu, (button, caption), picture = panel.children[-3], panel.children[-2].children, panel.children[-1]
    base_png = bytes(picture.value)
    model_menu.value = "tuned"
    button.click()
    assert bytes(picture.value) != base_png and caption.value.startswith("tuned:")
    assert pipe.unet is not other


def test_xy_cells_match_single_generations(pipe):
    sampling.set_scheduler(pipe, "DDIM")
    cells = sampling.generate_xy(pipe, PROMPTS[0], 0, "steps", [2, 3], "scheduler", ["Euler", "DDIM"],
                                 guidance_scale=5.0, **SIZE)
    assert len(cells) == 4 and sampling.scheduler_name(pipe) == "DDIM"  # scheduler restored
    sampling.set_scheduler(pipe, "Euler")
    euler_3 = sampling.generate(pipe, PROMPTS, [0], steps=3, guidance_scale=5.0, **SIZE)
    assert same(cells[1:2], euler_3)  # row "Euler", column "3 steps"
    sampling.set_scheduler(pipe, "DDIM")
    assert same(cells[2:3], sampling.generate(pipe, PROMPTS, [0], steps=2, guidance_scale=5.0, **SIZE))


def test_sampler_panel_reports_a_failed_generation(pipe, monkeypatch):
    from sdcourse import widgets
    panel = widgets.sampler_panel(pipe, PROMPTS[0], steps=2, **SIZE)
    (button, caption) = panel.children[-2].children

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(sampling, "generate", out_of_memory)
    button.click()  # ipywidgets reports the traceback itself; the panel must say it too
    assert caption.value == "Generation failed: OutOfMemoryError: CUDA out of memory" and not button.disabled
