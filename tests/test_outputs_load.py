"""The course's outputs load with the plainest public calls and no dtype argument, on the newest diffusers
and on Colab's (0.39, which the colab lane runs). Textual Inversion: tests/test_textual_inversion.py; the
dataset with datasets.load_dataset("imagefolder"): tests/test_data.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from sdcourse import export, lora, tiny


def unet_output(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, unet.config.in_channels, 8, 8, generator=gen)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(noisy, 10, text).sample


@pytest.fixture
def lora_folder(tiny_sd_path, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    with torch.no_grad():  # B starts at zero (the adapter does nothing yet): pretend it was trained
        gen = torch.Generator().manual_seed(0)
        for p in lora.add_lora(unet, rank=4):
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    lora.save_lora(unet, tmp_path / "lora")
    return tmp_path / "lora", unet_output(unet)


def test_lora_folder_loads_with_weight_name(tiny_sd_path, lora_folder):
    folder, expected = lora_folder
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    base = unet_output(pipe.unet)
    pipe.load_lora_weights(folder, weight_name=lora.WEIGHT_NAME)
    torch.testing.assert_close(unet_output(pipe.unet), expected)
    assert not torch.allclose(base, expected)


def test_lora_folder_loads_without_weight_name_online(tiny_sd_path, lora_folder, tmp_path):
    # diffusers before 0.40 (Colab's 0.39) refuses a folder without weight_name in offline mode, which the
    # tests use; a learner on Colab is online, where it finds the folder's single LoRA file by itself.
    folder, expected = lora_folder
    code = ("import sys, torch\nfrom diffusers import StableDiffusionPipeline\nfrom tests.test_outputs_load import unet_output\n"
            "pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])\npipe.load_lora_weights(sys.argv[2])\n"
            "torch.save(unet_output(pipe.unet), sys.argv[3])\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "0"}
    done = subprocess.run([sys.executable, "-c", code, tiny_sd_path, str(folder), str(tmp_path / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), expected)
    if tuple(int(x) for x in __import__("diffusers").__version__.split(".")[:2]) >= (0, 40):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
        pipe.load_lora_weights(folder)  # and offline too, from 0.40 on
        torch.testing.assert_close(unet_output(pipe.unet), expected)


def test_webui_lora_file_loads_by_folder_and_weight_name(tiny_sd_path, lora_folder, tmp_path):
    folder, expected = lora_folder
    kohya = lora.export_kohya(folder, tmp_path / "webui" / "my_style.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.load_lora_weights(str(kohya.parent), weight_name=kohya.name)  # as notebook 06 calls it
    torch.testing.assert_close(unet_output(pipe.unet), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_single_file_loads_without_a_dtype_and_samples(prediction_type, tmp_path):
    src = tiny.sd_path(prediction_type)
    out = export.export_single_file(src, tmp_path / "model.safetensors")  # fp16 inside, as exported for the web UI
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=src)  # offline: config= a local folder
    dtypes = {next(getattr(pipe, name).parameters()).dtype for name in ("unet", "vae", "text_encoder")}
    assert len(dtypes) == 1, dtypes  # one dtype for all parts, or sampling fails on a dtype mismatch
    assert pipe.scheduler.config.prediction_type == prediction_type
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and float(image.std()) > 0
