"""Peak memory of one UNet training step with the REAL Stable Diffusion 1.5 architecture: ours vs diffusers'.

    .venv/bin/python benchmarks/bench_memory.py            # all rows, ~30 min on 2 CPU cores, < 20 GiB
    .venv/bin/python benchmarks/bench_memory.py --batch 1  # one batch size
    .venv/bin/python benchmarks/bench_memory.py --count    # live-tensor count, seconds, no memory

Models are built from their published configs with random weights (no download). Each row runs in
its own subprocess (the rows need 5-16 GiB each, one at a time) and does two training steps at
512x512 px (64x64 latents); the second step is the steady state, with optimizer states allocated.

- ours: ``sdcourse.train``'s recipe: cached latents and text embeddings (no VAE or text encoder),
  gradient checkpointing, 8-bit AdamW stepped inside backward one parameter at a time
  (``UNetOptimizer(fused=True)``), fp32 master weights.
- reference: the loop of diffusers' ``examples/text_to_image/train_text_to_image.py`` with
  ``--use_8bit_adam --gradient_checkpointing --mixed_precision fp16`` (and ``--use_ema``): VAE and
  text encoder on the device in fp16 (bf16 on a CPU: the same bytes), every batch encoded anew, gradients of all parameters, then
  clip_grad_norm_, optimizer.step(), zero_grad(); with EMA, an fp32 EMA copy on the device.

What is measured: on a GPU, ``torch.cuda.max_memory_allocated`` with fp16 autocast on both sides.
On a CPU (no fp16 autocast), both sides compute in fp32: peak resident memory (``ru_maxrss``) minus
the process's RSS after imports, with the same glibc allocator settings for both (``ENV`` below).
On a T4, autocast adds to both sides the fp16 weight copies it caches
(1.6 GiB for SD 1.5) and halves the activations; the weights, gradients, optimizer states and EMA
rows, which make the difference, are the same bytes on both.

``--count`` counts live tensors instead (FakeTensorMode + MemTracker: shapes only, exact bytes, no
allocator): parameters, gradients and activations of one forward + backward of the UNet, with and
without gradient checkpointing. ``sdcourse/memory.py`` takes its activation figures from there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

GIB = 2**30

# stable-diffusion-v1-5/stable-diffusion-v1-5's vae/config.json and text_encoder/config.json (its
# unet/config.json is memory.SD15_UNET_CONFIG).
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
ROWS = [("ours", False), ("reference", False), ("reference", True)]
# glibc keeps freed heap memory resident (per-thread arenas; blocks under a dynamic mmap threshold
# that grows to 32 MiB), so RSS would count tensors torch has already freed. Two arenas and a fixed
# 64 KiB threshold (tensor buffers are mmapped, returned on free) make RSS follow live memory.
ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib * 1024 / GIB


def one_row(recipe: str, ema: bool, batch: int, steps: int) -> dict:
    """Runs in a subprocess: build, train ``steps`` steps, report the peak."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdcourse.memory import SD15_UNET_CONFIG
    from sdcourse.optimizer import LossScaler, UNetOptimizer, make_adamw
    from sdcourse.train import diffusion_loss

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=cuda)
    baseline = rss_gib()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).to(device).train()
    unet.enable_gradient_checkpointing()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    generator = torch.Generator(device).manual_seed(0)
    seconds = []
    if recipe == "ours":
        optimizer = UNetOptimizer(list(unet.parameters()), "adamw8bit", 5e-6, LossScaler(cuda), fused=True)
        latents = torch.randn(batch, 4, 64, 64, device=device)  # from the cache: no VAE, no text encoder
        embeddings = torch.randn(batch, 77, 768, device=device)
        for _ in range(steps):
            start = time.perf_counter()
            with autocast:
                loss = diffusion_loss(unet, scheduler, latents, embeddings, generator)
            optimizer.backward(loss)
            optimizer.step()
            seconds.append(time.perf_counter() - start)
    else:
        from diffusers.training_utils import EMAModel

        weight_dtype = torch.float16 if cuda else torch.bfloat16  # fp16 compute is GPU-only; same bytes
        vae = AutoencoderKL(**SD15_VAE).to(device, weight_dtype).requires_grad_(False)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).to(device, weight_dtype).requires_grad_(False)
        ema_unet = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config) if ema else None
        if ema_unet is not None:
            ema_unet.to(device)
        optimizer = make_adamw(unet.parameters(), "adamw8bit", 5e-6)
        pixels = torch.rand(batch, 3, 512, 512, device=device) * 2 - 1
        input_ids = torch.randint(0, SD15_TEXT["vocab_size"], (batch, 77), device=device)
        for _ in range(steps):
            start = time.perf_counter()
            with torch.no_grad():
                latents = vae.encode(pixels.to(weight_dtype)).latent_dist.sample() * 0.18215
                embeddings = text_encoder(input_ids)[0]
            noise = torch.randn(latents.shape, generator=generator, device=device)
            timesteps = torch.randint(0, 1000, (batch,), generator=generator, device=device)
            noisy = scheduler.add_noise(latents.float(), noise, timesteps)
            with autocast:
                pred = unet(noisy, timesteps, embeddings.float()).sample
            loss = F.mse_loss(pred.float(), noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            if ema_unet is not None:
                ema_unet.step(unet.parameters())
            seconds.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / GIB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB - baseline
    return {"recipe": recipe, "ema": ema, "batch": batch, "peak_gib": peak, "step_s": seconds[-1],
            "device": device.type, "loss": float(loss)}


def count_live_tensors(batch: int, checkpointing: bool) -> dict:
    """Peak bytes by kind over one forward + backward, counted on fake tensors (no optimizer: the
    8-bit one cannot be built under FakeTensorMode; its states are 2 bytes per parameter)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from sdcourse.memory import SD15_UNET_CONFIG

    with FakeTensorMode():
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG).train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        tracker = MemTracker()
        tracker.track_external(unet)
        with tracker:
            loss = unet(torch.randn(batch, 4, 64, 64), torch.randint(0, 1000, (batch,)), torch.randn(batch, 77, 768)).sample
            loss.float().pow(2).mean().backward()
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return {str(kind).split(".")[-1].split(":")[0].lower(): b / GIB for kind, b in peak.items()}


def print_counts(batches: list[int]) -> None:
    print("Live tensors at the peak of one forward + backward of SD 1.5's UNet, 64x64 latents, fp32 (GiB):")
    print(f"{'checkpointing':<15}{'batch':>6}{'params':>8}{'grads':>8}{'activations':>13}{'temp':>7}{'total':>8}")
    for checkpointing in (True, False):
        for batch in batches:
            c = count_live_tensors(batch, checkpointing)
            print(f"{str(checkpointing):<15}{batch:>6}{c['param']:>8.2f}{c['grad']:>8.2f}{c['act']:>13.2f}"
                  f"{c['temp']:>7.2f}{c['total']:>8.2f}")


def run_row(recipe: str, ema: bool, batch: int, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--row", recipe, "--batch", str(batch), "--steps", str(steps)] + (["--ema"] if ema else [])
    done = subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--count", action="store_true", help="count live tensors instead (fast, no memory)")
    parser.add_argument("--row", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--ema", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.count:
        print_counts(args.batch)
        return
    if args.row:  # child process
        print(json.dumps(one_row(args.row, args.ema, args.batch[0], args.steps)))
        return
    print(f"Allocator settings for every row: {ENV}; {args.steps} steps each, peak over the whole run.")
    results = []
    for batch in args.batch:
        for recipe, ema in ROWS:
            r = run_row(recipe, ema, batch, args.steps)
            print(f"  done: {r}", flush=True)
            results.append(r)
    device = results[0]["device"]
    what = "max_memory_allocated (fp16 autocast)" if device == "cuda" else "peak RSS over post-import baseline, fp32 compute"
    print(f"\nPeak memory of one SD 1.5 UNet training step at 512x512, {device}: {what}")
    print(f"{'batch':>5}  {'recipe':<28}{'peak GiB':>9}{'ours/this':>10}")
    for batch in args.batch:
        rows = [r for r in results if r["batch"] == batch]
        ours = next(r["peak_gib"] for r in rows if r["recipe"] == "ours")
        for r in rows:
            name = "ours (fused 8-bit, cached)" if r["recipe"] == "ours" else "diffusers" + (" + EMA" if r["ema"] else "")
            print(f"{batch:>5}  {name:<28}{r['peak_gib']:>9.2f}{ours / r['peak_gib']:>10.2f}")
    print("Goal: ours <= 8 GiB at batch 4 and <= 0.6 x the reference (without EMA).")


if __name__ == "__main__":
    main()
