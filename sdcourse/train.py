"""Fine-tune the UNet of Stable Diffusion on a folder of captioned images. One loop, top to bottom.

    python -m sdcourse.train --config run.json            # one GPU (or the CPU, slowly)
    accelerate launch -m sdcourse.train --config run.json # several GPUs
    python -m sdcourse.train --write-config run.json      # the defaults, to edit

The training step: pixels -> VAE latents (x the VAE's scaling factor) -> noise added at a random
timestep -> the caption through the text encoder -> the UNet predicts the noise (epsilon models,
SD 1.x) or the velocity (v-prediction, SD 2.x) -> MSE against it. Only the UNet learns.

This file holds the settings (``TrainConfig``), the loss and the loop. Each step of the loop is a
call into the module that holds it, in the order a batch meets them: ``training_set`` (captioned
images, buckets, batches) -> ``latent_cache`` (encoded once, cropped anew each epoch) -> the loss,
here -> ``optimizer`` (loss scaling, the fused step, the EMA) -> ``checkpoints`` (saving, resuming,
room on the disk). ``run`` holds the processes, the precision and the folders; what a learner
watches comes from ``validation`` and ``visualization``.

What makes it fit a 16 GB T4 (see ``sdcourse/memory.py`` for the arithmetic):
latents and text embeddings are computed once and cached, then the VAE and text encoder leave the
GPU; fp32 master weights with fp16 autocast and loss scaling (bf16 from compute capability 8.0); gradient
checkpointing; 8-bit AdamW; and the optimizer step applied inside the backward pass, one parameter
at a time, so a full set of gradients never exists (``optimizer.UNetOptimizer``).

What makes it never lose a run: checkpoints written to a temporary folder and renamed, the last K
kept, the free space checked before each (a full disk stops the run with a message, never with half
a checkpoint left behind); resuming restores weights, optimizer, loss scale, schedule position, RNG and data position,
so a resumed run ends with the same weights as an uninterrupted one; a NaN loss stops the run with
the last good checkpoint intact; unreadable images are reported and skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import lora, memory, models
from .captioning import caption_fit
from .checkpoints import checkpoint_dirs, resume, save_snapshot
from .latent_cache import MicroBatches, cache_dataset
from .models import Models
from .optimizer import UNetOptimizer, lr_factor
from .run import Run
from .sampling import SCHEDULERS
from .training_set import CaptionedImages, Unreadable
from .validation import ValidationImages, ValidationSet, validation_set
from .visualization import LossCurve

PRECISIONS = ("auto", "fp16", "bf16", "fp32")


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
    lora_conv: bool = False              # with lora_rank: LoCon, LoRA layers on the UNet's convolutions too
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
    # Notebook 04's sampler, so validation pictures look like the ones you will make (a sampling.SCHEDULERS name).
    validation_scheduler: str = "DPM++ 2M Karras"
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
                   "prediction_type": (None, "epsilon", "v_prediction"),
                   "validation_scheduler": tuple(SCHEDULERS)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} = {getattr(self, name)!r}; choose one of {allowed}")
        if self.width % 8 or self.height % 8:
            raise ValueError(f"width and height must be multiples of 8 (the VAE downsamples 8x); got {self.width}x{self.height}")
        if self.lora_rank < 0:
            raise ValueError(f"TrainConfig.lora_rank must be 0 (full fine-tune) or a rank such as 8, got {self.lora_rank}")
        if self.lora_conv and not self.lora_rank:
            raise ValueError("TrainConfig.lora_conv (LoCon) adds LoRA layers to the convolutions: set lora_rank too, e.g. 8")
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


def step_seed(seed: int, rank: int, micro_step: int) -> int:
    """Noise and timesteps of each micro-batch come from (seed, rank, micro-step): a resume needs no RNG state."""
    return random.Random(f"{seed}/{rank}/{micro_step}").getrandbits(63)


def speed_text(images: int, seconds: float) -> str:
    """The progress bar's speed: images per second, or seconds per image when under one a second (a CPU's
    47 s step of one image reads 0.0 img/s at one decimal)."""
    if images == 0 or seconds <= 0:
        return "-"
    rate = images / seconds
    return f"{rate:.1f} img/s" if rate >= 1 else f"{seconds / images:.1f} s/img"


def blank_inputs(m: Models, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero latents and text embeddings of one image: something to run a backward on when a process has no data."""
    factor = 2 ** (len(m.vae.config.block_out_channels) - 1)
    device = m.unet.device
    return (torch.zeros(1, m.unet.config.in_channels, cfg.height // factor, cfg.width // factor, device=device),
            torch.zeros(1, m.tokenizer.model_max_length, m.unet.config.cross_attention_dim, device=device))


def micro_step(run: Run, m: Models, unet, optimizer: UNetOptimizer, inputs, micro: int, step: int,
               total_steps: int) -> float | None:
    """Forward and backward of micro-batch number ``micro``: its loss, or None when it had no image. On
    several GPUs a process without images still joins the others' all-reduce of gradients (or they would
    wait for it forever): with a blank input and a loss of weight 0."""
    cfg = run.cfg
    weight = 1.0
    if inputs is None and run.world > 1:
        inputs, weight = blank_inputs(m, cfg), 0.0
    if inputs is None:
        return None
    latents, embeddings = inputs
    generator = torch.Generator(run.device).manual_seed(step_seed(cfg.seed, run.rank, micro))
    optimizer.lr = cfg.lr * lr_factor(step, total_steps, cfg.warmup_ratio, cfg.lr_schedule)
    last_micro = micro % cfg.grad_accum == 0  # gradients are averaged across GPUs only then
    with contextlib.nullcontext() if last_micro else run.accelerator.no_sync(unet):
        with run.autocast:
            loss = diffusion_loss(unet, m.noise_scheduler, latents, embeddings, generator,
                                  cfg.noise_offset, cfg.min_snr_gamma)
        if not torch.isfinite(loss):
            last = checkpoint_dirs(run.checkpoints.folder)
            raise TrainingDiverged(
                f"The loss became {loss.item()} at step {step + 1}; stopped before it reached the "
                f"weights. Last good checkpoint: {last[-1] if last else 'none yet'} (resume=True "
                "continues from it). Try a lower lr, mixed_precision='bf16' or 'fp32', or check the data.")
        optimizer.backward(loss * weight / cfg.grad_accum)
    return loss.item() if weight else None


def measure(run: Run, curve: LossCurve, unet, m: Models, vset: ValidationSet | None, step: int) -> None:
    """The validation loss at ``step``, on the curve (the main process measures it for all)."""
    if vset is not None and run.main:
        curve.add_validation(step, validation_loss(run.unwrap(unet), m.noise_scheduler, vset,
                                                   run.device, run.autocast))


def train(cfg: TrainConfig, on_step=None) -> TrainResult:
    """Run (or resume) the fine-tuning described by ``cfg``. ``on_step(step, loss)`` is called after each step."""
    from tqdm.auto import tqdm

    cfg.check()
    run = Run(cfg)
    say, main, unwrap = run.say, run.main, run.unwrap
    model_id, m = run.load_models()  # the UNet from the checkpoint when resuming, else from the base model

    # Data, and the cache that lets the VAE and text encoder leave the GPU.
    dataset = CaptionedImages(cfg.dataset, cfg.width, cfg.height, cfg.crop, cfg.flip, cfg.buckets, cfg.seed)
    say(caption_fit(m.tokenizer, dataset.texts))  # the tokenizer cuts what is longer, silently
    report = Unreadable(dataset, show=main)
    vset = validation_set(dataset, m, cfg, report)  # before the cache sends the VAE and text encoder away
    cache = cache_dataset(dataset, m, cfg, report, say) if cfg.cache_latents else None
    batches = MicroBatches(cfg, dataset, cache, vset.indices if vset is not None and vset.held_out else [], m,
                           report, run.device, run.rank, run.world)
    total_steps = cfg.max_steps or cfg.epochs * batches.per_epoch // cfg.grad_accum

    # The UNet, its optimizer, and the state of an interrupted run.
    unet, optimizer, ema = run.prepare_unet(m)
    step, state = 0, {}
    if run.resume_from is not None:
        state = resume(run.resume_from, optimizer, ema, cfg.ema_every, run.device, say)
        step = state["step"]
        say(f"Resuming from {run.resume_from} (step {step} of {total_steps}).")
    estimate = run.estimate_memory(unet, m)
    say(estimate)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    samples = ValidationImages(model_id, m, unet, cfg, run.out / "samples", run.device, run.autocast,
                               on=main and bool(cfg.validate_every))
    unet = run.accelerator.prepare(unet)  # DistributedDataParallel on several GPUs, unchanged on one
    curve = LossCurve(live=main, held_out=vset is None or vset.held_out)
    if "curve" in state:
        curve.load_state_dict(state["curve"])
    elif run.resume_from is not None:
        say(f"{run.resume_from} holds no loss history (an older checkpoint): the curve starts at step {step}.")
    snapshot_steps = set() if cfg.lora_rank else {max(1, round(f * total_steps)) for f in cfg.snapshots} - {total_steps}
    if step == 0:
        measure(run, curve, unet, m, vset, 0)
        samples.show(0)

    # The loop: an optimizer step every grad_accum micro-batches, epoch after epoch, to total_steps.
    bar = tqdm(total=total_steps, initial=step, disable=not main, desc="training", unit="step")
    images_done, clock, step_losses, micro = 0, time.perf_counter(), [], step * cfg.grad_accum
    try:
        while step < total_steps:
            for inputs in batches.epoch(*divmod(micro, batches.per_epoch)):
                micro += 1
                loss = micro_step(run, m, unet, optimizer, inputs, micro, step, total_steps)
                if loss is not None:
                    step_losses.append(loss)
                    images_done += len(inputs[0]) * run.world
                if micro % cfg.grad_accum:
                    continue
                optimizer.step()
                step += 1
                if ema is not None and (step % cfg.ema_every == 0 or step == total_steps):
                    ema.update(unwrap(unet), step)
                if step_losses:  # empty only when every image of the step was unreadable
                    curve.add(step, sum(step_losses) / len(step_losses))
                    step_losses = []
                if cfg.val_loss_every and (step % cfg.val_loss_every == 0 or step == total_steps):
                    measure(run, curve, unet, m, vset, step)
                bar.set_postfix(loss=f"{curve.losses[-1]:.4f}" if curve.losses else "-", lr=f"{optimizer.lr:.2e}",
                                speed=speed_text(images_done, time.perf_counter() - clock))
                bar.update()
                curve.draw()
                if on_step is not None:
                    on_step(step, curve.losses[-1] if curve.losses else None)
                if main and step in snapshot_steps:
                    save_snapshot(run.out / "snapshots", step, unwrap(unet))
                if step % cfg.checkpoint_every == 0 and step < total_steps:
                    run.checkpoint(step, unet, optimizer, curve, ema, last=False)
                if cfg.validate_every and step % cfg.validate_every == 0 and step < total_steps:
                    samples.show(step)
                if step == total_steps:
                    break
    except torch.cuda.OutOfMemoryError as e:
        raise RuntimeError(memory.explain_oom(cfg, estimate)) from e
    finally:
        bar.close()

    # The end: the last checkpoint, the loss curve, the final model.
    final = run.out / "final"
    if not curve.losses and ((final / "model_index.json").exists() or (final / lora.WEIGHT_NAME).exists()):
        say(f"This run had already finished ({step} of {total_steps} steps in {run.resume_from}); nothing to do. "
            "Raise max_steps or epochs to train further, or set resume=False to start over.")
        return TrainResult(final, [], report.skipped, None, estimate, history=curve.state_dict())
    peak = run.measured_peak(estimate)
    curve.draw(force=True)
    if main and curve.losses:
        curve.fig.savefig(run.out / "loss.png", dpi=100, bbox_inches="tight")
    if optimizer.partial_steps:
        say(f"{optimizer.partial_steps} of this session's steps were partial: an fp16 gradient overflowed after "
            "some parameters had taken their step (the fused step's design; see UNetOptimizer).")
    run.checkpoint(step, unet, optimizer, curve, ema, last=step == total_steps)
    if ema is not None:  # the final model is the EMA: the last validation images show it
        ema.copy_to(unwrap(unet))
    samples.show(step)
    partial_steps = optimizer.partial_steps
    del optimizer
    run.save_result(model_id, m, unet, final)
    return TrainResult(final, curve.losses, report.skipped, peak, estimate, partial_steps, curve.state_dict())


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
