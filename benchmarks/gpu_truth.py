"""The GPU truth: the course's T4 figures measured on a CUDA GPU held to a T4's memory.

    python benchmarks/gpu_truth.py                       # SD 1.5's real configuration, random weights
    python benchmarks/gpu_truth.py --model /path/to/sd15 # a local diffusers folder (from_pretrained)
    python benchmarks/gpu_truth.py --parts memory --batch 4
    python benchmarks/gpu_truth.py --check-on-cpu         # every part on a small model on the CPU, ~3 min:
                                                          # checks the script before it spends GPU time

On any CUDA GPU, computing in fp16 autocast as on a T4 (never bf16, even where the GPU has it), with
``torch.cuda.set_per_process_memory_fraction`` holding the process to a T4's usable 15 GiB. Every figure is
printed with ``torch.cuda.get_device_name()``: a figure from a faster GPU is a T4's memory, not its speed.

Parts (``--parts``), all in one process, one after the other:

- ``memory``: batch 1 and 4 at 512 px. Peak ``max_memory_allocated`` and s/step of the course's
  ``train.train`` (fused 8-bit AdamW, cached latents, gradient checkpointing, fp16 autocast, its loss
  scaler) against the recipe of diffusers' ``examples/text_to_image/train_text_to_image.py``
  (``--use_8bit_adam --gradient_checkpointing --mixed_precision fp16``, with and without ``--use_ema``:
  bitsandbytes AdamW8bit, GradScaler, VAE and text encoder in fp16 on the GPU encoding every batch, EMA
  on the GPU), each beside ``sdcourse/memory.py``'s estimate for the same settings.
- ``resume``: the peak of a session that resumes from a checkpoint against the session that wrote it
  (batch 1): what a Colab user meets after a disconnect.
- ``scaler``: the course's ``LossScaler`` from its initial scale 2^16 on the real UNet's fp16 gradients:
  the scale after each step, which steps overflowed, how many fused steps were partial.
- ``fused``: the fused step against the ordinary step, same weights and batches, several fp16 steps: the
  losses and the largest weight difference, at the initial scale 2^16 and at one that does not overflow.
- ``sync``: what the fused step's per-parameter finiteness check (one GPU sync per parameter) costs per
  step, against the same step with the check left on the GPU.

Random weights (the default) give real memory and speed; the scaler's overflow pattern depends on the
gradients, so for that part pass real weights (``--model``) and say which. Needs about 25 GB of disk under
``--work`` (a random-weight pipeline, and the training runs' final checkpoints and pipelines). No GPU has
run it yet, so how long it takes there is not known; ``--check-on-cpu`` takes about 5 minutes here.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GIB = 2**30
PARTS = ("memory", "resume", "scaler", "fused", "sync")
# "cuda" for the measurements; --check-on-cpu runs every part on the CPU (bf16, a small model) to check the
# script itself before it spends GPU time: those figures mean nothing.
DEVICE, AMP, PRECISION = "cuda", "float16", "fp16"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--model", type=Path, help="a local SD 1.5 diffusers folder; default: random weights of "
                        "SD 1.5's real configuration, built into --work")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdcourse-gpu-truth"), help="scratch folder")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per row, after one warm-up step")
    parser.add_argument("--images", type=int, default=8, help="images of data/sample the course's run trains on")
    parser.add_argument("--cap-gib", type=float, default=15.0, help="usable GPU memory, GiB (a T4: about 15)")
    parser.add_argument("--scaler-steps", type=int, default=12)
    parser.add_argument("--fused-steps", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--check-on-cpu", action="store_true", help="run every part on the CPU with a small model "
                        "in bf16, to check this script (its figures mean nothing)")
    return parser.parse_args(argv)


class Figures:
    """Every printed figure, labelled with the GPU it came from."""

    def __init__(self, gpu: str):
        self.gpu, self.rows = gpu, []

    def say(self, part: str, text: str, **values) -> None:
        print(f"[{self.gpu}] {part}: {text}", flush=True)
        self.rows.append({"gpu": self.gpu, "part": part, "text": text, **values})


def fresh(torch) -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sync(torch) -> None:
    if DEVICE == "cuda":
        sync(torch)


def peak_gib(torch) -> float:
    return torch.cuda.max_memory_allocated() / GIB if DEVICE == "cuda" else float("nan")


def model_folder(args) -> Path:
    if args.model is not None:
        return args.model
    import rehearsal

    folder = args.work / ("small-random" if args.check_on_cpu else "sd15-random")
    if not (folder / "model_index.json").exists():
        shutil.rmtree(folder, ignore_errors=True)
        rehearsal.build_pipeline(rehearsal.SMALL if args.check_on_cpu else rehearsal.SD15, folder)
    return folder


def dataset_folder(args) -> Path:
    from sdcourse import data, sources

    folder = args.work / "dataset"
    if not (folder / "metadata.csv").exists():
        candidates = sources.from_folder(ROOT / "data" / "sample")[:args.images]
        data.build_dataset(candidates, folder, data.CleanConfig(resolution=512, min_side=64), overwrite=True)
    return folder


def load_unet(torch, model: Path, device):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=torch.float32,
                                                use_safetensors=True).to(device).train()
    unet.enable_gradient_checkpointing()
    return unet


# --- memory and speed ----------------------------------------------------------------------------------

def course_row(torch, args, model: Path, dataset: Path, batch: int, fig: Figures) -> None:
    from sdcourse.train import TrainConfig, train

    out = args.work / f"course-b{batch}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(model=str(model), dataset=str(dataset), output_dir=str(out), batch_size=batch,
                      max_steps=1 + args.steps, mixed_precision=PRECISION,  # a T4's; "auto" picks bf16 on newer GPUs
                      checkpoint_every=10**6, keep_checkpoints=1, validate_every=0, val_loss_every=0,
                      snapshots=[], resume=False, num_workers=2)
    stamps = []
    fresh(torch)
    try:
        result = train(cfg, on_step=lambda step, loss: stamps.append(time.perf_counter()))
    except RuntimeError as e:  # train turns a CUDA OOM into its explanation
        if not (isinstance(e, torch.cuda.OutOfMemoryError) or isinstance(e.__cause__, torch.cuda.OutOfMemoryError)):
            raise
        fig.say("memory", f"course's train.train, batch {batch}: out of memory under the {args.cap_gib} GiB cap ({e})",
                recipe="course", batch=batch, oom=True)
        return
    finally:
        shutil.rmtree(out, ignore_errors=True)
    seconds = statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:])) if len(stamps) > 2 else float("nan")
    fig.say("memory", f"course's train.train, batch {batch}, 512 px: peak max_memory_allocated {result.peak_gib or float('nan'):.2f} GiB "
            f"during the steps (cache built, VAE and text encoder off the GPU); {seconds:.2f} s/step; "
            f"memory.py estimate {result.estimate.total:.2f} GiB; partial fp16 steps {result.partial_steps}",
            recipe="course", batch=batch, peak_gib=result.peak_gib, s_per_step=seconds,
            estimate_gib=result.estimate.total, partial_steps=result.partial_steps)


def reference_row(torch, args, model: Path, batch: int, ema: bool, fig: Figures) -> None:
    """diffusers' train_text_to_image.py loop: --use_8bit_adam --gradient_checkpointing --mixed_precision fp16
    [--use_ema], max_grad_norm 1.0, its lr 1e-4 (the lr changes no byte)."""
    import bitsandbytes as bnb
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdcourse import memory

    name = "diffusers recipe" + (" + EMA" if ema else "")
    device = torch.device(DEVICE)
    with torch.device("meta"):
        shape = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model, subfolder="unet"))
        frozen = sum(p.numel() for m in (AutoencoderKL.from_config(AutoencoderKL.load_config(model, subfolder="vae")),
                                         CLIPTextModel(CLIPTextConfig.from_pretrained(model, subfolder="text_encoder")))
                     for p in m.parameters())
    estimate = memory.estimate_peak(shape, frozen, batch_size=batch, width=512, height=512, half_precision=True,
                                    optimizer="adamw8bit", fused_step=False, gradient_checkpointing=True,
                                    cache_latents=False, autocast_cache=True, ema_on_gpu=ema)
    fresh(torch)
    parts = {}
    try:
        vae = parts["vae"] = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=getattr(torch, AMP)).to(device)
        text_encoder = parts["text"] = CLIPTextModel.from_pretrained(model, subfolder="text_encoder",
                                                                     torch_dtype=getattr(torch, AMP)).to(device)
        vae.requires_grad_(False)
        text_encoder.requires_grad_(False)
        unet = parts["unet"] = load_unet(torch, model, device)
        scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
        ema_unet = parts["ema"] = (EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config)
                                   if ema else None)
        if ema_unet is not None:
            ema_unet.to(device)
        optimizer = parts["optimizer"] = bnb.optim.AdamW8bit(unet.parameters(), lr=1e-4, betas=(0.9, 0.999),
                                                             weight_decay=1e-2, eps=1e-8)
        scaler = torch.amp.GradScaler(DEVICE)  # accelerate's fp16: initial scale 2^16
        generator = torch.Generator(device).manual_seed(0)
        pixels = torch.rand(batch, 3, 512, 512, device=device, generator=generator) * 2 - 1
        ids = torch.randint(0, text_encoder.config.vocab_size, (batch, 77), device=device, generator=generator)
        seconds = []
        for _ in range(1 + args.steps):
            sync(torch)
            start = time.perf_counter()
            with torch.no_grad():
                latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
                embeddings = text_encoder(ids)[0]
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            with torch.autocast(DEVICE, dtype=getattr(torch, AMP)):
                prediction = unet(noisy, timesteps, embeddings).sample
                loss = F.mse_loss(prediction.float(), noise.float())
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema_unet is not None:
                ema_unet.step(unet.parameters())
            sync(torch)
            seconds.append(time.perf_counter() - start)
        peak = peak_gib(torch)
    except torch.cuda.OutOfMemoryError:
        fig.say("memory", f"{name}, batch {batch}: out of memory under the {args.cap_gib} GiB cap (memory.py "
                f"estimate {estimate.total:.2f} GiB)", recipe=name, batch=batch, oom=True, estimate_gib=estimate.total)
        return
    finally:
        vae = text_encoder = unet = ema_unet = optimizer = None
        parts.clear()
        fresh(torch)
    fig.say("memory", f"{name}, batch {batch}, 512 px: peak max_memory_allocated {peak:.2f} GiB (models loaded "
            f"included); {statistics.median(seconds[1:]):.2f} s/step; memory.py estimate {estimate.total:.2f} GiB; "
            f"final loss scale {scaler.get_scale():.0f}",
            recipe=name, batch=batch, peak_gib=peak, s_per_step=statistics.median(seconds[1:]),
            estimate_gib=estimate.total)


def resume_part(torch, args, model: Path, fig: Figures) -> None:
    from sdcourse.train import TrainConfig, train

    out = args.work / "resume"
    shutil.rmtree(out, ignore_errors=True)
    peaks = []
    for steps in (2, 4):  # the first session writes checkpoints, the second resumes from the last
        cfg = TrainConfig(model=str(model), dataset=str(dataset_folder(args)), output_dir=str(out), batch_size=1,
                          max_steps=steps, mixed_precision=PRECISION, checkpoint_every=1, keep_checkpoints=1,
                          validate_every=0, val_loss_every=0, snapshots=[], num_workers=2)
        fresh(torch)
        peaks.append(train(cfg).peak_gib or float("nan"))
    shutil.rmtree(out, ignore_errors=True)
    fig.say("resume", f"batch 1, 512 px: peak max_memory_allocated {peaks[0]:.2f} GiB in the session that wrote the "
            f"checkpoint, {peaks[1]:.2f} GiB in the one that resumed from it", first_gib=peaks[0], resumed_gib=peaks[1])


# --- the course's step, by hand, for the scaler, fused and sync parts ------------------------------------

def course_steps(torch, model: Path, steps: int, fused: bool, scale: float, batch: int = 1, check=None):
    """``steps`` steps of the course's UNetOptimizer (8-bit AdamW) with its LossScaler from ``scale``, fp16
    autocast without the weight cache (as run.Run): per step (loss, scale before, overflow, parameters that
    stepped, seconds), the optimizer, and the UNet. ``check``: a replacement for LossScaler.unscale_."""
    from diffusers import DDPMScheduler

    from sdcourse.optimizer import LossScaler, UNetOptimizer
    from sdcourse.train import diffusion_loss

    device = torch.device(DEVICE)
    torch.manual_seed(0)
    unet = load_unet(torch, model, device)
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    scaler = LossScaler(True, scale=scale)
    if check is not None:
        scaler.unscale_ = check.__get__(scaler)
    optimizer = UNetOptimizer([p for p in unet.parameters() if p.requires_grad], "adamw8bit", 5e-6, scaler, fused)
    data = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 4, 64, 64, generator=data).to(device)
    embeddings = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=data).to(device)
    rows = []
    for step in range(steps):
        sync(torch)
        start = time.perf_counter()
        before = scaler.scale
        with torch.autocast(DEVICE, dtype=getattr(torch, AMP), cache_enabled=False):
            loss = diffusion_loss(unet, scheduler, latents, embeddings, torch.Generator(device).manual_seed(step))
        optimizer.backward(loss)
        if not fused:
            overflow = None  # the ordinary step finds out inside step()
        else:
            overflow = optimizer.overflow
        applied = optimizer.applied
        optimizer.step()
        sync(torch)
        overflow = scaler.scale < before if overflow is None else overflow
        rows.append((loss.item(), before, overflow, applied, time.perf_counter() - start))
    return rows, optimizer, unet


def scaler_part(torch, args, model: Path, fig: Figures) -> None:
    rows, optimizer, unet = course_steps(torch, model, args.scaler_steps, fused=True, scale=2.0**16)
    finite = all(torch.isfinite(p).all() for p in unet.parameters())
    n = sum(1 for p in unet.parameters() if p.requires_grad)
    weights = "real weights from " + str(args.model) if args.model else "random weights (the overflow pattern of real ones may differ)"
    for i, (loss, scale, overflow, applied, _) in enumerate(rows):
        fig.say("scaler", f"step {i + 1}: scale {scale:.0f}, loss {loss:.4f}, "
                + (f"overflow after {applied} of {n} parameters stepped" if overflow else "no overflow"),
                step=i + 1, scale=scale, loss=loss, overflow=bool(overflow), applied=applied)
    fig.say("scaler", f"{sum(r[2] for r in rows)} overflows in {len(rows)} steps from 2^16 ({weights}); partial "
            f"steps {optimizer.partial_steps}; scale now {optimizer.scaler.scale:.0f}; every weight finite: {finite}",
            overflows=sum(r[2] for r in rows), partial_steps=optimizer.partial_steps, finite=bool(finite))
    del optimizer, unet
    fresh(torch)


def fused_part(torch, args, model: Path, fig: Figures) -> None:
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # the same kernels both ways
    try:
        compare_fused(torch, args, model, fig)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def compare_fused(torch, args, model: Path, fig: Figures) -> None:
    for scale in (2.0**16, 2.0**8):
        runs = {}
        for fused in (True, False):
            rows, optimizer, unet = course_steps(torch, model, args.fused_steps, fused=fused, scale=scale)
            runs[fused] = (rows, {k: v.detach().cpu() for k, v in unet.state_dict().items()}, optimizer.partial_steps)
            del optimizer, unet
            fresh(torch)
        (rows_f, w_f, partial), (rows_o, w_o, _) = runs[True], runs[False]
        start = {k: v for k, v in load_unet(torch, model, "cpu").state_dict().items()}
        moved = max((w_o[k] - start[k]).abs().max().item() for k in w_o)
        gap = max((w_f[k] - w_o[k]).abs().max().item() for k in w_o)
        fig.say("fused", f"initial scale {scale:.0f}, {args.fused_steps} steps: losses fused "
                + ", ".join(f"{r[0]:.5f}" for r in rows_f) + " / ordinary " + ", ".join(f"{r[0]:.5f}" for r in rows_o)
                + f"; overflows fused {sum(r[2] for r in rows_f)} (partial {partial}), ordinary "
                f"{sum(bool(r[2]) for r in rows_o)}; largest weight difference {gap:.3e} against the largest "
                f"update {moved:.3e}", scale=scale, gap=gap, moved=moved, partial=partial)
        del w_f, w_o, start


def sync_part(torch, args, model: Path, fig: Figures) -> None:
    def on_device(self, grad):  # for timing only: unscale and check without waiting for the answer
        grad.mul_(1.0 / self.scale)
        self.found = torch.isfinite(grad).all()
        return True

    timed = {}
    for name, check in (("a sync per parameter (the course's)", None), ("no sync (timing only)", on_device)):
        rows, optimizer, unet = course_steps(torch, model, 1 + args.steps, fused=True, scale=2.0**8, check=check)
        timed[name] = statistics.median(r[4] for r in rows[1:])
        n = sum(1 for p in unet.parameters() if p.requires_grad)
        del optimizer, unet
        fresh(torch)
    (a, with_sync), (_, without) = timed.items()
    fig.say("sync", f"fused step, batch 1, 512 px: {with_sync:.3f} s/step with {a}, {without:.3f} s without: "
            f"{with_sync - without:+.3f} s per step for {n} parameters ({(with_sync - without) / with_sync:+.1%})",
            with_sync=with_sync, without=without, parameters=n)


def main(argv=None) -> int:
    global DEVICE, AMP, PRECISION
    args = parse_args(argv)
    import torch

    if args.check_on_cpu:
        DEVICE, AMP, PRECISION = "cpu", "bfloat16", "bf16"
        args.batch, args.steps, args.images = [1], 2, 2
        args.scaler_steps, args.fused_steps = 2, 2
        args.work = args.work / "check-on-cpu"
        args.work.mkdir(parents=True, exist_ok=True)
        fig = Figures("CPU check, figures mean nothing")
        return run_parts(torch, args, fig)
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"gpu_truth.py measures on a CUDA GPU and this machine has none that torch can use (torch "
              f"{torch.__version__}, {build}). Run it on a GPU machine (a Colab T4, or any CUDA GPU: the memory "
              "cap makes it a T4's); on a CPU, benchmarks/rehearsal.py is the full-size check.", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total))
    fig = Figures(gpu)
    import diffusers
    fig.say("setup", f"capped at {min(args.cap_gib, total / GIB):.1f} GiB of {total / GIB:.1f} GiB; compute capability "
            f"{'.'.join(map(str, torch.cuda.get_device_capability()))}; fp16 autocast; torch {torch.__version__}, "
            f"diffusers {diffusers.__version__}; model: {args.model or 'SD 1.5 configuration, random weights'}")
    args.work.mkdir(parents=True, exist_ok=True)
    return run_parts(torch, args, fig)


def run_parts(torch, args, fig: Figures) -> int:
    model = model_folder(args)
    if "memory" in args.parts:
        dataset = dataset_folder(args)
        for batch in args.batch:
            course_row(torch, args, model, dataset, batch, fig)
            for ema in (False, True):
                reference_row(torch, args, model, batch, ema, fig)
    for part, run in (("resume", resume_part), ("scaler", scaler_part), ("fused", fused_part), ("sync", sync_part)):
        if part in args.parts:
            run(torch, args, model, fig)
    if args.json:
        args.json.write_text(json.dumps(fig.rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
