"""LoRA: train a small low-rank update of the UNet's attention layers instead of the whole UNet.

Each attention projection W (to_q, to_k, to_v, to_out) gets a trainable W + B·A, with A of shape
[rank, in] and B of shape [out, rank]; W itself stays frozen. At rank 8 that is 1.6 million parameters,
0.2 % of SD 1.5's UNet (counted in notebook 06), so gradients and optimizer states almost vanish and the
result is a file of a few megabytes that loads on top of the base model (Hu et al. 2021). peft implements the
layers; diffusers loads and saves them. The scale alpha/rank is fixed to 1 (alpha = rank), which keeps
the exported web-UI file's ``alpha`` honest.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
# LoCon ("LoRA for convolution", LyCORIS; kohya's conv_dim): also the ResNet blocks' 3x3 and 1x1
# convolutions and the down- and upsampling convolutions, where the UNet keeps its textures and
# spatial detail. A conv LoRA's A is a k x k convolution to ``rank`` channels, its B a 1x1 back.
CONV_TARGET_MODULES = ["conv1", "conv2", "conv_shortcut", "conv"]
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for


def add_lora(unet, rank: int, seed: int = 0, conv: bool = False) -> list[torch.nn.Parameter]:
    """Freeze the UNet, add rank-``rank`` LoRA layers to its attention projections (and with ``conv``, LoCon,
    to its convolutions too); return the trainable parameters.

    A starts random (from ``seed``, so runs repeat), B at zero: the adapter changes nothing until it trains.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=TARGET_MODULES + (CONV_TARGET_MODULES if conv else [])))
    return [p for p in unet.parameters() if p.requires_grad]


def has_conv_lora(unet) -> bool:
    return any(isinstance(getattr(m, "base_layer", None), torch.nn.Conv2d) for m in unet.modules())


def has_lora(unet) -> bool:
    return bool(getattr(unet, "peft_config", None))


def save_lora(unet, folder: str | Path) -> Path:
    """Write the LoRA layers in diffusers' format: ``pipe.load_lora_weights(folder)`` loads them."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = {k: v.detach().float().cpu().contiguous()
              for k, v in convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)).items()}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return Path(folder) / WEIGHT_NAME


def _unet_peft_state(folder: str | Path) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_unet_state_dict_to_peft

    saved = load_file(Path(folder) / WEIGHT_NAME)
    return convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in saved.items() if k.startswith("unet.")})


def load_lora_into(unet, folder: str | Path) -> None:
    """Load saved LoRA weights into a UNet that already has its adapter (resuming a LoRA run)."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, _unet_peft_state(folder))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"{folder}: LoRA weights that this UNet's adapter does not have, e.g. {unexpected[:2]}")


def export_kohya(folder: str | Path, out_file: str | Path) -> Path:
    """The LoRA in kohya's format, the one the AUTOMATIC1111 web UI and ComfyUI load (``<lora:name:0.8>``)."""
    from diffusers.utils import convert_state_dict_to_kohya

    state = convert_state_dict_to_kohya({"unet." + k: v for k, v in _unet_peft_state(folder).items()})
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.partial")
    metadata = {"ss_network_module": "networks.lora"}
    down = {k: v for k, v in state.items() if k.endswith(".lora_down.weight")}
    conv_ranks = {v.shape[0] for v in down.values() if v.ndim == 4 and v.shape[-1] > 1}
    if conv_ranks:  # LoCon: kohya's networks.lora with conv_dim, which the web UIs read the same way
        metadata["ss_network_args"] = json.dumps({"conv_dim": str(max(conv_ranks)), "conv_alpha": str(max(conv_ranks))})
    save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
    tmp.replace(out_file)
    return out_file
