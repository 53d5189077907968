"""Speed of our training loop on the tiny model and the sample data, against plain references.

    .venv/bin/python benchmarks/bench_speed.py

1. Step time: ``sdcourse.train.train`` (defaults: cached latents, gradient checkpointing, 8-bit
   AdamW stepped inside backward, checkpoint/validation off) against a loop written the
   straightforward way (encode every batch, fp32, torch AdamW after backward), same data, batch 4.
2. Epoch time with cached latents against the same loop encoding every batch (``cache_latents``),
   plus the one-time cost of building the cache.

Each variant runs twice, alternating, in this one process; the faster run counts. The tiny model
is so small that fixed per-step costs dominate: the ratios say what our extras cost in overhead,
not what they save on a GPU (memory, see bench_memory.py).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sdcourse import tiny
from sdcourse.sample_data import sample_dataset_dir
from sdcourse.latent_cache import encode_pixels, encode_texts
from sdcourse.models import load_models
from sdcourse.train import TrainConfig, train
from sdcourse.training_set import CaptionedImages, collate

STEPS = 27  # three epochs of the 36 sample images at batch 4


def our_loop(cache_latents: bool) -> tuple[float, float, float]:
    """(median seconds per step, seconds of the last epoch, seconds to the first step) of sdcourse.train.train."""
    stamps, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model=tiny.sd_path("epsilon"), dataset=str(sample_dataset_dir()), output_dir=out,
                          width=64, height=64, max_steps=STEPS, lr=1e-4, checkpoint_every=10**6, validate_every=0,
                          cache_latents=cache_latents, num_workers=0)
        train(cfg, on_step=lambda step, loss: stamps.append(time.perf_counter()))
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return statistics.median(steps), stamps[-1] - stamps[-10], stamps[0] - start


def plain_loop() -> float:
    """Median seconds per step of the textbook loop: encode, noise, predict, MSE, backward, step."""
    m = load_models(tiny.sd_path("epsilon"), torch.float32)
    data = CaptionedImages(sample_dataset_dir(), 64, 64)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, collate_fn=collate)
    optimizer = torch.optim.AdamW(m.unet.parameters(), lr=1e-4)
    m.unet.train()
    stamps = []
    while len(stamps) < STEPS:
        for batch in loader:
            latents = encode_pixels(m.vae, batch["pixels"])
            embeddings = encode_texts(m.tokenizer, m.text_encoder, batch["texts"])
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (len(latents),))
            noisy = m.noise_scheduler.add_noise(latents, noise, timesteps)
            loss = F.mse_loss(m.unet(noisy, timesteps, embeddings).sample, noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            stamps.append(time.perf_counter())
    return statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:]))


def main() -> None:
    torch.set_num_threads(2)
    ours, uncached, plain = [], [], []
    for _ in range(2):
        ours.append(our_loop(cache_latents=True))
        uncached.append(our_loop(cache_latents=False))
        plain.append(plain_loop())
    step_ours, epoch_cached, first_cached = (min(values) for values in zip(*ours))
    step_uncached, epoch_uncached, first_uncached = (min(values) for values in zip(*uncached))
    step_plain = min(plain)
    print(f"Tiny SD model, sample data (36 images), 64x64, batch 4, CPU, {torch.get_num_threads()} threads\n")
    print(f"{'':<52}{'ms/step':>9}{'ratio':>8}")
    print(f"{'plain loop (encode each batch, fp32 AdamW)':<52}{1000 * step_plain:>9.1f}{1.0:>8.2f}")
    print(f"{'ours (cached, checkpointing, fused 8-bit AdamW)':<52}{1000 * step_ours:>9.1f}{step_ours / step_plain:>8.2f}")
    print(f"{'ours without the cache':<52}{1000 * step_uncached:>9.1f}{step_uncached / step_plain:>8.2f}")
    print(f"\n{'one epoch (9 steps)':<52}{'seconds':>9}{'ratio':>8}")
    print(f"{'encoding every batch':<52}{epoch_uncached:>9.2f}{1.0:>8.2f}")
    print(f"{'cached latents and embeddings':<52}{epoch_cached:>9.2f}{epoch_cached / epoch_uncached:>8.2f}")
    print(f"building the cache, once (extra time to the first step): {first_cached - first_uncached:.2f} s")


if __name__ == "__main__":
    main()
