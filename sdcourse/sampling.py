"""Generating images: fixed seeds, schedulers by name, FreeU, swapping UNets, watching the steps.

    set_scheduler(pipe, "DPM++ 2M Karras")
    images = generate(pipe, ["a girl in a maid outfit holding a teapot"], seeds=[0, 1], steps=30)
    per_model = generate_per_unet(pipe, {"base": pipe.unet, "fine-tuned": "outputs/finetune/final"}, ...)
    trace = trace_denoising(pipe, prompt, seed=0, steps=40, capture=(1, 5, 10, 20, 30, 40))
    strip = img2img_strip(pipe, picture, "a watercolour painting", strengths=[0.3, 0.6, 0.9], seed=0)

The base model and its fine-tunes share the VAE, the text encoder and the tokenizer (only the UNet
is trained), so one pipeline serves them all: swapping its UNet costs one UNet in memory
(1.7 GB in fp16 for SD 1.5), not a second pipeline.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

# Scheduler name -> (diffusers class, settings). The settings are explicit so that switching from one
# scheduler to another never carries a setting over (Karras sigmas, for one). Every scheduler is
# built from the model's own scheduler config, so the prediction type and noise schedule the model
# was trained with are kept.
SCHEDULERS = {
    "DDIM": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1)),
    "Euler": ("EulerDiscreteScheduler", dict(use_karras_sigmas=False)),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler",
                        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)),
    "PNDM": ("PNDMScheduler", dict(skip_prk_steps=True)),
}

# FreeU's settings recommended by its authors (github.com/ChenyangSi/FreeU) for SD 1.x and SD 2.x.
FREEU_SD1 = dict(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
FREEU_SD2 = dict(s1=0.9, s2=0.2, b1=1.1, b2=1.2)


def set_scheduler(pipe, name: str) -> None:
    """Give the pipeline the named scheduler (see ``SCHEDULERS``), keeping the model's noise schedule."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}.")
    class_name, settings = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **settings)


def scheduler_name(pipe) -> str:
    """The ``SCHEDULERS`` name of the pipeline's scheduler (for recording settings)."""
    cls, config = type(pipe.scheduler).__name__, pipe.scheduler.config
    for name, (class_name, settings) in SCHEDULERS.items():
        if class_name == cls and all(config.get(key) == value for key, value in settings.items()):
            return name
    return cls


def set_freeu(pipe, enabled: bool) -> None:
    """FreeU re-weights the UNet decoder's backbone and skip features at sampling time; no training."""
    if not enabled:
        pipe.disable_freeu()
        return
    sd2 = pipe.unet.config.cross_attention_dim == 1024  # SD 2.x conditions on OpenCLIP ViT-H (1024 wide)
    pipe.enable_freeu(**(FREEU_SD2 if sd2 else FREEU_SD1))


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = 30, guidance_scale: float = 7.5,
             height: int | None = None, width: int | None = None, negative_prompt: str | None = None,
             *, freeu: bool = False, loras: dict | None = None) -> list[Image.Image]:
    """One image per (prompt, seed), prompt-major: [p0s0, p0s1, ..., p1s0, ...]. Same seeds, same images.

    The starting noise comes from a CPU generator, so a seed gives the same starting noise on any device.
    ``loras`` (name -> folder or file): prompts may stack them as the web UIs do, ``<lora:name:0.8>``
    (``lora.apply_lora_tags``); a prompt without tags runs without LoRA.
    """
    from .lora import apply_lora_tags

    set_freeu(pipe, freeu)
    images = []
    for prompt in prompts:
        if loras is not None:
            prompt = apply_lora_tags(pipe, prompt, loras)
        for seed in seeds:
            images += pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                           guidance_scale=guidance_scale, height=height, width=width,
                           generator=torch.Generator("cpu").manual_seed(seed)).images
    return images


def generate_xy(pipe, prompt: str, seed: int, x_name: str, x_values: list, y_name: str, y_values: list,
                **settings) -> list[Image.Image]:
    """One image per (y, x) pair of two settings, row-major (a row per y value): an X/Y plot's cells.

    The settings are ``generate``'s keywords (steps, guidance_scale, negative_prompt, freeu, ...) or
    ``"scheduler"`` (a ``SCHEDULERS`` name); the pipeline's scheduler is restored afterwards.
    """
    original_scheduler = pipe.scheduler
    images = []
    try:
        for y in y_values:
            for x in x_values:
                cell = {**settings, x_name: x, y_name: y}
                if "scheduler" in cell:
                    set_scheduler(pipe, cell.pop("scheduler"))
                images += generate(pipe, [prompt], [seed], **cell)
    finally:
        pipe.scheduler = original_scheduler
    return images


# --- Base model vs fine-tuned UNets ---

