"""Fine-tune the UNet of Stable Diffusion on a folder of captioned images. One loop, top to bottom.

    python -m sdcourse.train --config run.json            # one GPU (or the CPU, slowly)
    accelerate launch -m sdcourse.train --config run.json # several GPUs
    python -m sdcourse.train --write-config run.json      # the defaults, to edit

The training step: pixels -> VAE latents (x the VAE's scaling factor) -> noise added at a random
timestep -> the caption through the text encoder -> the UNet predicts the noise (epsilon models,
SD 1.x) or the velocity (v-prediction, SD 2.x) -> MSE against it. Only the UNet learns.

What makes it fit a 16 GB T4 (see ``sdcourse/memory.py`` for the arithmetic):
latents and text embeddings are computed once and cached, then the VAE and text encoder leave the
GPU; fp32 master weights with fp16 autocast and loss scaling (bf16 from compute capability 8.0); gradient
checkpointing; 8-bit AdamW; and the optimizer step applied inside the backward pass, one parameter
at a time, so a full set of gradients never exists (``FusedAdamW``).

What makes it never lose a run: checkpoints written to a temporary folder and renamed, the last K
kept, the free space checked before each (a full disk stops the run with a message, never with half
a checkpoint left behind); resuming restores weights, optimizer, loss scale, schedule position, RNG and data position,
so a resumed run ends with the same weights as an uninterrupted one; a NaN loss stops the run with
the last good checkpoint intact; unreadable images are reported and skipped.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import errno
import importlib.util as importlib_util
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import lora, memory, models
from .runtime import atomic_dir

PRECISIONS = ("auto", "fp16", "bf16", "fp32")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class TrainConfig:
    """Every setting of a run. Defaults are the source talk's: 30 epochs, batch 4, lr 5e-6, cosine, 6% warmup."""

    model: str = "sd15"                  # preset (sd15, sd2, ...), hub id, or local pipeline folder
    dataset: str = "outputs/dataset"     # folder with images and metadata.csv (file_name,text)
    output_dir: str = "outputs/finetune" # checkpoints/, samples/, final/ go here
    width: int = 512
    height: int = 512
    crop: str = "random"                 # "random" or "center"
    flip: bool = False                   # random horizontal flip
    crop_margin: float = 0.125           # with the latent cache and crop="random": cache this much more than the size, crop per epoch
    buckets: bool = False                # aspect-ratio buckets (NovelAI): no cropping away of wide or tall images
    epochs: int = 30
    max_steps: int | None = None         # stop after this many optimizer steps (overrides epochs)
    batch_size: int = 4
    grad_accum: int = 1                  # micro-batches per optimizer step
    lr: float = 5e-6
    lr_schedule: str = "cosine"          # "cosine", "linear" or "constant", after linear warmup
    warmup_ratio: float = 0.06
    prediction_type: str | None = None   # None: the model's own ("epsilon" or "v_prediction")
    min_snr_gamma: float | None = None   # e.g. 5.0: min-SNR loss weighting (Hang et al. 2023)
    noise_offset: float = 0.0            # e.g. 0.05: helps very dark/bright images
    ema_decay: float | None = None       # e.g. 0.9999: keep an EMA of the weights (on the CPU)
    ema_every: int = 10                  # EMA update interval in steps (copying 3.4 GB to the CPU costs time)
    optimizer: str = "adamw8bit"         # "adamw8bit" (bitsandbytes) or "adamw"
    fused_step: bool = True              # optimizer step inside backward (needs grad_accum == 1, one GPU)
    gradient_checkpointing: bool = True
    lora_rank: int = 0                   # > 0: train LoRA layers of this rank, the UNet frozen (sdcourse/lora.py)
    mixed_precision: str = "auto"        # auto: fp16 below compute capability 8.0 (T4), bf16 from 8.0, fp32 on CPU
    xformers: bool = False               # use xformers attention when it imports and a GPU exists; else PyTorch SDPA
    cache_latents: bool = True           # encode every image and caption once, then free the VAE and text encoder
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = True                  # continue from the newest checkpoint in output_dir if there is one
    # Resumable checkpoints on a fast disk that does not last (Colab's /content) instead of output_dir;
    # output_dir/checkpoints (on Drive) then holds only a copy of the newest, made every copy_every steps.
    local_checkpoints: str | None = None
    copy_every: int = 2000
    # Fractions of the run at which a small fp16 copy of the UNet goes to output_dir/snapshots, apart
    # from the resumable checkpoints, for notebook 04's "over training" comparison (full fine-tunes).
    snapshots: list[float] = field(default_factory=lambda: [0.1, 0.5])
    validate_every: int = 500            # sample the validation prompts every N steps (0: never)
    validation_prompts: list[str] = field(default_factory=lambda: ["a girl in a maid outfit holding a teapot"])
    validation_seeds: list[int] = field(default_factory=lambda: [0, 1])
    validation_steps: int = 30
    val_loss_every: int = 50             # validation loss (fixed images, timesteps and noise) every N steps (0: never)
    val_loss_images: int = 4             # images for it, held out of training (from a dataset of at least 5x as many)
    guidance_scale: float = 7.5
    num_workers: int = 2

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        values = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown setting(s) {unknown}. Known settings: {sorted(known)}")
        return cls(**values)

    def check(self) -> None:
        """Raise a clear error for a setting that cannot work, before anything is loaded."""
        choices = {"crop": ("random", "center"), "lr_schedule": ("cosine", "linear", "constant"),
                   "optimizer": ("adamw8bit", "adamw"), "mixed_precision": PRECISIONS,
                   "prediction_type": (None, "epsilon", "v_prediction")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} = {getattr(self, name)!r}; choose one of {allowed}")
        if self.width % 8 or self.height % 8:
            raise ValueError(f"width and height must be multiples of 8 (the VAE downsamples 8x); got {self.width}x{self.height}")
        if self.lora_rank < 0:
            raise ValueError(f"TrainConfig.lora_rank must be 0 (full fine-tune) or a rank such as 8, got {self.lora_rank}")
        if any(not 0 < f < 1 for f in self.snapshots):
            raise ValueError(f"TrainConfig.snapshots are fractions of the run between 0 and 1, got {self.snapshots}")
        for name in ("batch_size", "grad_accum", "epochs", "checkpoint_every", "keep_checkpoints", "ema_every",
                     "copy_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("val_loss_every", "val_loss_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be 0 (off) or more, got {getattr(self, name)}")
        if not 0 <= self.crop_margin <= 1:
            raise ValueError(f"TrainConfig.crop_margin is a share of the size between 0 and 1 (0.125: 64 px at 512), "
                             f"got {self.crop_margin}")


# ----------------------------------------------------------------------------------------------
# Data: metadata.csv + images -> cropped, resized pixel tensors

def bucket_sizes(width: int, height: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """NovelAI-style buckets: sizes with about the area of width x height, aspect ratios up to 2:1.

    Sides are multiples of 1/8 of the shorter side, rounded to the VAE's 8 px (64 px at 512x512).
    """
    step = max(8, min(width, height) // 64 * 8)
    area, sizes = width * height, set()
    for w in range(step, int(math.sqrt(area * max_ratio)) + 1, step):
        h = area // w // step * step
        if max(w / h, h / w) <= max_ratio:
            sizes |= {(w, h), (h, w)}
    return sorted(sizes)


class CaptionedImages(torch.utils.data.Dataset):
    """Images and captions from ``metadata.csv`` (columns ``file_name,text``), ready for the VAE.

    Item ``i`` is ``{"index", "text", "pixels" (3, H, W) in [-1, 1]}``, or ``"error"`` instead of
    pixels when the image cannot be read: the training loop reports and skips it. Crops and flips
    are drawn from (seed, epoch, index), so they are the same after a resume. ``captions=False``
    (Textual Inversion, which writes its own) also reads a plain folder of images, captioned "".
    """

    def __init__(self, folder: str | Path, width: int, height: int, crop: str = "random", flip: bool = False,
                 buckets: bool = False, seed: int = 0, captions: bool = True):
        import pandas as pd

        self.folder, self.crop, self.flip, self.seed, self.epoch = Path(folder), crop, flip, seed, 0
        csv = self.folder / "metadata.csv"
        if not captions and not csv.exists():
            self.files = sorted(p.name for p in self.folder.iterdir()
                                if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            self.texts = [""] * len(self.files)
        else:
            if not csv.exists():
                raise FileNotFoundError(f"{csv} does not exist. A dataset folder holds the images and a metadata.csv "
                                        "with columns file_name,text (notebooks 01 and 02 write one).")
            table = pd.read_csv(csv, dtype=str, keep_default_na=False)
            missing = {"file_name", "text"} - set(table.columns)
            if missing:
                raise ValueError(f"{csv} has no column {sorted(missing)}; it needs file_name,text "
                                 f"(it has {list(table.columns)}).")
            blank = [i + 2 for i, name in enumerate(table.file_name) if not name.strip()]  # +2: header, 1-based
            if blank:
                raise ValueError(f"{csv}: empty file_name on line(s) {blank}. Fix or delete those lines.")
            self.files, self.texts = list(table.file_name), list(table.text)
        self.unreadable: dict[int, str] = {}
        if buckets:
            choices = bucket_sizes(width, height)
            self.sizes = [self._bucket(i, choices) for i in range(len(self.files))]
        else:
            self.sizes = [(width, height)] * len(self.files)

    def _bucket(self, i: int, choices: list[tuple[int, int]]) -> tuple[int, int] | None:
        try:
            with Image.open(self.folder / self.files[i]) as img:  # reads the header only
                w, h = img.size
        except Exception as e:  # any failure of one image, as in __getitem__
            self.unreadable[i] = f"{type(e).__name__}: {e}"
            return None
        return min(choices, key=lambda s: abs(math.log(s[0] / s[1]) - math.log(w / h)))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        item = {"index": i, "text": self.texts[i]}
        try:
            with Image.open(self.folder / self.files[i]) as img:
                item["pixels"] = self._transform(img.convert("RGB"), self.sizes[i], random.Random(f"{self.seed}/{self.epoch}/{i}"))
        # Whatever one image raises (missing, truncated, not an image, no permission, a decoder's ValueError,
        # PIL's DecompressionBombError, which is no OSError) is that image's problem: report it, skip it.
        except Exception as e:
            item["error"] = f"{type(e).__name__}: {e}"
        return item

    def _transform(self, img: Image.Image, size: tuple[int, int], rng: random.Random) -> torch.Tensor:
        w, h = size
        scale = max(w / img.width, h / img.height)  # cover the target, then crop the overhang
        img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.BICUBIC)
        dx, dy = img.width - w, img.height - h
        left, top = (rng.randint(0, dx), rng.randint(0, dy)) if self.crop == "random" else (dx // 2, dy // 2)
        img = img.crop((left, top, left + w, top + h))
        if self.flip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
        return pixels.permute(2, 0, 1)


def collate(items: list[dict]) -> dict:
    good = [it for it in items if "pixels" in it]
    return {"indices": [it["index"] for it in good], "texts": [it["text"] for it in good],
            "pixels": torch.stack([it["pixels"] for it in good]) if good else None,
            "errors": {it["index"]: it["error"] for it in items if "error" in it}}


def epoch_batches(sizes: dict[int, tuple[int, int]], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's batches of dataset indices: shuffled, every batch from one size (bucket)."""
    rng = random.Random(f"{seed}/{epoch}")
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, size in sorted(sizes.items()):
        by_size.setdefault(size, []).append(i)
    batches = []
    for indices in by_size.values():
        rng.shuffle(indices)
        batches += [indices[k:k + batch_size] for k in range(0, len(indices), batch_size)]
    rng.shuffle(batches)
    return batches


# ----------------------------------------------------------------------------------------------
# Models, encoding, caching

@dataclass
class Models:
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
        raise models.explain_load_error(model_id, e) from e
    if prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=prediction_type)
    text_encoder.requires_grad_(False).eval()
    vae.requires_grad_(False).eval()
    return Models(tokenizer, text_encoder, vae, unet, noise_scheduler)


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    # The posterior's mean: SD's VAE has a tiny variance, and the mean needs no RNG to resume.
    pixels = pixels.to(vae.device, vae.dtype)
    return vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor


@torch.no_grad()
def encode_texts(tokenizer, text_encoder, texts: list[str]) -> torch.Tensor:
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


@dataclass
class LatentCache:
    """Every image's latents and every distinct caption's embedding, in fp16 on the CPU.

    For random crops the latents are of centre crops ``crop_margin`` larger than the training size
    (``cache_view``); each epoch draws a new crop of them in latent space, in 8 px steps
    (``cached_latents``). With flips on, the latents of the mirrored images are cached too, which is
    exact on any VAE; mirroring a latent is exact only as far as the VAE is symmetric, and on the
    tiny VAE it is no better than not mirroring (``benchmarks/bench_cache.py`` measures it).
    15,000 images at 512 px take 0.49 GB of latents at the exact size (0.62 GB with the default
    margin, twice that with flips) plus 118 KB per caption.
    """
    latents: dict[int, torch.Tensor]
    embeddings: dict[str, torch.Tensor]
    flipped: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        tensors = [*self.latents.values(), *self.flipped.values(), *self.embeddings.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def cache_size(size: tuple[int, int], margin: float) -> tuple[int, int]:
    """The size an image is cached at: ``margin`` (a share) larger than ``size``, rounded up to the VAE's 8 px."""
    return tuple(s + 8 * math.ceil(s * margin / 8) for s in size)


def cache_view(dataset: CaptionedImages, margin: float) -> CaptionedImages:
    """The dataset as the cache encodes it: centre crops ``margin`` larger than the training size, unflipped."""
    view = copy.copy(dataset)
    view.crop, view.flip = "center", False
    view.sizes = [None if s is None else cache_size(s, margin) for s in dataset.sizes]
    return view


def cached_latents(cache: LatentCache, sizes: dict[int, tuple[int, int]], indices: list[int], seed: int,
                   epoch: int, crop: str) -> torch.Tensor:
    """A batch from the cache: each latent cropped to its training size, flipped or not, drawn anew every
    epoch from (seed, epoch, index) as the pixel path draws its crops."""
    batch = []
    for i in indices:
        rng = random.Random(f"{seed}/{epoch}/{i}")
        full = cache.latents[i]
        h, w = sizes[i][1] // 8, sizes[i][0] // 8
        dy, dx = full.shape[1] - h, full.shape[2] - w
        top, left = (rng.randint(0, dy), rng.randint(0, dx)) if crop == "random" else (dy // 2, dx // 2)
        source = cache.flipped[i] if i in cache.flipped and rng.random() < 0.5 else full
        batch.append(source[:, top:top + h, left:left + w])
    return torch.stack(batch)


def build_cache(dataset: CaptionedImages, m: Models, batch_size: int, num_workers: int, report,
                flip: bool = False) -> LatentCache:
    cache = LatentCache({}, {})
    sizes = {i: s for i, s in enumerate(dataset.sizes) if s is not None}
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=epoch_batches(sizes, batch_size, 0, 0),
                                         collate_fn=collate, num_workers=num_workers)
    for batch in loader:
        for i, error in batch["errors"].items():
            report(i, error)
        if batch["pixels"] is None:
            continue
        for i, latent, pixels in zip(batch["indices"], encode_pixels(m.vae, batch["pixels"]), batch["pixels"]):
            latent = finite_latent(m.vae, pixels, latent)
            if latent is None:
                report(i, "its latent is not finite (inf/NaN) even with the VAE in fp32")
                continue
            cache.latents[i] = latent
        if flip:
            for i, latent, pixels in zip(batch["indices"], encode_pixels(m.vae, batch["pixels"].flip(-1)),
                                         batch["pixels"].flip(-1)):
                latent = finite_latent(m.vae, pixels, latent) if i in cache.latents else None
                if latent is not None:
                    cache.flipped[i] = latent
        new = sorted({t for t in batch["texts"] if t not in cache.embeddings})
        if new:
            for text, emb in zip(new, encode_texts(m.tokenizer, m.text_encoder, new)):
                cache.embeddings[text] = emb.to("cpu", torch.float16)
    return cache


def finite_latent(vae, pixels: torch.Tensor, latent: torch.Tensor) -> torch.Tensor | None:
    """The latent as cached (fp16, CPU), checked: inf/NaN would surface later as a divergence that
    blames the learning rate, on every resume. A half-precision VAE can overflow on an image that
    fp32 encodes fine, so that image is encoded again in fp32; None if even that is not finite
    (the image is then reported and skipped like an unreadable one, not allowed to end the run)."""
    cached = latent.to("cpu", torch.float16)
    if torch.isfinite(cached).all():
        return cached
    if vae.dtype != torch.float32:
        dtype = vae.dtype
        vae.to(torch.float32)
        try:
            cached = encode_pixels(vae, pixels[None])[0].to("cpu", torch.float16)
        finally:
            vae.to(dtype)
        if torch.isfinite(cached).all():
            return cached
    return None


# ----------------------------------------------------------------------------------------------
# The loss

def noise_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon) or the velocity (v-prediction)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not supported; use 'epsilon' or 'v_prediction'")


def diffusion_loss(unet, noise_scheduler, latents, embeddings, generator: torch.Generator,
                   noise_offset: float = 0.0, min_snr_gamma: float | None = None) -> torch.Tensor:
    """Noise the latents at random timesteps, let the UNet predict, MSE against the target."""
    latents = latents.float()  # noise, add_noise and the velocity in fp32 whatever the latents arrive in
    b, c = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    if noise_offset:  # a per-channel shift lets the model learn overall brightness (Guttenberg 2023)
        noise = noise + noise_offset * torch.randn((b, c, 1, 1), generator=generator, device=latents.device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator,
                              device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise_target(noise_scheduler, latents, noise, timesteps)
    prediction = unet(noisy, timesteps, embeddings).sample
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:  # weight = min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for velocity
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps)
        weight = snr.clamp(max=min_snr_gamma)
        loss = loss * weight / (snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr)
    return loss.mean()


# The validation loss: the training loss is dominated by which timesteps a step happens to draw, so
# it looks flat and noisy for a whole fine-tune. The same few images at the same timesteps with the
# same noise remove that lottery: what is left changes only with the weights.
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


@torch.no_grad()
def validation_loss(unet, noise_scheduler, vset: ValidationSet, device, autocast=contextlib.nullcontext()) -> float:
    """Mean MSE against the target over the validation images at their fixed timesteps and noise."""
    was_training = unet.training
    unet.eval()
    timesteps, losses = vset.timesteps.to(device), []
    for latent, embedding, noise in zip(vset.latents, vset.embeddings, vset.noise):
        latents = latent.to(device).expand(len(timesteps), -1, -1, -1)
        noise = noise.to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with autocast:
            prediction = unet(noisy, timesteps, embedding.to(device).expand(len(timesteps), -1, -1)).sample
        target = noise_target(noise_scheduler, latents, noise, timesteps)
        losses.append(F.mse_loss(prediction.float(), target.float()).item())
    unet.train(was_training)
    return sum(losses) / len(losses)


def lr_factor(step: int, total_steps: int, warmup_ratio: float, schedule: str) -> float:
    """Linear warmup over the first ``warmup_ratio`` of the steps, then cosine/linear decay to 0 or constant."""
    warmup = round(total_steps * warmup_ratio)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[schedule]


# ----------------------------------------------------------------------------------------------
# Optimizer: ordinary or fused into backward; fp16 loss scaling that works one parameter at a time

class LossScaler:
    """Dynamic loss scaling for fp16 (what ``torch.amp.GradScaler`` does), usable per parameter.

    GradScaler unscales and checks all gradients of an optimizer at once; the fused step needs
    the same for one gradient at a time, inside backward. Disabled (scale 1) unless fp16.
    """

    def __init__(self, enabled: bool, scale: float = 2.0**16, growth_interval: int = 2000):
        self.enabled, self.scale, self.growth_interval, self.good_steps = enabled, scale if enabled else 1.0, growth_interval, 0

    def unscale_(self, grad: torch.Tensor) -> bool:
        """Unscale in place; False when the gradient overflowed."""
        if not self.enabled:
            return True
        grad.mul_(1.0 / self.scale)
        return bool(torch.isfinite(grad).all())  # a GPU sync per call: the price of deciding per parameter

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale, self.good_steps = self.scale / 2, 0
        else:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale, self.good_steps = self.scale * 2, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = state["scale"], state["good_steps"]


def make_adamw(params, kind: str, lr: float):
    if kind == "adamw8bit":
        import bitsandbytes as bnb  # blockwise 8-bit states: 2 bytes per parameter instead of 8
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=1e-2)
    return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)


class UNetOptimizer:
    """AdamW over the UNet's parameters, stepped after backward or fused into it.

    Fused: every parameter gets its own optimizer, stepped by a hook the moment its gradient is
    complete (``register_post_accumulate_grad_hook``); the gradient is freed right away, so peak
    memory holds one gradient instead of all of them. This needs the whole gradient in one
    backward: with gradient accumulation, or on several GPUs (their gradients are averaged after
    the hook would fire), the ordinary step runs instead. No gradient clipping: it needs the norm
    of all gradients before any step.

    fp16 overflow, by design different from the ordinary step: an inf/NaN gradient never reaches a
    weight or an optimizer state, and the loss scale halves, as with ``torch.amp.GradScaler``; but
    the parameters whose gradients completed before it in backward order have already taken their
    step, so that batch's update is partial (each parameter's Adam stays self-consistent). Skipping
    the whole step would need every gradient checked before any is applied: a second backward
    pass per step (about a third more time on every step) or all gradients kept (the memory this
    saves). Overflows come a few times while the scale calibrates and then about once per
    ``growth_interval`` (2,000) steps, when the scale doubles and overflows again: one partial
    batch in 2,000. ``partial_steps`` counts them; the run reports the number.
    """

    def __init__(self, params: list[torch.nn.Parameter], kind: str, lr: float, scaler: LossScaler, fused: bool):
        self.params, self.scaler, self.fused, self.lr, self.overflow = params, scaler, fused, lr, False
        self.reached: set[int] = set()  # ids of the parameters whose hook ran in this backward
        self.applied = 0                # of those, how many took their step
        self.partial_steps = 0          # fused fp16 steps cut short by an overflow after some parameters stepped
        if fused:
            self.optimizers = [make_adamw([p], kind, lr) for p in params]
            for p, optimizer in zip(params, self.optimizers):
                p.register_post_accumulate_grad_hook(lambda p, optimizer=optimizer: self._step_one(p, optimizer))
        else:
            self.optimizers = [make_adamw(params, kind, lr)]

    def _step_one(self, p: torch.nn.Parameter, optimizer) -> None:
        if id(p) in self.reached:
            # Reentrant checkpointing runs a backward inside the backward: a parameter's hook fires
            # for a part of its gradient, and it would step twice on parts.
            raise RuntimeError(
                "fused_step: a parameter's gradient completed twice in one backward pass, which happens under "
                "reentrant gradient checkpointing (torch.utils.checkpoint with use_reentrant=True). Use "
                "unet.enable_gradient_checkpointing() without a custom function (diffusers' default is "
                "non-reentrant), or set fused_step=False.")
        self.reached.add(id(p))
        if not self.overflow and self.scaler.unscale_(p.grad):
            optimizer.param_groups[0]["lr"] = self.lr
            optimizer.step()
            self.applied += 1
        else:
            self.overflow = True
        p.grad = None

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of the (scaled) loss; the fused step happens in here."""
        self.reached.clear()
        (loss * self.scaler.scale).backward()

    def step(self) -> None:
        """After the last micro-batch of a step: the ordinary optimizer step, and the loss-scale update."""
        if not self.fused:
            grads = [p.grad for p in self.params if p.grad is not None]
            self.overflow = not all([self.scaler.unscale_(g) for g in grads])
            optimizer = self.optimizers[0]
            if grads and not self.overflow:
                optimizer.param_groups[0]["lr"] = self.lr
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        elif self.overflow and self.applied:
            self.partial_steps += 1
        self.scaler.update(self.overflow)
        self.overflow, self.applied = False, 0

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers], "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        self.scaler.load_state_dict(state["scaler"])


def trainable(unet) -> list[torch.nn.Parameter]:
    """The parameters that train: all of the UNet's, or only its LoRA layers'."""
    return [p for p in unet.parameters() if p.requires_grad]


class CpuEMA:
    """Exponential moving average of the trained weights, kept in CPU memory (no GPU cost).

    The decay warms up as in diffusers' ``EMAModel``: at optimizer step ``s`` it is
    ``min(decay, (1 + t) / (10 + t))`` with ``t = s - 1`` (0 at the first step). Without the warmup a
    0.9999 EMA after 1,000 steps would still be 90 % the base model. ``step`` is the optimizer step
    of the last update (saved in the training state as ``last_ema``).
    """

    def __init__(self, unet, decay: float, step: int = 0):
        self.decay, self.step = decay, step
        self.weights = {name: p.detach().to("cpu", torch.float32, copy=True)
                        for name, p in unet.named_parameters() if p.requires_grad}

    def decay_at(self, step: int) -> float:
        t = step - 1
        return 0.0 if t <= 0 else min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, unet, step: int) -> None:
        """Bring the average to optimizer step ``step``, as if updated at each step since the last update
        with the weights as they are now: the old average keeps the product of those steps' decays."""
        keep = math.prod(self.decay_at(s) for s in range(self.step + 1, step + 1))
        for name, p in unet.named_parameters():
            if name in self.weights:
                self.weights[name].lerp_(p.detach().to("cpu", torch.float32), 1 - keep)
        self.step = step

    @torch.no_grad()
    def copy_to(self, unet) -> None:
        for name, p in unet.named_parameters():
            if name in self.weights:
                p.copy_(self.weights[name])


# ----------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder, then renamed (a rename is atomic); the last K kept

def checkpoint_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob("step-*") if p.is_dir())


class NotEnoughSpace(RuntimeError):
    """A checkpoint does not fit where it goes; nothing half-written is left, the message says what to do."""


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a (nested) state dict: what saving it writes, near enough."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def checkpoint_bytes(n_params: int, optimizer: str) -> int:
    """What a resumable checkpoint of a full fine-tune weighs, computed: fp32 weights (4 bytes per
    parameter) and AdamW's two moments (8-bit: 2 bytes, plus per-block scales under 1 %; else
    fp32: 8 bytes)."""
    return n_params * (4 + (2 if optimizer == "adamw8bit" else 8))


def size_text(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def space_message(what: str, folder: Path, needed: int, free: int, last_good: Path | None) -> str:
    on_drive = "/content/drive" in str(Path(folder).resolve())
    return (f"Not enough space for {what} in {folder}: it needs about {size_text(needed)}, {size_text(free)} "
            f"is free. Nothing was left half-written; the last good checkpoint is {last_good or 'none yet'}. "
            "What to do: free space there"
            + (" (files deleted on Google Drive, also through Colab, go to Drive's bin and still count for "
               "30 days: empty it, drive.google.com > Bin > Empty bin)" if on_drive else "")
            + "; keep fewer checkpoints (keep_checkpoints=1); or keep resumable checkpoints on the Colab disk "
            "and only a copy of the newest on Drive (local_checkpoints='/content/checkpoints', copy_every=2000). "
            "Then run the training again: it resumes from the last good checkpoint.")


def make_room(folder: Path, needed: int, keep: int | None, what: str) -> None:
    """Check that ``needed`` bytes fit in ``folder``; if not, delete the checkpoints this save would
    delete anyway (``keep``: keep_checkpoints; None deletes nothing), oldest first, never the newest;
    else raise ``NotEnoughSpace``."""
    free = shutil.disk_usage(folder).free
    existing = checkpoint_dirs(folder)
    for old in existing[:len(existing) - max(keep - 1, 1)] if keep else []:
        if free >= needed:
            return
        print(f"Deleting {old.name} before writing {what}: there is not room for both, and "
              f"keep_checkpoints={keep} would delete it afterwards anyway.")
        shutil.rmtree(old)
        free = shutil.disk_usage(folder).free
    if free < needed:
        raise NotEnoughSpace(space_message(what, folder, needed, free, existing[-1] if existing else None))


def disk_full(error: BaseException) -> bool:
    """A write failed for lack of space (safetensors and torch.save report it as text, not errno)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error).lower()
    return "no space left" in text or "quota exceeded" in text or "file write failed" in text


def save_checkpoint(folder: Path, step: int, unet, training_state: dict, ema: CpuEMA | None, keep: int) -> Path:
    """``folder/step-000500/`` with ``unet/`` (diffusers layout) or, for LoRA, its LoRA weights,
    ``training_state.pt`` and the EMA weights. The free space is checked first, against the size of
    the last checkpoint (or, for the first, what its tensors weigh)."""
    from safetensors.torch import save_file

    target = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    existing = [d for d in checkpoint_dirs(folder) if d != target]
    needed = (folder_bytes(existing[-1]) if existing else
              tensor_bytes([p for p in unet.parameters() if p.requires_grad]) + tensor_bytes(training_state)
              + (tensor_bytes(ema.weights) if ema is not None else 0))
    make_room(folder, int(needed * 1.02) + 2**20, keep, f"checkpoint {target.name}")
    try:
        if lora.has_lora(unet):
            lora.save_lora(unet, tmp)
        else:
            unet.save_pretrained(tmp / "unet", safe_serialization=True)
        torch.save(training_state, tmp / "training_state.pt")
        if ema is not None:
            save_file(ema.weights, tmp / "ema_unet.safetensors")
    except BaseException as e:  # an interruption or a full disk: give the space back at once
        free = shutil.disk_usage(folder).free
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and disk_full(e):
            raise NotEnoughSpace(space_message(f"checkpoint {target.name}", folder, int(needed), free,
                                               existing[-1] if existing else None)) from e
        raise
    if target.exists():  # the same step saved again by a resumed run
        shutil.rmtree(target)
    tmp.rename(target)
    for old in checkpoint_dirs(folder)[:-keep]:
        shutil.rmtree(old)
    return target


def remove_unfinished_checkpoints(folder: Path) -> None:
    for tmp in Path(folder).glob(".tmp-step-*"):
        print(f"Removing {tmp.name}: a checkpoint that was interrupted while being written.")
        shutil.rmtree(tmp)


def newest_checkpoint(*folders: Path | None) -> Path | None:
    """The checkpoint with the highest step in any of ``folders`` (the local disk, the copy on Drive)."""
    found = [d for f in folders if f is not None for d in checkpoint_dirs(f)]
    return max(found, key=lambda d: d.name, default=None)


def copy_newest(checkpoint: Path, to: Path) -> Path | None:
    """Copy a checkpoint to ``to`` (on Drive) and then delete the older copies there. When it does not
    fit, say so and carry on: training goes on with the checkpoints on the local disk."""
    target = to / checkpoint.name
    needed = folder_bytes(checkpoint)
    to.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(to).free
    if free < needed * 1.02:
        print("WARNING, the copy on Drive was NOT updated. "
              + space_message(f"a copy of {checkpoint.name}", to, needed, free, newest_checkpoint(to)))
        return None
    tmp = to / f".tmp-{checkpoint.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(checkpoint, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    for old in checkpoint_dirs(to)[:-1]:
        shutil.rmtree(old)
    print(f"Copied {checkpoint.name} to {to}")
    return target


def save_snapshot(folder: Path, step: int, unet) -> Path:
    """``folder/step-000025/unet``: the UNet in fp16 (half a checkpoint's weights, no optimizer
    state), kept for comparing the model over training; written aside, then renamed."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float16) for k, v in unet.state_dict().items()}
    target = Path(folder) / f"step-{step:06d}"
    target.parent.mkdir(parents=True, exist_ok=True)
    make_room(target.parent, tensor_bytes(state) + 2**20, None, f"snapshot {target.name}")
    with atomic_dir(target) as tmp:
        unet.save_config(tmp / "unet")
        save_file(state, tmp / "unet" / "diffusion_pytorch_model.safetensors")
    return target


# ----------------------------------------------------------------------------------------------
# What a learner watches: progress bar, live loss curve, validation images

def cache_report(cache: LatentCache, sizes: list, margin: float, seconds: float) -> str:
    """What the cache cost, against a cache of exact-size crops (what it held before random crops)."""
    latents = sum(t.numel() * t.element_size() for t in [*cache.latents.values(), *cache.flipped.values()])
    exact = sum(4 * (sizes[i][0] // 8) * (sizes[i][1] // 8) * 2 for i in cache.latents)  # fp16
    extra = f"{margin:.1%} margin for random crops" + (", flipped images" if cache.flipped else "")

    def size(n: int) -> str:
        return f"{n / 2**20:.1f} MiB" if n >= 2**20 / 10 else f"{n / 2**10:.1f} KiB"
    return (f"Cached {len(cache.latents)} images and {len(cache.embeddings)} captions in {seconds:.1f} s, "
            f"{size(cache.nbytes)}. Latents: {size(latents)}, {latents / exact:.2f}x the "
            f"{size(exact)} of exact-size crops ({extra}); the VAE's time grows with the pixels "
            f"encoded, so roughly {1 - exact / latents:.0%} of the caching time is that extra (an estimate).")


def in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in shell.config


class LossCurve:
    """Training and validation loss per step, redrawn in place in a notebook (one output, updated);
    saved as a PNG at the end.

    ``steps``/``losses`` are this session's; ``state_dict`` holds the whole run (earlier sessions
    included), travels in every checkpoint and comes back on resume, so the curve shows the whole run.
    """

    def __init__(self, live: bool, held_out: bool = True):
        import matplotlib.pyplot as plt

        self.fig, (self.ax, self.val_ax) = plt.subplots(1, 2, figsize=(11, 3))
        plt.close(self.fig)  # drawn only through the display handle, never twice
        self.ax.set(xlabel="step", ylabel="loss (MSE)", title="Training loss")
        (self.raw,) = self.ax.plot([], [], lw=0.8, alpha=0.4, label="per step")
        (self.smooth,) = self.ax.plot([], [], lw=2, label="moving average")
        self.ax.legend(loc="upper right")
        which = "held-out images" if held_out else "fixed training images"
        self.val_ax.set(xlabel="step", ylabel="loss (MSE)", title=f"Validation loss ({which}, fixed t and noise)")
        (self.val_line,) = self.val_ax.plot([], [], "o-", color="C2", ms=3)
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.earlier_steps: list[int] = []   # earlier sessions of this run, from the checkpoint
        self.earlier_losses: list[float] = []
        self.val_steps: list[int] = []       # the whole run
        self.val_losses: list[float] = []
        self.handle, self.drawn_at = None, 0.0
        if live and in_notebook():
            from IPython.display import display
            self.handle = display(self.fig, display_id=True)

    def add(self, step: int, loss: float) -> None:
        self.steps.append(step)
        self.losses.append(loss)

    def add_validation(self, step: int, loss: float) -> None:
        self.val_steps.append(step)
        self.val_losses.append(loss)

    def state_dict(self) -> dict:
        return {"steps": self.earlier_steps + self.steps, "losses": self.earlier_losses + self.losses,
                "val_steps": list(self.val_steps), "val_losses": list(self.val_losses)}

    def load_state_dict(self, state: dict) -> None:
        self.earlier_steps, self.earlier_losses = list(state["steps"]), list(state["losses"])
        self.val_steps, self.val_losses = list(state["val_steps"]), list(state["val_losses"])

    def draw(self, force: bool = False) -> None:
        # Rendering the figure takes a good fraction of a second: at most every 2 s, whatever the step rate.
        if not self.losses or (not force and time.perf_counter() - self.drawn_at < 2.0):
            return
        self.drawn_at = time.perf_counter()
        steps, losses = self.earlier_steps + self.steps, self.earlier_losses + self.losses
        window = max(1, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        self.raw.set_data(steps, losses)
        self.smooth.set_data(steps[window - 1:], smooth)
        self.val_line.set_data(self.val_steps, self.val_losses)
        for ax in (self.ax, self.val_ax):
            ax.relim()
            ax.autoscale_view()
        if self.handle is not None:
            self.handle.update(self.fig)


def validation_grid(pipe, cfg: TrainConfig, step: int, frozen: list[torch.nn.Module], device, autocast):
    """Images for the fixed prompts and seeds from the UNet as it is now (frozen parts visit the GPU)."""
    from . import sampling, visualization

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


# ----------------------------------------------------------------------------------------------
# The loop

class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the last good checkpoint."""


@dataclass
class TrainResult:
    final_dir: Path
    losses: list[float]          # one per optimizer step of this session
    skipped: dict[str, str]      # unreadable image -> why
    peak_gib: float | None       # measured peak GPU memory (CUDA only)
    estimate: memory.MemoryEstimate
    partial_steps: int = 0       # fp16 fused steps cut short by an overflow (see UNetOptimizer)
    history: dict = field(default_factory=dict)  # the whole run, resumed sessions included: LossCurve.state_dict()


def compute_dtype_for(setting: str, device: torch.device) -> torch.dtype:
    from .runtime import has_native_bf16, pick_dtype

    if setting == "auto":
        return pick_dtype(device)
    if setting == "fp16" and device.type != "cuda":
        raise ValueError("mixed_precision='fp16' needs a GPU; on a CPU use 'fp32' (or 'bf16').")
    if setting == "bf16" and device.type == "cuda" and not has_native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"mixed_precision='bf16' needs a GPU of compute capability 8.0 or newer; this one is "
                         f"{major}.{minor} (a T4 is 7.5) and would only emulate it, slowly. Use 'auto' or 'fp16'.")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[setting]


def step_seed(seed: int, rank: int, micro_step: int) -> int:
    """Noise and timesteps of each micro-batch come from (seed, rank, micro-step): a resume needs no RNG state."""
    return random.Random(f"{seed}/{rank}/{micro_step}").getrandbits(63)


def blank_inputs(m: Models, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero latents and text embeddings of one image: something to run a backward on when a process has no data."""
    factor = 2 ** (len(m.vae.config.block_out_channels) - 1)
    device = m.unet.device
    return (torch.zeros(1, m.unet.config.in_channels, cfg.height // factor, cfg.width // factor, device=device),
            torch.zeros(1, m.tokenizer.model_max_length, m.unet.config.cross_attention_dim, device=device))


def explain_oom(cfg: TrainConfig, estimate: memory.MemoryEstimate) -> str:
    return (f"Out of GPU memory (estimated peak {estimate.total:.1f} GiB for batch_size={cfg.batch_size}, "
            f"{cfg.width}x{cfg.height}). Settings that use less, in order of effect: batch_size=1 with "
            f"grad_accum={cfg.batch_size} (same effective batch), gradient_checkpointing=True, "
            "optimizer='adamw8bit', fused_step=True, cache_latents=True, a smaller width/height. "
            "Restart the runtime first to release the memory; training resumes from the last checkpoint.")


def train(cfg: TrainConfig, on_step=None) -> TrainResult:
    """Run (or resume) the fine-tuning described by ``cfg``. ``on_step(step, loss)`` is called after each step."""
    from accelerate import Accelerator
    from diffusers import StableDiffusionPipeline
    from tqdm.auto import tqdm

    from .runtime import free_memory

    cfg.check()
    accelerator = Accelerator(mixed_precision="no")  # autocast and loss scaling are ours (see UNetOptimizer)
    device, rank, world, main = (accelerator.device, accelerator.process_index, accelerator.num_processes,
                                 accelerator.is_main_process)
    say = accelerator.print
    fused = cfg.fused_step and cfg.grad_accum == 1 and world == 1
    if cfg.fused_step and not fused:
        say("fused_step is off: it needs grad_accum=1 and a single GPU. Using the ordinary optimizer step.")
    dtype = compute_dtype_for(cfg.mixed_precision, device)
    # No autocast weight cache: it would hold a half-precision copy of every weight until the forward
    # pass ends (1.6 GiB for SD 1.5); casting again where a weight is used costs milliseconds.
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False)
    out = Path(cfg.output_dir)
    checkpoints, samples = out / "checkpoints", out / "samples"
    copies = None
    if cfg.local_checkpoints:  # resumable checkpoints on the local disk, a copy of the newest in output_dir
        checkpoints, copies = Path(cfg.local_checkpoints), checkpoints
    if main:
        checkpoints.mkdir(parents=True, exist_ok=True)
        samples.mkdir(parents=True, exist_ok=True)
        for folder in (checkpoints, copies):
            if folder is not None and folder.is_dir():
                remove_unfinished_checkpoints(folder)
        cfg.save(out / "config.json")
    resume_from = newest_checkpoint(checkpoints, copies) if cfg.resume else None

    # Models. The UNet starts from the newest checkpoint when resuming, else from the base model.
    model_id = models.resolve(cfg.model, smoke=False)
    m = load_models(model_id, frozen_dtype=dtype, prediction_type=cfg.prediction_type,
                    unet_from=None if cfg.lora_rank else resume_from)
    if cfg.lora_rank:  # the base UNet stays frozen; only the small LoRA layers train
        lora.add_lora(m.unet, cfg.lora_rank, seed=cfg.seed)
        if resume_from is not None:
            lora.load_lora_into(m.unet, resume_from)
    frozen = [m.vae, m.text_encoder]
    for module in frozen:
        module.to(device)

    # Data, and the cache that lets the VAE and text encoder leave the GPU.
    dataset = CaptionedImages(cfg.dataset, cfg.width, cfg.height, cfg.crop, cfg.flip, cfg.buckets, cfg.seed)
    from .captioning import caption_fit
    say(caption_fit(m.tokenizer, dataset.texts))  # the tokenizer cuts what is longer, silently
    skipped: dict[str, str] = {}

    def report(i: int, error: str) -> None:
        if dataset.files[i] not in skipped:
            skipped[dataset.files[i]] = error
            (tqdm.write if main else (lambda _: None))(f"Skipping unreadable image {dataset.folder / dataset.files[i]}: {error}")

    for i, error in dataset.unreadable.items():
        report(i, error)
    vset = None  # the validation loss's images, encoded while the VAE and text encoder are on the GPU
    if cfg.val_loss_every and cfg.val_loss_images:
        picked, held_out = validation_indices(validation_candidates(dataset), cfg.val_loss_images, cfg.seed)
        vset = build_validation_set(dataset, m, picked, held_out, cfg.seed, report)
    cache = None
    if cfg.cache_latents:
        say(f"Caching latents and text embeddings of {len(dataset)} images ...")
        margin, started = cfg.crop_margin if cfg.crop == "random" else 0.0, time.perf_counter()
        cache = build_cache(cache_view(dataset, margin), m, cfg.batch_size, cfg.num_workers, report, cfg.flip)
        say(cache_report(cache, dataset.sizes, margin, time.perf_counter() - started))
        for module in frozen:
            module.to("cpu")
        free_memory()
        sizes = {i: dataset.sizes[i] for i in cache.latents}
    else:
        sizes = {i: s for i, s in enumerate(dataset.sizes) if s is not None}
    if vset is not None and vset.held_out:
        sizes = {i: s for i, s in sizes.items() if i not in vset.indices}
    micro_per_epoch = len(epoch_batches(sizes, cfg.batch_size, cfg.seed, 0)) // world
    if micro_per_epoch == 0:
        raise ValueError(f"{cfg.dataset}: {len(sizes)} readable images make no batch for each of {world} processes.")
    total_steps = cfg.max_steps or cfg.epochs * micro_per_epoch // cfg.grad_accum

    def micro_batches(epoch: int, offset: int):
        """(latents, embeddings) of this process's micro-batches of an epoch, from ``offset`` on (None: all unreadable)."""
        batches = epoch_batches(sizes, cfg.batch_size, cfg.seed, epoch)[rank::world][:micro_per_epoch][offset:]
        if cache is not None:
            for b in batches:
                latents = cached_latents(cache, sizes, b, cfg.seed, epoch, cfg.crop)
                embeddings = torch.stack([cache.embeddings[dataset.texts[i]] for i in b])
                yield latents.to(device, torch.float32), embeddings.to(device, torch.float32)
            return
        dataset.epoch = epoch
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                             num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
        for batch in loader:
            for i, error in batch["errors"].items():
                report(i, error)
            if batch["pixels"] is None:
                yield None
                continue
            yield (encode_pixels(m.vae, batch["pixels"]).float(),
                   encode_texts(m.tokenizer, m.text_encoder, batch["texts"]).float())

    # The UNet, its optimizer, and the state of an interrupted run.
    unet = m.unet.to(device).train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # recompute activations in backward: far less memory, ~30% slower
    if cfg.xformers and device.type == "cuda" and importlib_util.find_spec("xformers"):
        unet.enable_xformers_memory_efficient_attention()  # else PyTorch's scaled_dot_product_attention
    optimizer = UNetOptimizer(trainable(unet), cfg.optimizer, cfg.lr, LossScaler(dtype == torch.float16), fused)
    ema = CpuEMA(unet, cfg.ema_decay) if cfg.ema_decay and main else None  # saved by the main process only
    step = 0
    if resume_from is not None:
        state = torch.load(resume_from / "training_state.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        if ema is not None and (resume_from / "ema_unet.safetensors").exists():
            from safetensors.torch import load_file
            ema.weights = load_file(resume_from / "ema_unet.safetensors")
            last = state.get("last_ema")  # absent from checkpoints written before it was kept
            ema.step = last if last is not None else step - step % cfg.ema_every
        elif ema is not None:
            say("The checkpoint has no EMA weights (EMA was off): the EMA starts from its weights now.")
            ema.step = step
        say(f"Resuming from {resume_from} (step {step} of {total_steps}).")
    estimate = memory.estimate_peak(unet, sum(p.numel() for f in frozen for p in f.parameters()),
                                    batch_size=cfg.batch_size, width=cfg.width, height=cfg.height,
                                    half_precision=dtype != torch.float32, optimizer=cfg.optimizer, fused_step=fused,
                                    gradient_checkpointing=cfg.gradient_checkpointing, cache_latents=cfg.cache_latents)
    say(estimate)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    pipe = None
    if main and cfg.validate_every:  # the training UNet with the frozen parts: nothing is loaded twice
        pipe = StableDiffusionPipeline.from_pretrained(
            model_id, unet=unet, vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.scheduler.register_to_config(prediction_type=m.noise_scheduler.config.prediction_type)
        pipe.set_progress_bar_config(disable=True)
    unet = accelerator.prepare(unet)  # DistributedDataParallel on several GPUs, unchanged on one

    def validate(step: int) -> None:
        if pipe is None:
            return
        grid = validation_grid(pipe, cfg, step, frozen, device, autocast)
        path = samples / f"step-{step:06d}.png"
        grid.save(path)
        if in_notebook():
            from IPython.display import display
            display(grid)
        else:
            tqdm.write(f"Validation images: {path}")

    def save(step: int) -> None:
        if main:
            saved = save_checkpoint(checkpoints, step, accelerator.unwrap_model(unet),
                                    {"step": step, "optimizer": optimizer.state_dict(), "curve": curve.state_dict(),
                                     "last_ema": ema.step if ema is not None else None}, ema, cfg.keep_checkpoints)
            if copies is not None and (step % cfg.copy_every == 0 or step == total_steps):
                copy_newest(saved, copies)
        accelerator.wait_for_everyone()

    snapshot_steps = set() if cfg.lora_rank else {max(1, round(f * total_steps)) for f in cfg.snapshots} - {total_steps}

    def measure(step: int) -> None:
        if vset is not None and main:
            curve.add_validation(step, validation_loss(accelerator.unwrap_model(unet), m.noise_scheduler, vset,
                                                       device, autocast))

    curve = LossCurve(live=main, held_out=vset is None or vset.held_out)
    if resume_from is not None and "curve" in state:
        curve.load_state_dict(state["curve"])
    elif resume_from is not None:
        say(f"{resume_from} holds no loss history (an older checkpoint): the curve starts at step {step}.")
    if step == 0:
        measure(0)
        validate(0)
    bar = tqdm(total=total_steps, initial=step, disable=not main, desc="training", unit="step")
    images_done, clock, step_losses = 0, time.perf_counter(), []
    micro = step * cfg.grad_accum
    try:
        while step < total_steps:
            epoch, offset = divmod(micro, micro_per_epoch)
            for inputs in micro_batches(epoch, offset):
                micro += 1
                weight = 1.0
                if inputs is None and world > 1:
                    # The other processes all-reduce gradients in this backward and would wait for
                    # this one forever: join in with a loss of weight 0.
                    inputs, weight = blank_inputs(m, cfg), 0.0
                if inputs is not None:
                    latents, embeddings = inputs
                    generator = torch.Generator(device).manual_seed(step_seed(cfg.seed, rank, micro))
                    optimizer.lr = cfg.lr * lr_factor(step, total_steps, cfg.warmup_ratio, cfg.lr_schedule)
                    last_micro = micro % cfg.grad_accum == 0  # gradients are averaged across GPUs only then
                    with contextlib.nullcontext() if last_micro else accelerator.no_sync(unet):
                        with autocast:
                            loss = diffusion_loss(unet, m.noise_scheduler, latents, embeddings, generator,
                                                  cfg.noise_offset, cfg.min_snr_gamma)
                        if not torch.isfinite(loss):
                            last = checkpoint_dirs(checkpoints)
                            raise TrainingDiverged(
                                f"The loss became {loss.item()} at step {step + 1}; stopped before it reached the "
                                f"weights. Last good checkpoint: {last[-1] if last else 'none yet'} (resume=True "
                                "continues from it). Try a lower lr, mixed_precision='bf16' or 'fp32', or check the data.")
                        optimizer.backward(loss * weight / cfg.grad_accum)
                    if weight:
                        step_losses.append(loss.item())
                        images_done += len(latents) * world
                if micro % cfg.grad_accum:
                    continue
                optimizer.step()
                step += 1
                if ema is not None and (step % cfg.ema_every == 0 or step == total_steps):
                    ema.update(accelerator.unwrap_model(unet), step)
                if step_losses:  # empty only when every image of the step was unreadable
                    curve.add(step, sum(step_losses) / len(step_losses))
                    step_losses = []
                if cfg.val_loss_every and (step % cfg.val_loss_every == 0 or step == total_steps):
                    measure(step)
                elapsed = time.perf_counter() - clock
                bar.set_postfix(loss=f"{curve.losses[-1]:.4f}" if curve.losses else "-", lr=f"{optimizer.lr:.2e}",
                                img_s=f"{images_done / elapsed:.1f}")
                bar.update()
                curve.draw()
                if on_step is not None:
                    on_step(step, curve.losses[-1] if curve.losses else None)
                if main and step in snapshot_steps:
                    save_snapshot(out / "snapshots", step, accelerator.unwrap_model(unet))
                if step % cfg.checkpoint_every == 0 and step < total_steps:
                    save(step)
                if cfg.validate_every and step % cfg.validate_every == 0 and step < total_steps:
                    validate(step)
                if step == total_steps:
                    break
    except torch.cuda.OutOfMemoryError as e:
        raise RuntimeError(explain_oom(cfg, estimate)) from e
    finally:
        bar.close()

    final = out / "final"
    if not curve.losses and ((final / "model_index.json").exists() or (final / lora.WEIGHT_NAME).exists()):
        say(f"This run had already finished ({step} of {total_steps} steps in {resume_from}); nothing to do. "
            "Raise max_steps or epochs to train further, or set resume=False to start over.")
        return TrainResult(final, [], skipped, None, estimate, history=curve.state_dict())
    peak = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / memory.GIB
        say(f"Measured peak GPU memory: {peak:.2f} GiB (estimated {estimate.total:.2f} GiB).")
    curve.draw(force=True)
    if main and curve.losses:
        curve.fig.savefig(out / "loss.png", dpi=100, bbox_inches="tight")
    if optimizer.partial_steps:
        say(f"{optimizer.partial_steps} of this session's steps were partial: an fp16 gradient overflowed after "
            "some parameters had taken their step (the fused step's design; see UNetOptimizer).")
    save(step)
    if ema is not None:  # the final model is the EMA: the last validation images show it
        ema.copy_to(accelerator.unwrap_model(unet))
    validate(step)
    partial_steps = optimizer.partial_steps
    if main:
        unet = accelerator.unwrap_model(unet)
        del optimizer
        free_memory()
        if cfg.lora_rank:
            save_lora_result(unet, final)
            say(f"Saved the LoRA weights to {final / lora.WEIGHT_NAME} (load with "
                f"pipe.load_lora_weights(folder, weight_name=\"{lora.WEIGHT_NAME}\"))")
        else:
            save_pipeline(model_id, m, unet, final)
            say(f"Saved the fine-tuned pipeline to {final}")
    accelerator.wait_for_everyone()
    return TrainResult(final, curve.losses, skipped, peak, estimate, partial_steps, curve.state_dict())


def save_pipeline(model_id: str, m: Models, unet, final: Path) -> None:
    """A complete diffusers pipeline folder in safetensors; written aside, then renamed.

    The trained UNet in fp16 (1.7 GB for SD 1.5 instead of 3.4 GB of fp32 master weights: what a
    free Drive holds and a Colab loads quickly). The frozen VAE and text encoder come again from the
    base in fp32, never the copies training held in its compute dtype (bf16 would round them), and
    tokenizer and scheduler from the base too: the folder is 2.5 GB for SD 1.5. fp32 frozen parts make
    both common calls consistent: ``from_pretrained(folder)`` with no dtype gives fp32 throughout
    (diffusers upcasts the fp16 UNet; transformers 5 keeps a text encoder in its saved dtype, so an
    fp16 one would meet an fp32 UNet), and ``torch_dtype=torch.float16`` gives fp16 throughout.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTextModel

    unet.to("cpu").half()  # training is over: the fp32 master weights can go
    frozen = dict(torch_dtype=torch.float32, use_safetensors=True)
    pipe = StableDiffusionPipeline.from_pretrained(
        model_id, unet=unet, vae=AutoencoderKL.from_pretrained(model_id, subfolder="vae", **frozen),
        text_encoder=CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder", **frozen),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler.register_to_config(prediction_type=m.noise_scheduler.config.prediction_type)
    with atomic_dir(final) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)


def save_lora_result(unet, final: Path) -> None:
    """The LoRA weights alone (a few MB): they load on top of the base model. Written aside, then renamed."""
    with atomic_dir(final) as tmp:
        lora.save_lora(unet, tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fine-tune the UNet of Stable Diffusion (see sdcourse/train.py).")
    parser.add_argument("--config", type=Path, help="a JSON file saved by TrainConfig.save (or the notebook's panel)")
    parser.add_argument("--write-config", type=Path, metavar="PATH", help="write the default config to PATH and exit")
    args = parser.parse_args(argv)
    if args.write_config:
        print(f"Wrote {TrainConfig().save(args.write_config)}; edit it, then: python -m sdcourse.train --config {args.write_config}")
        return 0
    if args.config is None:
        parser.error("--config is required (or --write-config to create one)")
    try:
        result = train(TrainConfig.load(args.config))
    except (models.ModelLoadError, TrainingDiverged, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Done: {result.final_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
