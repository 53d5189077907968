"""The cost table: every figure is labelled, the counted ones match a fresh count, the estimates follow their inputs."""

import pytest
import torch

from sdcourse import costs

BLIP_VISION = {"base": dict(hidden_size=768, num_hidden_layers=12, intermediate_size=3072, num_attention_heads=12),
               "large": dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=4096, num_attention_heads=16)}


@pytest.mark.parametrize("size", ["base", "large"])
def test_blip_parameter_counts_match_a_count_of_the_architecture(size):
    from transformers import BlipConfig, BlipForConditionalGeneration
    vision = dict(BLIP_VISION[size], image_size=384, patch_size=16)
    config = BlipConfig(vision_config=vision, text_config=dict(encoder_hidden_size=vision["hidden_size"]))
    with torch.device("meta"):
        model = BlipForConditionalGeneration(config)
    counted = sum(p.numel() for p in model.parameters()) / 1e6
    assert costs.FIGURES[f"blip_{size}_parameters"].value == pytest.approx(counted, abs=0.05)


def test_every_figure_says_how_it_was_obtained():
    for name, figure in costs.FIGURES.items():
        assert figure.kind in ("measured", "estimated") and figure.basis, name
        assert str(figure).endswith(f"({figure.kind}: {figure.basis})")
    with pytest.raises(ValueError, match="measured"):
        costs.Figure(1.0, "GB", "guessed", "")


def test_training_time_follows_steps_batch_and_size():
    one = costs.t4_training_time(1000, 4)
    assert one.kind == "estimated" and "1,000 steps x 4 images" in one.basis
    assert costs.t4_training_time(2000, 4).value == pytest.approx(2 * one.value)
    assert costs.t4_training_time(1000, 4, 256, 256).value < one.value / 3  # a quarter of the latent area


def test_sampling_time_uses_the_measured_step_rate():
    figure = costs.t4_sampling_time(images=100, steps=30)
    assert figure.value == pytest.approx(100 * 30 / costs.FIGURES["t4_sampling_steps_per_s"].value / 60)
    assert figure.kind == "estimated" and "measured" in figure.basis


def test_merge_ram_counts_the_largest_component_of_every_input_plus_the_result(tmp_path):
    from sdcourse.export import COMPONENT_WEIGHTS
    for model, unet_bytes in (("a", 4000), ("b", 2000)):
        for component in COMPONENT_WEIGHTS:
            path = tmp_path / model / component / COMPONENT_WEIGHTS[component]
            path.parent.mkdir(parents=True)
            path.write_bytes(b"0" * (unet_bytes if component == "unet" else 100))
    figure = costs.merge_ram([tmp_path / "a", tmp_path / "b"])
    assert figure.value == pytest.approx((4000 + 2000 + 4000) / 1e9) and "unet" in figure.basis