def load_unet(folder: str | Path, dtype=None, device=None):
    """The UNet of a pipeline folder or a training checkpoint (both keep it in ``unet/``)."""
    from diffusers import UNet2DConditionModel

    if not (Path(folder) / "unet").is_dir():
        raise FileNotFoundError(f"No unet/ folder in {folder}: expected a pipeline folder "
                                "(finetune/final) or a checkpoint (finetune/checkpoints/step-000500).")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, use_safetensors=True)
    return unet.to(device) if device is not None else unet


def finetuned_unets(outputs: str | Path) -> dict[str, Path]:
    """Notebook 03's results under ``outputs/finetune``: each comparison snapshot by step (``snapshots/``,
    small fp16 UNets kept for this; the resumable checkpoints are not), then the final model."""
    finetune = Path(outputs) / "finetune"
    snapshots = {int(m.group(1)): d for d in (finetune / "snapshots").glob("step-*")
                 if (m := re.fullmatch(r"step-(\d+)", d.name)) and (d / "unet").is_dir()}
    found = {f"step {step}": snapshots[step] for step in sorted(snapshots)}
    if (finetune / "final" / "unet").is_dir():
        found["fine-tuned"] = finetune / "final"
    return found


@contextmanager
def unet_swapped(pipe, unet):
    """Run the pipeline with another UNet; the original comes back afterwards, even after an error."""
    original = pipe.unet
    pipe.unet = unet
    try:
        yield pipe
    finally:
        pipe.unet = original


def generate_per_unet(pipe, unets: dict, prompts: list[str], seeds: list[int],
                      **settings) -> dict[str, list[Image.Image]]:
    """``generate`` with each UNet in turn: a loaded model, or a folder loaded, used and freed.

    Only one extra UNet is in memory at a time, so a T4 can walk through many checkpoints.
    """
    from .runtime import free_memory

    results = {}
    for label, unet in unets.items():
        loaded = load_unet(unet, pipe.unet.dtype, pipe.device) if isinstance(unet, (str, Path)) else unet
        with unet_swapped(pipe, loaded):
            results[label] = generate(pipe, prompts, seeds, **settings)
        del loaded
        free_memory()
    return results


# --- img2img and inpainting, with the same loaded model ---

def img2img_pipeline(pipe):
    """An img2img pipeline made of ``pipe``'s own components (its UNet, LoRAs included): no second
    download and no second copy in memory."""
    from diffusers import StableDiffusionImg2ImgPipeline

    return _same_components(StableDiffusionImg2ImgPipeline, pipe)


def inpaint_pipeline(pipe):
    """An inpainting pipeline made of ``pipe``'s own components.

    With an ordinary 4-channel UNet (SD 1.5, the learner's fine-tune) diffusers inpaints by denoising
    everything and, after every step, putting back the original picture's latents (noised to that step)
    outside the mask. The inpainting-specific UNets (``stable-diffusion-v1-5/stable-diffusion-inpainting``)
    read 9 channels instead, the noisy latents plus the masked picture's latents and the mask, and were
    trained for it: their seams are cleaner, but they are another 3.4 GB model and not your fine-tune.
    """
    from diffusers import StableDiffusionInpaintPipeline

    return _same_components(StableDiffusionInpaintPipeline, pipe)


def _same_components(pipeline_class, pipe, **extra):
    new = pipeline_class(**{**pipe.components, "requires_safety_checker": False}, **extra)
    new.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return new


