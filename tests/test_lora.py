"""LoRA layers: trainable parameters, saving, loading into a pipeline, and the web UI's format."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from sdcourse import lora, models


@pytest.fixture
def unet_with_trained_lora(tiny_sd_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    params = lora.add_lora(unet, rank=4)
    with torch.no_grad():  # B starts at zero (the adapter does nothing yet): pretend it was trained
        gen = torch.Generator().manual_seed(0)
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return unet, params


def image(pipe, **kwargs):
    return pipe("a red circle", num_inference_steps=2, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images[0]


def test_only_lora_parameters_train(tiny_sd_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    total = sum(p.numel() for p in unet.parameters())
    params = lora.add_lora(unet, rank=4)
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} >= {"to_q", "to_k", "to_v"}
    assert 0 < sum(p.numel() for p in params) < 0.2 * total


def test_saved_lora_loads_into_a_pipeline_and_changes_it(unet_with_trained_lora, tiny_sd_path, tmp_path):
    unet, _ = unet_with_trained_lora
    file = lora.save_lora(unet, tmp_path / "lora")
    assert file.exists() and all(k.startswith("unet.") for k in load_file(file))
    pipe = models.load_pipeline(tiny_sd_path)
    base = image(pipe)
    pipe.load_lora_weights(tmp_path / "lora", weight_name=lora.WEIGHT_NAME)
    with_lora = image(pipe)
    assert not torch.allclose(torch.tensor(base), torch.tensor(with_lora))
    pipe.unet = unet  # the in-memory UNet with the same adapter gives the same picture
    torch.testing.assert_close(torch.tensor(image(pipe)), torch.tensor(with_lora), atol=1e-5, rtol=0)


def test_resume_loads_the_same_weights(unet_with_trained_lora, tiny_sd_path, tmp_path):
    unet, params = unet_with_trained_lora
    lora.save_lora(unet, tmp_path / "ckpt")
    fresh = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    fresh_params = lora.add_lora(fresh, rank=4)
    lora.load_lora_into(fresh, tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(params, fresh_params))


def test_kohya_export_loads_and_matches(unet_with_trained_lora, tiny_sd_path, tmp_path):
    unet, _ = unet_with_trained_lora
    lora.save_lora(unet, tmp_path / "lora")
    kohya = lora.export_kohya(tmp_path / "lora", tmp_path / "webui" / "my_style.safetensors")
    keys = list(load_file(kohya))
    assert all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys) and any(k.endswith(".alpha") for k in keys)
    reference = models.load_pipeline(tiny_sd_path)
    reference.load_lora_weights(tmp_path / "lora", weight_name=lora.WEIGHT_NAME)
    pipe = models.load_pipeline(tiny_sd_path)
    pipe.load_lora_weights(str(kohya.parent), weight_name=kohya.name)  # diffusers reads kohya's format as the web UI does
    torch.testing.assert_close(torch.tensor(image(pipe)), torch.tensor(image(reference)), atol=1e-5, rtol=0)


def lora_config(tmp_path, model, data, **overrides):
    from sdcourse.train import TrainConfig
    settings = dict(model=model, dataset=str(data), output_dir=str(tmp_path / "lora"), width=64, height=64,
                    lr=1e-2, max_steps=8, checkpoint_every=4, validate_every=0, num_workers=0, lora_rank=4,
                    batch_size=8)
    return TrainConfig(**{**settings, **overrides})


def test_lora_training_resumes_exactly_and_saves_only_the_lora(tmp_path, tiny_sd_path, sample_dir):
    from sdcourse import train

    whole = train.train(lora_config(tmp_path / "whole", tiny_sd_path, sample_dir))
    final = whole.final_dir
    assert [p.name for p in final.iterdir()] == [lora.WEIGHT_NAME]  # a few kB, not a pipeline
    checkpoint = tmp_path / "whole" / "lora" / "checkpoints" / "step-000004"
    assert (checkpoint / lora.WEIGHT_NAME).exists() and not (checkpoint / "unet").exists()

    cfg = lora_config(tmp_path / "killed", tiny_sd_path, sample_dir)

    def kill_at_step_6(step, loss):
        if step == 6:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, on_step=kill_at_step_6)
    resumed = train.train(cfg)
    assert resumed.losses == whole.losses[4:]
    a, b = load_file(final / lora.WEIGHT_NAME), load_file(resumed.final_dir / lora.WEIGHT_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    pipe = models.load_pipeline(tiny_sd_path)
    base = image(pipe)
    pipe.load_lora_weights(final, weight_name=lora.WEIGHT_NAME)
    assert not torch.allclose(torch.tensor(base), torch.tensor(image(pipe)))


def test_lora_memory_estimate_counts_only_the_trained_layers(tiny_sd_path):
    from sdcourse import memory
    settings = dict(batch_size=1, width=64, height=64, half_precision=False, optimizer="adamw", fused_step=False,
                    gradient_checkpointing=True, cache_latents=True)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    full = memory.estimate_peak(unet, 0, **settings)
    lora.add_lora(unet, rank=4)
    with_lora = memory.estimate_peak(unet, 0, **settings)
    assert with_lora.parts["optimizer states"] < 0.2 * full.parts["optimizer states"]
    assert with_lora.parts["UNet weights (fp32 master copy)"] >= full.parts["UNet weights (fp32 master copy)"]


def test_locon_adds_layers_to_every_resnet_and_sampling_convolution(tiny_sd_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    plain = sum(p.numel() for p in lora.add_lora(unet, rank=4))
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    convs = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)
             and n.rsplit(".", 1)[-1] in lora.CONV_TARGET_MODULES]
    locon = lora.add_lora(unet, rank=4, conv=True)
    assert lora.has_conv_lora(unet) and sum(p.numel() for p in locon) > plain
    adapted = {n.split(".lora_A")[0] for n, p in unet.named_parameters() if p.requires_grad and ".lora_A" in n}
    assert {c for c in convs if c + ".base_layer" not in {n for n, _ in unet.named_modules()}} == set()
    assert {c for c in convs} <= adapted | {c.removesuffix(".base_layer") for c in adapted}
    assert any("downsamplers" in c for c in convs) and any("upsamplers" in c for c in convs)


def test_locon_exports_conv_layers_for_the_web_ui_and_reloads_equal(tiny_sd_path, tmp_path):
    from safetensors import safe_open

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in lora.add_lora(unet, rank=4, conv=True):
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    lora.save_lora(unet, tmp_path / "locon")
    kohya = lora.export_kohya(tmp_path / "locon", tmp_path / "webui" / "locon.safetensors")
    state = load_file(kohya)
    conv_down = state["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    assert conv_down.shape[:2] == (4, unet.config.block_out_channels[0]) and conv_down.shape[2:] == (3, 3)
    assert state["lora_unet_up_blocks_0_upsamplers_0_conv.lora_up.weight"].shape[1:] == (4, 1, 1)
    with safe_open(kohya, "pt") as f:
        assert '"conv_dim": "4"' in f.metadata()["ss_network_args"]
    reference = models.load_pipeline(tiny_sd_path)
    reference.unet = unet
    pipe = models.load_pipeline(tiny_sd_path)
    pipe.load_lora_weights(str(kohya.parent), weight_name=kohya.name)
    base = image(models.load_pipeline(tiny_sd_path))
    # The conv layers load too: the picture equals the in-memory LoCon's, not the attention-only part's.
    torch.testing.assert_close(torch.tensor(image(pipe)), torch.tensor(image(reference)), atol=1e-5, rtol=0)
    attention_only = models.load_pipeline(tiny_sd_path)
    attention_only.load_lora_weights({k: v for k, v in load_file(tmp_path / "locon" / lora.WEIGHT_NAME).items()
                                      if ".attentions." in k})
    assert not torch.allclose(torch.tensor(image(attention_only)), torch.tensor(image(pipe)), atol=1e-3)
    assert not torch.allclose(torch.tensor(base), torch.tensor(image(pipe)), atol=1e-3)


def test_locon_trains_through_the_course_loop_and_needs_a_rank(tmp_path, tiny_sd_path, sample_dir):
    from sdcourse import train

    result = train.train(lora_config(tmp_path, tiny_sd_path, sample_dir, lora_conv=True, max_steps=4))
    saved = load_file(result.final_dir / lora.WEIGHT_NAME)
    conv_ups = [k for k in saved if "resnets" in k and k.endswith("lora_B.weight") and saved[k].ndim == 4]
    assert conv_ups and any(saved[k].abs().sum() > 0 for k in conv_ups)  # B starts at zero: it trained
    with pytest.raises(ValueError, match="set lora_rank too"):
        train.TrainConfig(lora_conv=True).check()


def test_a_fused_locon_draws_what_the_adapter_draws(tiny_sd_path, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in lora.add_lora(unet, rank=4, conv=True):
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    lora.save_lora(unet, tmp_path / "locon")
    fused = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    fused.load_state_dict(lora.fuse_into(base_state, tmp_path / "locon"))
    x, t, text = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([500]), torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, t, text).sample, unet(x, t, text).sample, atol=1e-4, rtol=1e-4)


def test_fuse_into_scales_by_the_saved_alpha_over_rank(tiny_sd_path, tmp_path):
    """A LoRA of alpha 8 at rank 4 (scale 2), its to_k layers rank 2 and its to_v layers alpha 1 (peft's
    rank_pattern and alpha_pattern): fused, it draws what peft's adapter draws; diffusers loads it the same, and
    the export for the web UIs carries the same scales."""
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    torch.manual_seed(0)  # init_lora_weights=False: B random too, as after training
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 1},
                                init_lora_weights=False, target_modules=lora.TARGET_MODULES))
    lora.save_lora(unet, tmp_path / "lora")
    assert lora.adapter_settings(tmp_path / "lora")["lora_alpha"] == 8
    fused = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    fused.load_state_dict(lora.fuse_into(base_state, tmp_path / "lora"))
    plain = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    pipe = models.load_pipeline(tiny_sd_path)
    pipe.load_lora_weights(tmp_path / "lora", weight_name=lora.WEIGHT_NAME)
    gen = torch.Generator().manual_seed(1)
    x, t, text = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([500]), torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        expected = unet(x, t, text).sample
        assert (expected - plain(x, t, text).sample).abs().max() > 1e-2  # the adapter changes the prediction
        torch.testing.assert_close(fused(x, t, text).sample, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pipe.unet(x, t, text).sample, expected, atol=1e-4, rtol=1e-4)
    # The web UIs add (alpha / rank) * up @ down from kohya's file: each layer's delta the same as peft's.
    kohya = load_file(lora.export_kohya(tmp_path / "lora", tmp_path / "webui" / "scaled.safetensors"))
    fused_state, names = fused.state_dict(), {"lora_unet_" + k.removesuffix(".weight").replace(".", "_"): k
                                              for k in base_state}
    downs = [k for k in kohya if k.endswith(".lora_down.weight")]
    assert len(downs) == 14 * 4
    for key in downs:
        layer = key.removesuffix(".lora_down.weight")
        down, up, alpha = kohya[key], kohya[layer + ".lora_up.weight"], kohya[layer + ".alpha"]
        weight = names[layer]
        torch.testing.assert_close(base_state[weight] + alpha / down.shape[0] * up @ down, fused_state[weight])
    assert [float(kohya[f"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_{m}.alpha"])
            for m in ("to_q", "to_k", "to_v")] == [8, 8, 1]  # rank 4, 2, 4: scales 2, 4, 1/4


def test_a_lora_saved_without_its_settings_fuses_as_alpha_equals_rank(unet_with_trained_lora, tmp_path):
    """Older saves and other tools' files carry no adapter settings: read as diffusers reads them, alpha = rank."""
    unet, _ = unet_with_trained_lora
    base_state = {k: v for k, v in unet.state_dict().items() if "lora_" not in k}
    base_state = {k.replace(".base_layer", ""): v for k, v in base_state.items()}
    lora.save_lora(unet, tmp_path / "lora")
    weights = load_file(tmp_path / "lora" / lora.WEIGHT_NAME)
    (tmp_path / "bare").mkdir()
    save_file(weights, tmp_path / "bare" / lora.WEIGHT_NAME)  # the same weights, no metadata
    assert lora.adapter_settings(tmp_path / "bare") == {}
    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = unet.get_submodule(module)
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    fused = lora.fuse_into(base_state, tmp_path / "bare")[module + ".weight"]
    torch.testing.assert_close(fused, base_state[module + ".weight"] + b @ a)
