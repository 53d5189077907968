"""Merging and single-file export, checked against diffusers' own converters and loaders."""

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from safetensors.torch import load_file, save_file

from sdcourse import export, tiny


def perturbed_copy(src, dst, seed):
    """A copy of a pipeline folder whose UNet weights are shifted: a stand-in for a fine-tune."""
    shutil.copytree(src, dst)
    path = dst / "unet" / export.COMPONENT_WEIGHTS["unet"]
    gen = torch.Generator().manual_seed(seed)
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in load_file(path).items()}, path)
    return dst


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_single_file_export_inverts_diffusers_own_conversion(prediction_type, tmp_path):
    from transformers import CLIPTextModel

    src = tiny.sd_path(prediction_type)
    checkpoint = load_file(export.export_single_file(src, tmp_path / "model.safetensors", half=False))
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in checkpoint)
    for component, convert in (("unet", convert_ldm_unet_checkpoint), ("vae", convert_ldm_vae_checkpoint)):
        original = export.load_component(src, component)
        back = convert(checkpoint, export._config(src, component))
        assert back.keys() == original.keys()
        assert all(torch.equal(back[k], original[k]) for k in original), component
    text = {"text_model." + k.removeprefix("text_model."): v
            for k, v in export.load_component(src, "text_encoder").items()}
    if prediction_type == "epsilon":
        back = convert_ldm_clip_checkpoint(checkpoint)
    else:  # SD 2.x: OpenCLIP layout with fused q/k/v
        assert any(k.endswith("attn.in_proj_weight") for k in checkpoint)
        back = convert_open_clip_checkpoint(CLIPTextModel.from_pretrained(src, subfolder="text_encoder"), checkpoint)
    assert back.keys() == text.keys() and all(torch.equal(back[k], text[k]) for k in text)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_exported_file_loads_with_from_single_file(prediction_type, tmp_path):
    src = tiny.sd_path(prediction_type)
    out = export.export_single_file(src, tmp_path / "model.safetensors")
    assert not list(tmp_path.glob(".*partial"))
    loaded = StableDiffusionPipeline.from_single_file(out, config=src, torch_dtype=torch.float32)
    reference = StableDiffusionPipeline.from_pretrained(src)
    for name in ("unet", "vae", "text_encoder"):
        ours, ref = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        for key in ref:  # fp16 in the file: equal to fp16 precision
            torch.testing.assert_close(ours[key], ref[key].half().float(), rtol=0, atol=0, msg=f"{name}.{key}")
    assert loaded.scheduler.config.prediction_type == prediction_type


def test_weighted_sum_and_add_difference():
    a, b, c = ({"w": torch.full((2, 2), x)} for x in (1.0, 3.0, 2.0))
    assert torch.equal(export.weighted_sum([a, b], [0.25, 0.75])["w"], torch.full((2, 2), 2.5))
    assert torch.equal(export.add_difference(a, b, c, 0.5)["w"], torch.full((2, 2), 1.5))
    half = {"w": torch.ones(2, 2, dtype=torch.float16)}
    assert export.weighted_sum([half, half], [0.5, 0.5])["w"].dtype == torch.float16


def test_merge_copies_integer_tensors_from_the_first_model():
    ids = torch.arange(77)[None]
    merged = export.weighted_sum([{"position_ids": ids, "w": torch.ones(2)}, {"position_ids": ids, "w": torch.zeros(2)}],
                                 [0.9, 0.1])
    assert merged["position_ids"].dtype == torch.int64 and torch.equal(merged["position_ids"], ids)
    assert torch.allclose(merged["w"], torch.full((2,), 0.9))
    assert torch.equal(export.add_difference({"i": ids}, {"i": ids + 5}, {"i": ids}, 0.5)["i"], ids)


def test_tiny_models_are_stored_in_the_hub_layout(tiny_sd_path):
    vae = load_file(f"{tiny_sd_path}/vae/diffusion_pytorch_model.safetensors")
    assert {"encoder.mid_block.attentions.0.query.weight", "decoder.mid_block.attentions.0.proj_attn.bias"} <= vae.keys()
    assert not any(".to_q." in k or ".to_out." in k for k in vae)
    text = load_file(f"{tiny_sd_path}/text_encoder/model.safetensors")
    assert all(k.startswith("text_model.") for k in text)
    assert text["text_model.embeddings.position_ids"].dtype == torch.int64


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_hub_layout_base_merges_with_its_fine_tune(prediction_type, tmp_path):
    # The fine-tune is written by save_pretrained (the new VAE names); the base is as the hub stores it.
    base = tiny.sd_path(prediction_type)
    reference = StableDiffusionPipeline.from_pretrained(base)
    tuned = StableDiffusionPipeline.from_pretrained(base)
    with torch.no_grad():
        tuned.unet.conv_in.weight.add_(1.0)
    tuned.save_pretrained(tmp_path / "tuned", safe_serialization=True)
    merged = StableDiffusionPipeline.from_pretrained(
        export.merge_pipelines([base, tmp_path / "tuned"], [0.5, 0.5], tmp_path / "merged"))
    torch.testing.assert_close(merged.unet.conv_in.weight, reference.unet.conv_in.weight + 0.5)
    for name in ("vae", "text_encoder"):  # frozen in the fine-tune: unchanged by the merge
        ours, ref = getattr(merged, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref), name


def test_merge_refuses_different_architectures():
    with pytest.raises(ValueError, match="w has shape"):
        export.weighted_sum([{"w": torch.ones(2)}, {"w": torch.ones(3)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="different layers"):
        export.weighted_sum([{"w": torch.ones(2)}, {"v": torch.ones(2)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="one weight per model"):
        export.weighted_sum([{"w": torch.ones(2)}], [0.5, 0.5])


def test_merge_pipelines_interpolates_and_loads(tmp_path):
    base = tiny.sd_path("epsilon")
    tuned = perturbed_copy(base, tmp_path / "tuned", seed=1)
    merged = export.merge_pipelines([base, tuned], [0.5, 0.5], tmp_path / "merged")
    pipe = StableDiffusionPipeline.from_pretrained(merged)
    key = "conv_in.weight"
    expected = (export.load_component(base, "unet")[key] + export.load_component(tuned, "unet")[key]) / 2
    torch.testing.assert_close(pipe.unet.state_dict()[key], expected)
    # the VAE was the same in both, so the merge leaves it exactly as it was
    assert all(torch.equal(v, export.load_component(base, "vae")[k])
               for k, v in export.load_component(merged, "vae").items())
    assert json.loads((merged / "merge.json").read_text())["weights"] == [0.5, 0.5]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_merge_failure_leaves_no_half_written_folder(tmp_path):
    base = tiny.sd_path("epsilon")
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    (broken / "unet" / export.COMPONENT_WEIGHTS["unet"]).unlink()
    with pytest.raises(FileNotFoundError, match="unet"):
        export.merge_pipelines([base, broken], [0.5, 0.5], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]
