"""The course's time and size figures in one place, each labelled: measured (where, on what) or estimated (from what).

Notebooks and the README quote these instead of writing numbers of their own, so a sentence and the
figure it cites cannot drift apart. The course itself measured nothing on a T4: its training speed
there is an assumption, its sampling speed the diffusers team's measurement.

    costs.FIGURES["blip_base_parameters"]       # Figure(value, unit, kind, basis); str() reads as a sentence
    costs.t4_training_time(steps=1000, batch_size=4)
    costs.merge_ram(["outputs/base", "outputs/finetune/final"])
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

KINDS = ("measured", "estimated")


@dataclass(frozen=True)
class Figure:
    value: float
    unit: str
    kind: str   # "measured" or "estimated"
    basis: str  # measured: where and on what; estimated: from what

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    def __str__(self) -> str:
        value = f"{self.value:,.0f}" if abs(self.value) >= 100 else f"{self.value:.3g}"
        return f"{value} {self.unit} ({self.kind}: {self.basis})"


FIGURES = {
    "t4_sustained_tflops": Figure(6.0, "TFLOP/s", "estimated",
                                  "an assumption for training: about a tenth of the T4's 65 TFLOP/s fp16 peak"),
    "t4_sampling_steps_per_s": Figure(6.9, "UNet steps/s", "measured",
                                      "by the diffusers team, SD 1.5 fp16 at 512 px, batch 1, PyTorch 2, on a T4 "
                                      "(diffusers docs, 'Accelerated PyTorch 2.0 support')"),
    # Distinct parameters, as model.parameters() counts them, of transformers' BlipForConditionalGeneration
    # built on the meta device from each architecture (tests/test_costs.py counts them again). The output
    # layer shares the 23.4 M word embeddings; pages that count it twice say 247 M and 470 M.
    "blip_base_parameters": Figure(224.0, "M parameters", "measured",
                                   "counted on blip-image-captioning-base's architecture (ViT-B/16 + BERT-base decoder)"),
    "blip_large_parameters": Figure(446.3, "M parameters", "measured",
                                    "counted on blip-image-captioning-large's architecture (ViT-L/16 + BERT-base decoder)"),
    "t4_blip_images_per_s": Figure(15.0, "images/s", "estimated",
                                   "BLIP base in fp16, batched: the middle of the 10-30 images/s the README gives, "
                                   "from its parameter count; benchmarks/bench_data.py measures it on a GPU"),
    "colab_ram": Figure(12.7, "GB", "measured", "system RAM of Colab's free runtime, as publicly reported"),
}


@lru_cache(maxsize=None)  # builds a meta UNet: a second or two, and announcements ask often
def unet_training_tflop(width: int = 512, height: int = 512) -> float:
    """TFLOP of one training image through SD 1.5's UNet: forward, forward again (checkpointing), backward (2x)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .memory import sd15_unet_shape

    unet = sd15_unet_shape()  # on the meta device: shapes only, no memory, counted exactly
    with FlopCounterMode(display=False) as flops:
        unet(torch.zeros(1, 4, height // 8, width // 8, device="meta"), torch.zeros(1, device="meta"),
             torch.zeros(1, 77, 768, device="meta"))
    return 4 * flops.get_total_flops() / 1e12


def t4_training_images_per_s(width: int = 512, height: int = 512) -> Figure:
    rate = FIGURES["t4_sustained_tflops"].value / unet_training_tflop(width, height)
    return Figure(rate, "images/s", "estimated",
                  f"SD 1.5 UNet FLOPs counted at {width}x{height} px, at the assumed "
                  f"{FIGURES['t4_sustained_tflops'].value:g} TFLOP/s of a T4")


def t4_training_time(steps: int, batch_size: int, width: int = 512, height: int = 512) -> Figure:
    """Minutes for ``steps`` steps of ``batch_size`` images on a T4; LoRA and DreamBooth cost about the same
    per step, since the backward pass still runs through the whole UNet."""
    rate = t4_training_images_per_s(width, height)
    return Figure(steps * batch_size / rate.value / 60, "min", "estimated",
                  f"{steps:,} steps x {batch_size} images at {rate.value:.2f} images/s ({rate.basis})")


def t4_sampling_time(images: int, steps: int) -> Figure:
    """Minutes to generate ``images`` SD 1.5 pictures at 512 px with ``steps`` steps each on a T4."""
    rate = FIGURES["t4_sampling_steps_per_s"]
    return Figure(images * steps / rate.value / 60, "min", "estimated",
                  f"{images:,} images x {steps} steps at the {rate.value:g} steps/s {rate.kind} {rate.basis}")


def t4_captioning_time(images: int) -> Figure:
    """Minutes to caption ``images`` pictures with BLIP base on a T4."""
    rate = FIGURES["t4_blip_images_per_s"]
    return Figure(images / rate.value / 60, "min", "estimated", f"{images:,} images at {rate.value:g} {rate.unit} ({rate.basis})")


def announce(what: str, minutes_on_t4: Figure, smoke: bool = False) -> None:
    """Say what a long cell will cost before it starts, with where the figure comes from."""
    minutes = minutes_on_t4.value
    took = f"about {minutes:.0f} min" if minutes >= 1.5 else f"about {minutes * 60:.0f} s"
    print(f"{what}: {took} on a free T4 ({minutes_on_t4.kind}: {minutes_on_t4.basis})"
          + ("; in smoke mode seconds on a CPU" if smoke else "") + ".")


def merge_ram(pipeline_dirs: list[str | Path], components: tuple[str, ...] = ("unet", "text_encoder", "vae")) -> Figure:
    """CPU RAM that ``export.merge_pipelines`` holds at its peak: every input of the largest component plus the result.

    From the safetensors file sizes (the result has the first model's dtype); Python and the notebook's
    own models come on top.
    """
    from .export import COMPONENT_WEIGHTS

    per_component = {}
    for component in components:
        sizes = [(Path(d) / component / COMPONENT_WEIGHTS[component]).stat().st_size for d in pipeline_dirs]
        per_component[component] = sum(sizes) + sizes[0]
    largest = max(per_component, key=per_component.get)
    return Figure(per_component[largest] / 1e9, "GB", "estimated",
                  f"the {largest}'s safetensors files of {len(pipeline_dirs)} models plus the merged copy, "
                  f"read from disk; of the ~{FIGURES['colab_ram'].value:g} GB Colab gives")
