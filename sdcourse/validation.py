"""What a run shows while it trains: a validation loss that measures learning, and validation images.

The training loss is dominated by which timesteps a step happens to draw, so it looks flat and noisy
for a whole fine-tune. The validation loss (``train.validation_loss``) takes the same few images at
the same timesteps with the same noise every time (``ValidationSet``): what is left changes only
with the weights. The images are held out of training when the dataset can spare them, so the loss
can also show over-fitting. ``ValidationImages`` draws fixed prompts and seeds with the training
UNet, from the base model at step 0 on, for the eye.
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import sampling, visualization
from .latent_cache import cache_view, encode_pixels, encode_texts
from .models import Models
from .training_set import CaptionedImages

VAL_TIMESTEPS = 5  # per image, spread evenly over the schedule


@dataclass
class ValidationSet:
    """The images of the validation loss, each with fixed noise for each of the fixed timesteps."""
    indices: list[int]
    latents: list[torch.Tensor]     # [4, h, w] each (sizes may differ with buckets), fp32 on the CPU
    embeddings: list[torch.Tensor]  # [77, d] each
    noise: list[torch.Tensor]       # [VAL_TIMESTEPS, 4, h, w] each
    timesteps: torch.Tensor         # [VAL_TIMESTEPS]
    held_out: bool                  # False: a fixed part of the training images (a dataset too small to spare any)


def validation_candidates(dataset: CaptionedImages) -> list[int]:
    """Rows that may serve the validation loss: readable so far, and not a file listed on several rows
    (those are weighted on purpose, like DreamBooth's subject photos, and never held out)."""
    rows = collections.Counter(dataset.files)
    return [i for i, s in enumerate(dataset.sizes) if s is not None and rows[dataset.files[i]] == 1]


def validation_indices(candidates: list[int], count: int, seed: int) -> tuple[list[int], bool]:
    """Which images the validation loss uses, and whether they are held out of training.

    Held out only from at least 5x ``count`` images; a smaller dataset keeps them in training, and the
    loss then shows learning but cannot show over-fitting.
    """
    picked = sorted(random.Random(f"{seed}/validation").sample(sorted(candidates), min(count, len(candidates))))
    return picked, len(candidates) >= 5 * count


def build_validation_set(dataset: CaptionedImages, m: Models, indices: list[int], held_out: bool, seed: int,
                         report) -> ValidationSet | None:
    """Encode the validation images once (centre crops at the training size, unflipped) and fix their noise."""
    view = cache_view(dataset, 0.0)
    total = m.noise_scheduler.config.num_train_timesteps
    timesteps = torch.tensor([(2 * k + 1) * total // (2 * VAL_TIMESTEPS) for k in range(VAL_TIMESTEPS)])
    vset = ValidationSet([], [], [], [], timesteps, held_out)
    for i in indices:
        item = view[i]
        if "error" in item:
            report(i, item["error"])
            continue
        latent = encode_pixels(m.vae, item["pixels"][None])[0].float().cpu()
        generator = torch.Generator().manual_seed(random.Random(f"{seed}/validation/{i}").getrandbits(63))
        vset.indices.append(i)
        vset.latents.append(latent)
        vset.embeddings.append(encode_texts(m.tokenizer, m.text_encoder, [item["text"]])[0].float().cpu())
        vset.noise.append(torch.randn((VAL_TIMESTEPS, *latent.shape), generator=generator))
    return vset if vset.indices else None


def validation_set(dataset: CaptionedImages, m: Models, cfg, report) -> ValidationSet | None:
    """The validation loss's images for a run (``cfg``, a ``TrainConfig``), encoded while the VAE and text
    encoder are on the GPU; None when the validation loss is off."""
    if not (cfg.val_loss_every and cfg.val_loss_images):
        return None
    picked, held_out = validation_indices(validation_candidates(dataset), cfg.val_loss_images, cfg.seed)
    return build_validation_set(dataset, m, picked, held_out, cfg.seed, report)


def validation_grid(pipe, cfg, step: int, frozen: list[torch.nn.Module], device, autocast):
    """Images for the fixed prompts and seeds of ``cfg`` (a ``TrainConfig``) from the UNet as it is now
    (frozen parts visit the GPU)."""
    for module in frozen:
        module.to(device)
    pipe.unet.eval()
    with autocast:
        images = sampling.generate(pipe, cfg.validation_prompts, cfg.validation_seeds, steps=cfg.validation_steps,
                                   guidance_scale=cfg.guidance_scale, height=cfg.height, width=cfg.width)
    pipe.unet.train()
    if cfg.cache_latents:  # they only came for this
        for module in frozen:
            module.to("cpu")
    label = "base model (step 0)" if step == 0 else f"step {step}"
    return visualization.image_grid(images, rows=len(cfg.validation_prompts), cols=len(cfg.validation_seeds),
                                    row_labels=cfg.validation_prompts,
                                    col_labels=[f"seed {s}" for s in cfg.validation_seeds], title=label)


class ValidationImages:
    """The validation prompts drawn by the UNet as it trains, saved as ``folder/step-000500.png`` and shown
    in a notebook. The pipeline is the training UNet with the frozen parts: nothing is loaded twice.
    With ``on=False`` (the other processes, or ``validate_every=0``) ``show`` draws nothing."""

    def __init__(self, model_id: str, m: Models, unet, cfg, folder: Path, device, autocast, on: bool):
        self.cfg, self.folder, self.device, self.autocast = cfg, folder, device, autocast
        self.frozen = [m.vae, m.text_encoder]
        self.pipe = None
        if on:
            from diffusers import StableDiffusionPipeline

            self.pipe = StableDiffusionPipeline.from_pretrained(
                model_id, unet=unet, vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            self.pipe.scheduler.register_to_config(prediction_type=m.noise_scheduler.config.prediction_type)
            sampling.set_scheduler(self.pipe, cfg.validation_scheduler)
            self.pipe.set_progress_bar_config(disable=True)

    def show(self, step: int) -> None:
        if self.pipe is None:
            return
        grid = validation_grid(self.pipe, self.cfg, step, self.frozen, self.device, self.autocast)
        path = self.folder / f"step-{step:06d}.png"
        grid.save(path)
        if visualization.in_notebook():
            from IPython.display import display
            display(grid)
        else:
            tqdm.write(f"Validation images: {path}")
