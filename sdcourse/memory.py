"""How much GPU memory a fine-tuning run will need, worked out before it starts.

Peak memory of UNet training is a sum of parts that depend on the settings in plain ways:

- weights: fp32 master weights, 4 bytes per parameter, always;
- half-precision weight copies: autocast casts each weight to fp16/bf16 once and caches the copy
  until the forward pass ends (2 bytes per parameter), unless its cache is off, as in our loop;
- gradients: 4 bytes per parameter, unless the optimizer step is fused into the backward pass
  (then a parameter's gradient is freed as soon as it is used: only the largest one exists at once);
- optimizer states: AdamW keeps two moments, 8 bytes per parameter; 8-bit AdamW 2 bytes;
- EMA weights on the GPU, 4 bytes per parameter (we keep them on the CPU: 0);
- the frozen VAE and text encoder, unless latents and text embeddings were cached first;
- activations, proportional to batch size and latent area, far smaller with gradient checkpointing.

The activation figures are live-tensor counts for SD 1.5's UNet (``benchmarks/bench_memory.py
--count``: FakeTensorMode + MemTracker, fp32, so no memory is used), halved for fp16/bf16 autocast;
everything else is counted from the model. It is an estimate: the CUDA allocator's fragmentation
and cuDNN's workspaces add to it on a GPU (on a CPU, the same benchmark measures 0.32 GiB more
per image of batch, close to the count's 0.29).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30

# Peak fp32 activations (and temporaries) of one forward + backward of SD 1.5's UNet (block width 320)
# per image at 64x64 latents (512x512 px), counted at batch 4 by benchmarks/bench_memory.py --count.
ACTIVATION_GIB_PER_IMAGE = {"checkpointing": 0.29, "no_checkpointing": 1.77}
REFERENCE_LATENT_AREA = 64 * 64
REFERENCE_WIDTH = 320

# The published architecture of stable-diffusion-v1-5's unet/config.json, so that estimates (and the
# benchmarks) need no download. SD 2's UNet is the same size within 1%.
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD15_FROZEN_PARAMS = 83_653_863 + 123_060_480  # its VAE and CLIP ViT-L/14 text encoder, counted from their configs
# SD 2.x (2, 2-base, 2.1, 2.1-base): the same UNet blocks, a 1024-wide cross-attention with linear
# projections and more heads, and OpenCLIP ViT-H/14's text encoder (the same VAE), from their configs.
SD2_UNET_CONFIG = dict(SD15_UNET_CONFIG, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                       use_linear_projection=True)
SD2_FROZEN_PARAMS = 83_653_863 + 340_387_840


def unet_shape(sd2: bool = False):
    """SD 1.5's (or SD 2's) UNet on the meta device: its parameters' shapes, no memory, no download."""
    from diffusers import UNet2DConditionModel
    import torch

    with torch.device("meta"):
        return UNet2DConditionModel(**(SD2_UNET_CONFIG if sd2 else SD15_UNET_CONFIG))


def sd15_unet_shape():
    return unet_shape(sd2=False)


@dataclass
class MemoryEstimate:
    parts: dict[str, float]  # name -> GiB
    model: str = ""          # what it was estimated for, when known
    on_cpu: bool = False     # for a run on the CPU: the same settings' figure on a GPU, not what this run uses

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def __str__(self) -> str:
        lines = [f"  {name:<42}{gib:6.2f} GiB" for name, gib in self.parts.items() if gib > 0.005]
        what = f" for {self.model}" if self.model else ""
        header = (f"Estimated peak GPU memory{what} that these settings would need on a GPU (this run is on the CPU, "
                  "which uses no GPU memory; an estimate, see sdcourse/memory.py):" if self.on_cpu else
                  f"Estimated peak GPU memory{what} (an estimate, see sdcourse/memory.py):")
        return "\n".join([header, *lines,
                          f"  {'total':<42}{self.total:6.2f} GiB"])


