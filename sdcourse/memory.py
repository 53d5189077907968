"""How much GPU memory a fine-tuning run will need, worked out before it starts.

Peak memory of UNet training is a sum of parts that depend on the settings in plain ways:

- weights: fp32 master weights, 4 bytes per parameter, always;
- half-precision weight copies: autocast casts each weight to fp16/bf16 once and keeps the copy
  until the forward/backward region ends (2 bytes per parameter);
- gradients: 4 bytes per parameter, unless the optimizer step is fused into the backward pass
  (then a parameter's gradient is freed as soon as it is used: only the largest one exists at once);
- optimizer states: AdamW keeps two moments, 8 bytes per parameter; 8-bit AdamW 2 bytes;
- EMA weights on the GPU, 4 bytes per parameter (we keep them on the CPU: 0);
- the frozen VAE and text encoder, unless latents and text embeddings were cached first;
- activations, proportional to batch size and latent area, far smaller with gradient checkpointing.

The activation figures are measured (``benchmarks/bench_memory.py``, real SD 1.5 UNet, fp32 on a
CPU) and halved for fp16/bf16 autocast; everything else is counted from the model. The result is an
estimate: the CUDA allocator's fragmentation and cuDNN workspaces add a few hundred MiB on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30

# fp32 activation memory of one training step of SD 1.5's UNet (block width 320) per image at 64x64
# latents (512x512 px): measured peak minus weights/gradients/optimizer states in benchmarks/bench_memory.py.
ACTIVATION_GIB_PER_IMAGE = {"checkpointing": 0.75, "no_checkpointing": 6.0}
REFERENCE_LATENT_AREA = 64 * 64
REFERENCE_WIDTH = 320


@dataclass
class MemoryEstimate:
    parts: dict[str, float]  # name -> GiB

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def __str__(self) -> str:
        lines = [f"  {name:<34}{gib:6.2f} GiB" for name, gib in self.parts.items() if gib > 0.005]
        return "\n".join(["Estimated peak GPU memory (an estimate, see sdcourse/memory.py):", *lines,
                          f"  {'total':<34}{self.total:6.2f} GiB"])


def estimate_peak(unet, frozen_params: int, *, batch_size: int, width: int, height: int, half_precision: bool,
                  optimizer: str, fused_step: bool, gradient_checkpointing: bool, cache_latents: bool,
                  ema_on_gpu: bool = False) -> MemoryEstimate:
    """Peak GPU memory of a training step for these settings; ``frozen_params``: VAE + text encoder."""
    params = list(unet.parameters())
    n = sum(p.numel() for p in params)
    largest = max(p.numel() for p in params)
    per_image = ACTIVATION_GIB_PER_IMAGE["checkpointing" if gradient_checkpointing else "no_checkpointing"]
    scale = (width // 8) * (height // 8) / REFERENCE_LATENT_AREA * unet.config.block_out_channels[0] / REFERENCE_WIDTH
    half = 2 if half_precision else 4  # bytes per value of the frozen models and of activations
    parts = {
        "UNet weights (fp32 master copy)": 4 * n / GIB,
        "half-precision weight copies": 2 * n / GIB if half_precision else 0.0,
        "gradients": 4 * (largest if fused_step else n) / GIB,
        "optimizer states": (2 if optimizer == "adamw8bit" else 8) * n / GIB,
        "EMA weights": 4 * n / GIB if ema_on_gpu else 0.0,
        "VAE + text encoder": 0.0 if cache_latents else half * frozen_params / GIB,
        "activations": per_image * scale * batch_size * half / 4,
    }
    return MemoryEstimate(parts)
