"""The latent cache: every image through the VAE and every caption through the text encoder, once.

Without it the frozen VAE and text encoder run on every batch and stay on the GPU next to the UNet;
with it they encode the dataset once before training and then leave the GPU: one of the things
that let a full fine-tune fit a 16 GB T4 (``memory.py`` counts what it saves). ``MicroBatches``
hands the loop its micro-batches of (latents, embeddings): from the cache, each latent cropped
anew every epoch, or, with the cache off, loaded and encoded as they come.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field

import torch

from .models import Models
from .runtime import free_memory
from .training_set import CaptionedImages, collate, epoch_batches


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


def cache_dataset(dataset: CaptionedImages, m: Models, cfg, report, say) -> LatentCache:
    """The cache a run (``cfg``, a ``TrainConfig``) trains from, with what it cost; then the VAE and text
    encoder go back to the CPU: from here on only the UNet needs the GPU."""
    say(f"Caching latents and text embeddings of {len(dataset)} images ...")
    margin, started = cfg.crop_margin if cfg.crop == "random" else 0.0, time.perf_counter()
    cache = build_cache(cache_view(dataset, margin), m, cfg.batch_size, cfg.num_workers, report, cfg.flip)
    say(cache_report(cache, dataset.sizes, margin, time.perf_counter() - started))
    for module in (m.vae, m.text_encoder):
        module.to("cpu")
    free_memory()
    return cache


class MicroBatches:
    """One process's micro-batches of (latents, embeddings), in fp32 on ``device``, epoch by epoch.

    The images that train are the readable ones (with the cache: those it holds) less ``held_out``,
    the validation loss's. Every epoch's batches (``epoch_batches``) are dealt out to the ``world``
    processes in turn, ``per_epoch`` to each, so that they all step together. Without the cache a
    batch is loaded and encoded here, and one with no readable image comes as None.
    """

    def __init__(self, cfg, dataset: CaptionedImages, cache: LatentCache | None, held_out: list[int], m: Models,
                 report, device: torch.device, rank: int, world: int):
        self.cfg, self.dataset, self.cache, self.m, self.report = cfg, dataset, cache, m, report
        self.device, self.rank, self.world = device, rank, world
        if cache is not None:
            sizes = {i: dataset.sizes[i] for i in cache.latents}
        else:
            sizes = {i: s for i, s in enumerate(dataset.sizes) if s is not None}
        self.sizes = {i: s for i, s in sizes.items() if i not in held_out}
        self.per_epoch = len(epoch_batches(self.sizes, cfg.batch_size, cfg.seed, 0)) // world
        if self.per_epoch == 0:
            raise ValueError(f"{cfg.dataset}: {len(self.sizes)} readable images make no batch for each of {world} processes.")

    def epoch(self, epoch: int, offset: int = 0):
        """The micro-batches of ``epoch``, from number ``offset`` on (where a resumed run left off)."""
        cfg, sizes = self.cfg, self.sizes
        batches = epoch_batches(sizes, cfg.batch_size, cfg.seed, epoch)[self.rank::self.world][:self.per_epoch][offset:]
        if self.cache is not None:
            for b in batches:
                latents = cached_latents(self.cache, sizes, b, cfg.seed, epoch, cfg.crop)
                embeddings = torch.stack([self.cache.embeddings[self.dataset.texts[i]] for i in b])
                yield latents.to(self.device, torch.float32), embeddings.to(self.device, torch.float32)
            return
        self.dataset.epoch = epoch
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, collate_fn=collate,
                                             num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda")
        for batch in loader:
            for i, error in batch["errors"].items():
                self.report(i, error)
            if batch["pixels"] is None:
                yield None
                continue
            yield (encode_pixels(self.m.vae, batch["pixels"]).float(),
                   encode_texts(self.m.tokenizer, self.m.text_encoder, batch["texts"]).float())