@torch.no_grad()
def img2img_strip(pipe, image: Image.Image, prompt: str, strengths: list[float], seed: int, steps: int = 30,
                  guidance_scale: float = 7.5, negative_prompt: str | None = None) -> list[Image.Image]:
    """``image`` redrawn from ``prompt`` at each strength: the share of the noise schedule it is sent back
    through (0.3: light noise, the picture's layout stays; 1.0: pure noise, the picture is forgotten).
    Only ``steps * strength`` steps run."""
    if any(not 0 < s <= 1 for s in strengths):
        raise ValueError(f"img2img strengths must lie in (0, 1], got {strengths}")
    i2i = img2img_pipeline(pipe)
    return [i2i(prompt, image=image, strength=s, num_inference_steps=steps, guidance_scale=guidance_scale,
                negative_prompt=negative_prompt, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
            for s in strengths]


@torch.no_grad()
def inpaint(pipe, image: Image.Image, mask: Image.Image, prompt: str, seeds: list[int], steps: int = 30,
            guidance_scale: float = 7.5, negative_prompt: str | None = None,
            keep_outside: bool = True) -> list[Image.Image]:
    """Redraw the white part of ``mask`` (black: keep) from ``prompt``, one picture per seed.

    The pipeline keeps the original's latents outside the mask, but the VAE decoder mixes neighbouring
    latents (its attention layer, all of them), so pixels outside drift: faintly on SD 1.5, strongly on
    the 64 px miniature, whose decoder sees the whole picture from 8x8 latents. ``keep_outside`` pastes
    the original pixels back outside the mask, as the web UIs do.
    """
    if mask.size != image.size:
        raise ValueError(f"the mask is {mask.size[0]}x{mask.size[1]} and the picture {image.size[0]}x{image.size[1]}: "
                         "draw the mask at the picture's size (white = redraw, black = keep)")
    painter = inpaint_pipeline(pipe)
    images = [painter(prompt, image=image, mask_image=mask, num_inference_steps=steps, guidance_scale=guidance_scale,
                      negative_prompt=negative_prompt, height=image.height, width=image.width,
                      generator=torch.Generator("cpu").manual_seed(seed)).images[0] for seed in seeds]
    if keep_outside:
        images = [Image.composite(im, image.convert("RGB"), mask.convert("L")) for im in images]
    return images


# --- Latents <-> pixels ---

@torch.no_grad()
def encode_images(pipe, images: list[Image.Image]) -> torch.Tensor:
    """Pixels -> the scaled latents the UNet works on (mean of the VAE posterior, times scaling_factor)."""
    pixels = pipe.image_processor.preprocess(images).to(pipe.device, pipe.vae.dtype)
    return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """Scaled latents [n, 4, h, w] -> PIL images through the full VAE decoder, one at a time (memory stays flat)."""
    images = []
    for z in latents.to(pipe.device, pipe.vae.dtype) / pipe.vae.config.scaling_factor:
        images += pipe.image_processor.postprocess(pipe.vae.decode(z[None]).sample, output_type="pil")
    return images


# --- Watching the denoising steps ---

@dataclass
class DenoisingTrace:
    """What one generation looked like at the captured steps (latents on the CPU, float32)."""
    prompt: str
    seed: int
    total_steps: int
    steps: list[int]          # 1-based step numbers, as in "step 10 of 40"
    timesteps: list[float]    # the scheduler's timestep at each captured step (999 = pure noise)
    latents: list[torch.Tensor]  # the noisy latent after the step, [4, h, w], on the VAE's scale
    x0: list[torch.Tensor]       # the scheduler's estimate of the finished latent at that step
    image: Image.Image           # the final picture


@torch.no_grad()
def trace_denoising(pipe, prompt: str, seed: int, steps: int, capture: list[int], guidance_scale: float = 7.5,
                    height: int | None = None, width: int | None = None,
                    negative_prompt: str | None = None) -> DenoisingTrace:
    """Generate once and keep the latent and the predicted clean latent (x0) at the ``capture`` steps.

    The pipeline's ``callback_on_step_end`` hands us the latent after each step. The x0 estimate is
    what the scheduler itself computes inside its step (``pred_original_sample``): DDIM, Euler and
    Euler a report it; use one of those for this view.
    """
    wanted = sorted(set(capture))
    if not wanted or wanted[0] < 1 or wanted[-1] > steps:
        raise ValueError(f"capture steps must lie between 1 and steps={steps}, got {list(capture)}.")
    scheduler = pipe.scheduler
    last_x0 = {}
    scheduler_step = scheduler.step

    def step_keeping_x0(*args, **kwargs):
        out = scheduler_step(*args, **kwargs)
        x0 = out[1] if isinstance(out, tuple) and len(out) > 1 else getattr(out, "pred_original_sample", None)
        if x0 is None:
            raise ValueError(f"{type(scheduler).__name__} does not report its x0 estimate; "
                             "trace with DDIM, Euler or Euler a (set_scheduler(pipe, 'DDIM')).")
        last_x0["x0"] = x0
        return out

    trace = DenoisingTrace(prompt, seed, steps, [], [], [], [], image=None)

    def on_step_end(pipe, i, t, tensors):
        if i + 1 in wanted:
            latents = tensors["latents"]
            sigmas = getattr(scheduler, "sigmas", None)
            if sigmas is not None and scheduler.step_index is not None:
                # Euler-family latents are x0 + sigma * noise, sqrt(sigma^2 + 1) times larger than the
                # VAE's scale (DDIM's are on it): divided, they decode to a picture, not a blow-out.
                latents = latents / (sigmas[scheduler.step_index].to(latents.device) ** 2 + 1) ** 0.5
            trace.steps.append(i + 1)
            trace.timesteps.append(float(t))
            trace.latents.append(latents[0].float().cpu())
            trace.x0.append(last_x0["x0"][0].float().cpu())
        return tensors

    scheduler.step = step_keeping_x0  # on this instance only, for this one generation
    try:
        trace.image = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                           guidance_scale=guidance_scale, height=height, width=width,
                           generator=torch.Generator("cpu").manual_seed(seed),
                           callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"]).images[0]
    finally:
        del scheduler.step
    return trace