@functools.lru_cache(maxsize=8)
def model_shapes(model: str, lora_rank: int = 0, lora_conv: bool = False) -> tuple[object, int, str]:
    """(UNet on the meta device, VAE + text encoder parameter count, what it is) for a model.

    A local folder is read from its configs; a preset or hub id of SD 1.x or 2.x takes the published
    architecture; anything else is estimated as SD 1.5, and says so. ``lora_rank`` > 0 adds LoRA layers
    (with ``lora_conv``, LoCon's on the convolutions too).
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from . import lora, models

    preset = models.SD_PRESETS.get(model) or next((p for p in models.SD_PRESETS.values() if p.model_id == model), None)
    with torch.device("meta"):
        if Path(model, "unet", "config.json").exists():
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model, subfolder="unet"))
            frozen = sum(p.numel() for part in (
                AutoencoderKL.from_config(AutoencoderKL.load_config(model, subfolder="vae")),
                CLIPTextModel(CLIPTextConfig.from_pretrained(model, subfolder="text_encoder"))) for p in part.parameters())
            what = f"the model in {model}"
        elif preset is not None and "stable-diffusion-2" in preset.model_id:
            unet, frozen, what = UNet2DConditionModel(**SD2_UNET_CONFIG), SD2_FROZEN_PARAMS, f"SD 2 ({preset.model_id})"
        else:
            unet, frozen = UNet2DConditionModel(**SD15_UNET_CONFIG), SD15_FROZEN_PARAMS
            what = "SD 1.5" if preset is not None else f"SD 1.5's size ({model} is not a known architecture)"
    if lora_rank:
        lora.add_lora(unet, lora_rank, conv=lora_conv)
        what += f", {'LoCon' if lora_conv else 'LoRA'} rank {lora_rank}"
    return unet, frozen, what


def estimate_for_config(cfg, unet=None, half_precision: bool | None = None) -> MemoryEstimate:
    """The estimate for a ``TrainConfig`` on a GPU: for ``cfg.model`` (see ``model_shapes``) unless ``unet``
    is given, in half precision unless ``cfg.mixed_precision`` is "fp32"."""
    fused = cfg.fused_step and cfg.grad_accum == 1
    if unet is None:
        unet, frozen, what = model_shapes(cfg.model, cfg.lora_rank, cfg.lora_conv)
    else:
        frozen, what = SD15_FROZEN_PARAMS, ""
    half = cfg.mixed_precision != "fp32" if half_precision is None else half_precision
    estimate = estimate_peak(unet, frozen, batch_size=cfg.batch_size, width=cfg.width, height=cfg.height,
                             half_precision=half, optimizer=cfg.optimizer, fused_step=fused,
                             gradient_checkpointing=cfg.gradient_checkpointing, cache_latents=cfg.cache_latents)
    estimate.model = what
    return estimate


def estimate_peak(unet, frozen_params: int, *, batch_size: int, width: int, height: int, half_precision: bool,
                  optimizer: str, fused_step: bool, gradient_checkpointing: bool, cache_latents: bool,
                  autocast_cache: bool = False, ema_on_gpu: bool = False) -> MemoryEstimate:
    """Peak GPU memory of a training step for these settings; ``frozen_params``: VAE + text encoder."""
    params = list(unet.parameters())
    n = sum(p.numel() for p in params)
    trained = [p for p in params if p.requires_grad]  # all of them, or only LoRA layers
    n_trained = sum(p.numel() for p in trained)
    largest = max(p.numel() for p in trained)
    per_image = ACTIVATION_GIB_PER_IMAGE["checkpointing" if gradient_checkpointing else "no_checkpointing"]
    scale = (width // 8) * (height // 8) / REFERENCE_LATENT_AREA * unet.config.block_out_channels[0] / REFERENCE_WIDTH
    half = 2 if half_precision else 4  # bytes per value of the frozen models and of activations
    parts = {
        "UNet weights (fp32 master copy)": 4 * n / GIB,
        "autocast's cached half-precision weights": 2 * n / GIB if half_precision and autocast_cache else 0.0,
        "gradients": 4 * (largest if fused_step else n_trained) / GIB,
        "optimizer states": (2 if optimizer == "adamw8bit" else 8) * n_trained / GIB,
        "EMA weights": 4 * n_trained / GIB if ema_on_gpu else 0.0,
        "VAE + text encoder": 0.0 if cache_latents else half * frozen_params / GIB,
        "activations": per_image * scale * batch_size * half / 4,
    }
    return MemoryEstimate(parts)


def explain_oom(cfg, estimate: MemoryEstimate) -> str:
    """What to do when a run (``cfg``, a ``TrainConfig``) ran out of GPU memory after all."""
    return (f"Out of GPU memory (estimated peak {estimate.total:.1f} GiB for batch_size={cfg.batch_size}, "
            f"{cfg.width}x{cfg.height}). Settings that use less, in order of effect: batch_size=1 with "
            f"grad_accum={cfg.batch_size} (same effective batch), gradient_checkpointing=True, "
            "optimizer='adamw8bit', fused_step=True, cache_latents=True, a smaller width/height. "
            "Restart the runtime first to release the memory; training resumes from the last checkpoint.")
