"""ControlNet: steer Stable Diffusion with an image (edges, a silhouette, a pose) as well as a prompt.

A ControlNet is a trainable copy of the UNet's down blocks and middle block (Zhang et al. 2023). It
reads the noisy latents, the caption and a control image, and adds one residual to each of the
frozen UNet's skip connections. Its output convolutions start at zero, so before training it changes
nothing; training teaches it to move the UNet's picture towards the control. The UNet, VAE and text
encoder stay frozen, so a ControlNet works with any model of the same architecture: the base model
or the learner's fine-tune.

    cn = controlnet_from_unet(pipe.unet)                 # initialised from the UNet (what train_controlnet does)
    result = train_controlnet(ControlNetConfig(model=..., output_dir=...))
    cn = load_controlnet(result.folder)                  # ControlNetModel.from_pretrained, safetensors
    images = generate(pipe, cn, prompts, controls, seeds, conditioning_scale=1.0)

Control images: ``silhouette`` and ``outline`` read the object of a picture of the miniature's world;
``canny`` computes the edge map the canny ControlNets of SD 1.5 were trained on, for any photo.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from . import models, world
from .checkpoints import Checkpoints, resume
from .latent_cache import encode_pixels, encode_texts
from .optimizer import LossScaler, UNetOptimizer
from .runtime import atomic_dir, compute_dtype_for, free_memory
from .train import diffusion_loss, step_seed

# The conditioning embedding: a small convolutional net taking the control image to the latents' size,
# one stride-2 convolution between each pair of these widths. SD 1.5's (diffusers' default): three, 8x
# down, the VAE's factor, which the miniature's VAE shares (64 px -> 8x8).
EMBEDDING_CHANNELS = (16, 32, 96, 256)
# The miniature's: the same three steps, narrower (its UNet is 32 wide, not 320): a sixth of the parameters and
# an eighth of the work, which was most of a training step's time on the CPU.
MINIATURE_EMBEDDING_CHANNELS = (8, 16, 16, 32)
SD15_CANNY = "lllyasviel/control_v11p_sd15_canny"  # canny edges (low 100, high 200) for SD 1.5, safetensors
# The miniature's, trained on silhouettes by scripts/build_miniature_controlnet.py: smoke mode's stand-in for SD15_CANNY.
MINIATURE_CONTROLNET = str(Path(__file__).resolve().parent / "miniature" / "controlnet-silhouette")


def controlnet_from_unet(unet, embedding_channels: tuple[int, ...] = EMBEDDING_CHANNELS, vae_factor: int = 8,
                         seed: int = 0):
    """A ControlNet with the UNet's own down and middle blocks (weights copied), zero-initialised outputs, and
    a conditioning embedding initialised from ``seed`` (so runs repeat)."""
    from diffusers import ControlNetModel

    if 2 ** (len(embedding_channels) - 1) != vae_factor:
        raise ValueError(f"embedding_channels {tuple(embedding_channels)} downsample the control image "
                         f"{2 ** (len(embedding_channels) - 1)}x, the VAE {vae_factor}x: give "
                         f"{int(np.log2(vae_factor)) + 1} widths (e.g. {EMBEDDING_CHANNELS}) so both meet at the latents' size")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(embedding_channels))


# What a ControlNet shares with the UNet it steers: the latents it reads (in_channels), the text embeddings it
# attends to (cross_attention_dim: 768 for SD 1.x's CLIP ViT-L, 1024 for SD 2.x's OpenCLIP ViT-H), and the shapes of
# the residuals it adds to the UNet's skip connections (block_out_channels, layers_per_block).
MATCHING_SETTINGS = ("in_channels", "cross_attention_dim", "block_out_channels", "layers_per_block")


def _setting(config, name):
    value = config.get(name)
    return tuple(value) if isinstance(value, list) else value


def check_compatible(controlnet, unet, model: str | None = None) -> None:
    """Raise a ValueError naming both models, each setting of ``MATCHING_SETTINGS`` they differ in and what to do,
    where ``controlnet`` cannot steer ``unet`` (``model``: the UNet's model, as the learner knows it); else nothing.
    Without this check such a pair fails deep inside the pipeline with a tensor shape error."""
    differ = [f"{name} is {_setting(controlnet.config, name)} in the ControlNet, {_setting(unet.config, name)} in the model"
              for name in MATCHING_SETTINGS if _setting(controlnet.config, name) != _setting(unet.config, name)]
    if differ:
        cn_name = controlnet.config.get("_name_or_path") or "(built in this session)"
        model = model or unet.config.get("_name_or_path") or "(built in this session)"
        raise ValueError(
            f"The ControlNet {cn_name} was not made for the model {model}: {'; '.join(differ)}. A ControlNet only steers "
            "the base model it was trained with and that base's fine-tunes: use a ControlNet made for this model's base "
            f"(SD 1.x ControlNets such as {SD15_CANNY} for SD 1.x models, SD 2.x ControlNets for SD 2.x models), "
            "or train one from this model's UNet (train_controlnet).")


def load_controlnet(folder_or_id: str | Path, dtype=None):
    """``ControlNetModel.from_pretrained`` with safetensors only (a saved folder, or a hub id such as SD15_CANNY)."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(folder_or_id, torch_dtype=dtype, use_safetensors=True)


# --- Control images ---

def _rgb(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB")


def silhouette(picture: Image.Image) -> Image.Image:
    """The picture's object filled white on black: where it is and its shape, not its colour."""
    return _rgb(world.object_mask(picture))


def outline(picture: Image.Image) -> Image.Image:
    """The edge of the picture's object, white on black, about a pixel wide."""
    mask = Image.fromarray(world.object_mask(picture).astype(np.uint8) * 255)
    inside = np.asarray(mask.filter(ImageFilter.MinFilter(3))) > 0
    return _rgb((np.asarray(mask) > 0) & ~inside)


CONTROLS = {"silhouette": silhouette, "outline": outline}


def canny(image: Image.Image, low: float = 100, high: float = 200) -> Image.Image:
    """Canny's edge map, white on black, as ``cv2.Canny(image, low, high)`` computes it (Sobel gradients,
    L1 magnitude, thinned to the ridge, kept where above ``high`` or connected to such a pixel through
    pixels above ``low``): what the canny ControlNets were trained on, without an OpenCV dependency."""
    g = np.asarray(image.convert("L"), dtype=np.float32)
    p = np.pad(g, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    magnitude = np.abs(gx) + np.abs(gy)
    # Thin: a pixel stays where it is at least as strong as both neighbours across the edge
    # (the gradient's direction rounded to 0, 45, 90 or 135 degrees).
    direction = ((np.rad2deg(np.arctan2(gy, gx)) % 180 + 22.5) // 45).astype(int) % 4
    h, w = g.shape
    m = np.pad(magnitude, 1)

    def neighbour(dy: int, dx: int) -> np.ndarray:
        return m[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    ridge = np.zeros((h, w), dtype=bool)
    for k, (dy, dx) in enumerate([(0, 1), (1, 1), (1, 0), (1, -1)]):
        ridge |= (direction == k) & (magnitude >= neighbour(dy, dx)) & (magnitude >= neighbour(-dy, -dx))
    weak = ridge & (magnitude >= low)
    edges = ridge & (magnitude >= high)
    while True:  # hysteresis: grow the strong edges into touching weak pixels until nothing changes
        e = np.pad(edges, 1)
        grown = weak & np.logical_or.reduce([e[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                                             for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
        if (grown == edges).all():
            return _rgb(edges)
        edges = grown


def control_at(shape: str, corner: str, size: int = 64, kind: str = "silhouette") -> Image.Image:
    """A control image of ``shape`` in one corner ("top left", "bottom right", ...), where the base
    miniature seldom draws its object: drawn at 128 px and resized, as ``world.scenes`` draws."""
    r = 128 // 5
    x = r if "left" in corner else 128 - r
    y = r if "top" in corner else 128 - r
    picture = world.draw(shape, "red", "white", random.Random(0), size=128, at=(x, y, r))
    return CONTROLS[kind](picture.resize((size, size), Image.BICUBIC))


CORNERS = ("top left", "top right", "bottom left", "bottom right")


def corner_prompts(n: int, seed: int = 1) -> tuple[list[str], list[Image.Image]]:
    """``n`` prompts of the base world, each with a silhouette of its shape in a corner, the corners in turn."""
    rng, prompts, controls = random.Random(seed), [], []
    for i in range(n):
        shape = rng.choice(world.BASE_SHAPES)
        prompts.append(world.caption(shape, rng.choice(world.BASE_COLOURS), rng.choice(list(world.BACKGROUNDS))))
        controls.append(control_at(shape, CORNERS[i % 4]))
    return prompts, controls


def in_region(picture: Image.Image, control: Image.Image) -> bool:
    """Whether the centre of the picture's object lies within the bounding box of the control's white part."""
    found, region = world.object_box(world.object_mask(picture)), world.object_box(np.asarray(control.convert("L")) > 127)
    if found is None or region is None:
        return False
    cx, cy = (found[0] + found[2]) / 2, (found[1] + found[3]) / 2
    return region[0] <= cx <= region[2] and region[1] <= cy <= region[3]


# --- Sampling with a ControlNet, from the loaded components ---

def controlnet_pipeline(pipe, controlnet):
    """A ``StableDiffusionControlNetPipeline`` of ``pipe``'s own components (its UNet, the fine-tune's, LoRAs
    included) and ``controlnet``: no second download and no second copy in memory."""
    from diffusers import StableDiffusionControlNetPipeline

    from .sampling import _same_components

    check_compatible(controlnet, pipe.unet, pipe.name_or_path)
    if (controlnet.device, controlnet.dtype) != (pipe.device, pipe.unet.dtype):
        controlnet.to(pipe.device, pipe.unet.dtype)
    return _same_components(StableDiffusionControlNetPipeline, pipe, controlnet=controlnet)


def check_control_size(controls: list[Image.Image], width: int, height: int, where: str = "control image") -> None:
    for i, control in enumerate(controls):
        if control.size != (width, height):
            raise ValueError(
                f"{where} {i} is {control.size[0]}x{control.size[1]}, the picture {width}x{height}: compute the "
                f"control from a picture of that size, or resize it first (control.resize(({width}, {height})))")


@torch.no_grad()
def generate(pipe, controlnet, prompts: list[str], controls: list[Image.Image], seeds: list[int], steps: int = 30,
             guidance_scale: float = 7.5, conditioning_scale: float = 1.0, negative_prompt: str | None = None,
             width: int | None = None, height: int | None = None) -> list[Image.Image]:
    """One picture per (prompt, control, seed), at the model's own size unless ``width``/``height`` say
    (512 px for SD 1.5, 64 for the miniature), each control of that size; ``controlnet=None``: the same
    prompts and seeds without control. ``conditioning_scale`` weights the ControlNet's residuals
    (0: none, 1: as trained; the web UIs call it the control weight)."""
    if not len(prompts) == len(controls) == len(seeds):
        raise ValueError(f"one control image and one seed per prompt: got {len(prompts)} prompts, "
                         f"{len(controls)} controls, {len(seeds)} seeds")
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width, height = width or native, height or native
    # The pipeline would stretch a control of another size without a word, and the shape land elsewhere.
    check_control_size(controls, width, height)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    common = dict(num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
                  negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None, generator=generators)
    if controlnet is None:
        return pipe(prompts, **common).images
    return controlnet_pipeline(pipe, controlnet)(prompts, image=controls, controlnet_conditioning_scale=conditioning_scale,
                                                 **common).images


def region_rate(pipe, controlnet, prompts: list[str], controls: list[Image.Image], seed: int = 0, steps: int = 20,
                batch: int = 16, **kwargs) -> float:
    """Share of pictures whose object lies where its control image says (``in_region``), seeds ``seed``,
    ``seed + 1``, ...; with ``controlnet=None`` the same prompts and seeds without control."""
    hits = 0
    for start in range(0, len(prompts), batch):
        end = min(start + batch, len(prompts))
        images = generate(pipe, controlnet, prompts[start:end], controls[start:end], list(range(seed + start, seed + end)),
                          steps=steps, **kwargs)
        hits += sum(in_region(img, control) for img, control in zip(images, controls[start:end]))
    return hits / len(prompts)


# --- Training ---

@dataclass
class ControlNetConfig:
    """A ControlNet run: the UNet, VAE and text encoder of ``model`` frozen, only the ControlNet learns."""

    model: str                           # pipeline folder or hub id: the model the ControlNet learns to steer
    output_dir: str                      # the ControlNet goes to output_dir/controlnet, checkpoints to output_dir/checkpoints
    control: str = "silhouette"          # for the miniature's pairs: "silhouette" or "outline"
    pictures: int = 512                  # the miniature's pairs drawn by world.scenes (when no pairs are given)
    size: int = 512                      # of the pictures and control images (the miniature: 64)
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-5                     # SD 1.5's ControlNet training (diffusers' example); the miniature takes far more
    optimizer: str = "adamw8bit"         # "adamw8bit" (bitsandbytes) or "adamw"
    mixed_precision: str = "auto"        # as TrainConfig: fp16 on a T4, bf16 from compute capability 8.0, fp32 on CPU
    gradient_checkpointing: bool = True
    seed: int = 0
    embedding_channels: tuple[int, ...] = EMBEDDING_CHANNELS
    checkpoint_every: int = 500          # a resumable checkpoint every N steps and at the last (as TrainConfig's)
    keep_checkpoints: int = 2
    resume: bool = True                  # continue from the newest checkpoint (local_checkpoints or output_dir) if there is one
    # As TrainConfig's: resumable checkpoints on a fast disk that does not last (Colab's /content) instead of
    # output_dir; output_dir/checkpoints (on Drive) then holds only a copy of the newest, made every copy_every steps.
    local_checkpoints: str | None = None
    copy_every: int = 2000


@dataclass
class ControlNetResult:
    folder: Path                         # ControlNetModel.from_pretrained(folder) loads it
    controlnet: torch.nn.Module          # the trained model itself
    losses: list[float] = field(default_factory=list)  # one per step of the whole run, resumed sessions included
    seconds: float = 0.0


def world_pairs(n: int, size: int = 64, control: str = "silhouette", seed: int = 0):
    """``n`` (control image, picture, caption) of the miniature's world: base colours and shapes at random places."""
    if control not in CONTROLS:
        raise ValueError(f"ControlNetConfig.control = {control!r}; choose one of {tuple(CONTROLS)}")
    return [(CONTROLS[control](img), img, text) for text, img in world.scenes(n, seed=seed, size=size)]


def folder_pairs(folder: str | Path, size: int = 512, low: float = 100, high: float = 200):
    """(canny edges, picture, caption) of a captioned dataset folder (notebook 01's: images and metadata.csv
    with file_name,text), each picture centre-cropped to ``size`` x ``size``: the pairs of a canny ControlNet."""
    from PIL import ImageOps

    from .data import read_metadata

    metadata = Path(folder) / "metadata.csv"
    if not metadata.exists():
        raise FileNotFoundError(f"{metadata} is missing: a dataset folder holds its images and a metadata.csv with "
                                "columns file_name,text (notebooks 01 and 02 write one)")
    pairs = []
    for file_name, text in read_metadata(folder)[["file_name", "text"]].itertuples(index=False):
        picture = ImageOps.fit(Image.open(Path(folder) / file_name).convert("RGB"), (size, size), Image.BICUBIC)
        pairs.append((canny(picture, low, high), picture, text))
    return pairs


def _pixels(images: list[Image.Image]) -> torch.Tensor:
    """Pictures as the VAE reads them, in [-1, 1] (a ControlNet reads its control image in [0, 1])."""
    a = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in images]))
    return a.permute(0, 3, 1, 2) * 2 - 1


class Controlled(torch.nn.Module):
    """The frozen UNet with the ControlNet's residuals added, called as ``diffusion_loss`` calls a UNet."""

    def __init__(self, unet, controlnet, control: torch.Tensor):
        super().__init__()
        self.unet, self.controlnet, self.control = unet, controlnet, control

    def forward(self, noisy, timesteps, embeddings):
        down, middle = self.controlnet(noisy, timesteps, encoder_hidden_states=embeddings,
                                       controlnet_cond=self.control, return_dict=False)
        return self.unet(noisy, timesteps, embeddings, down_block_additional_residuals=down,
                         mid_block_additional_residual=middle)


def train_controlnet(cfg: ControlNetConfig, pairs=None, on_step=None) -> ControlNetResult:
    """Train a ControlNet, initialised from ``cfg.model``'s UNet, on ``pairs`` of (control image, picture,
    caption), by default ``world_pairs``; the course's loss (``train.diffusion_loss``) and memory recipe:
    latents and text embeddings cached, then the VAE and text encoder leave; 8-bit AdamW stepped inside
    the backward pass; fp16 autocast with loss scaling on a T4; gradient checkpointing. ``on_step(step, loss)``.

    Resumable as ``train.train``: a checkpoint (the ControlNet's weights, the optimizer, the data order, the losses)
    every ``cfg.checkpoint_every`` steps and at the last, each written aside and renamed, in ``output_dir`` or
    ``cfg.local_checkpoints`` with a copy of the newest in ``output_dir`` (``checkpoints.Checkpoints``); called again
    with the same ``output_dir`` it continues from the newest of either and ends with the weights of an
    uninterrupted run. The final ControlNet is written aside and renamed too: ``output_dir/controlnet`` is whole
    or absent."""
    if cfg.optimizer not in ("adamw8bit", "adamw"):
        raise ValueError(f"ControlNetConfig.optimizer = {cfg.optimizer!r}; choose 'adamw8bit' (bitsandbytes) or 'adamw'")
    for name in ("checkpoint_every", "keep_checkpoints", "copy_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"ControlNetConfig.{name} must be at least 1, got {getattr(cfg, name)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype_for(cfg.mixed_precision, device)
    pairs = world_pairs(cfg.pictures, cfg.size, cfg.control, cfg.seed) if pairs is None else list(pairs)
    controls, pictures, captions = zip(*pairs)
    check_control_size(list(controls), cfg.size, cfg.size, "control image of pair")
    check_control_size(list(pictures), cfg.size, cfg.size, "picture of pair")
    m = models.load_models(cfg.model, frozen_dtype=dtype)

    # The cache: each picture through the VAE and each caption through the text encoder, once.
    m.vae.to(device)
    m.text_encoder.to(device)
    latents = torch.cat([encode_pixels(m.vae, _pixels(pictures[i:i + 32])).float().cpu()
                         for i in range(0, len(pictures), 32)])
    texts = sorted(set(captions))
    table = dict(zip(texts, encode_texts(m.tokenizer, m.text_encoder, texts).float().cpu()))
    embeddings = torch.stack([table[c] for c in captions])
    control_pixels = torch.from_numpy(np.stack([np.asarray(c.convert("RGB")) for c in controls])).permute(0, 3, 1, 2)
    m.vae.to("cpu")
    m.text_encoder.to("cpu")
    free_memory()

    checkpoints = Checkpoints.of(cfg, subfolder="controlnet")
    checkpoints.remove_unfinished()
    start = checkpoints.newest() if cfg.resume else None
    if start is None:
        controlnet = controlnet_from_unet(m.unet, cfg.embedding_channels,
                                          2 ** (len(m.vae.config.block_out_channels) - 1), cfg.seed)
    else:  # its fp32 weights as they were at that step
        controlnet = load_controlnet(start / "controlnet")
        check_compatible(controlnet, m.unet, cfg.model)
    unet = m.unet.requires_grad_(False).to(device)
    if dtype != torch.float32:
        unet.to(dtype)  # frozen: its half-precision copy is all it needs
    controlnet.to(device).train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        controlnet.enable_gradient_checkpointing()
    optimizer = UNetOptimizer(list(controlnet.parameters()), cfg.optimizer, cfg.lr, LossScaler(dtype == torch.float16),
                              fused=True)
    autocast = torch.autocast(device.type, dtype) if dtype != torch.float32 else contextlib.nullcontext()
    order = torch.Generator().manual_seed(cfg.seed)
    losses, first = [], 0
    if start is not None:  # the noise needs no state (step_seed); the batches' order does
        state = resume(start, optimizer, None, 1, device, print)
        first, losses = state["step"], state["losses"]
        order.set_state(state["order"])
        print(f"Resuming from {start} (step {first} of {cfg.steps})."
              + (" Nothing left to train: raise steps to train further, or set resume=False to start over."
                 if first >= cfg.steps else ""))
    clock = time.perf_counter()
    for step in range(first, cfg.steps):
        batch = torch.randint(0, len(pairs), (cfg.batch_size,), generator=order)
        generator = torch.Generator(device).manual_seed(step_seed(cfg.seed, 0, step))
        with autocast:
            model = Controlled(unet, controlnet, control_pixels[batch].to(device, torch.float32) / 255)
            loss = diffusion_loss(model, m.noise_scheduler, latents[batch].to(device), embeddings[batch].to(device),
                                  generator)
        optimizer.backward(loss)
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            checkpoints.save(step + 1, controlnet, {"step": step + 1, "optimizer": optimizer.state_dict(),
                                                    "losses": losses, "order": order.get_state()},
                             None, last=step + 1 == cfg.steps)
    folder = Path(cfg.output_dir) / "controlnet"
    with atomic_dir(folder) as tmp:
        controlnet.save_pretrained(tmp, safe_serialization=True)
    return ControlNetResult(folder, controlnet.eval(), losses, time.perf_counter() - clock)


def miniature_config(model: str, output_dir: str) -> ControlNetConfig:
    """The miniature's run, measured (tests/test_controlnet.py): after 600 steps (about 90 s on one CPU thread)
    the object lands in the control's corner in most pictures; at 400 steps it may not yet (a ControlNet learns
    suddenly, after a stretch of no visible effect: Zhang et al.'s "sudden convergence")."""
    return ControlNetConfig(model=model, output_dir=output_dir, size=64, steps=600, batch_size=8, lr=2e-3, optimizer="adamw",
                            mixed_precision="fp32", gradient_checkpointing=False,
                            embedding_channels=MINIATURE_EMBEDDING_CHANNELS)


def controlnet_shape(unet):
    """The ControlNet ``controlnet_from_unet`` makes from ``unet`` (SD's conditioning embedding), on the meta
    device: its parameters' shapes, no memory."""
    from diffusers import ControlNetModel

    with torch.device("meta"):
        return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING_CHANNELS,
                                         load_weights_from_unet=False)


def controlnet_parameters(sd2: bool = False) -> int:
    """Parameters of SD 1.5's (or SD 2's) ControlNet, counted on the meta device (no memory, no download)."""
    from .memory import unet_shape

    return sum(p.numel() for p in controlnet_shape(unet_shape(sd2)).parameters())


def estimate_training_memory(batch_size: int = 1, size: int = 512):
    """Estimated peak GPU memory of training SD 1.5's ControlNet with ``train_controlnet``'s recipe (fp16
    autocast, 8-bit AdamW stepped in the backward pass, gradient checkpointing, cached latents and text
    embeddings), from the shapes alone (PyTorch's meta device: no download, no memory)."""
    from . import memory

    unet = memory.sd15_unet_shape()
    cn = controlnet_shape(unet)
    part = memory.estimate_peak(cn, memory.SD15_FROZEN_PARAMS, batch_size=batch_size, width=size, height=size,
                                half_precision=True, optimizer="adamw8bit", fused_step=True,
                                gradient_checkpointing=True, cache_latents=True).parts
    n_unet = sum(p.numel() for p in unet.parameters())
    n_cn = sum(p.numel() for p in cn.parameters())
    parts = {f"ControlNet weights (fp32, {n_cn / 1e6:.0f}M parameters)": part.pop("UNet weights (fp32 master copy)"),
             **{f"ControlNet {k}": v for k, v in part.items() if k != "activations"},
             # The ControlNet's activations counted as a whole UNet's (it is the down half and the middle): an upper bound.
             "ControlNet activations (a UNet's, at most)": part["activations"],
             "frozen UNet weights (fp16)": 2 * n_unet / memory.GIB,
             "frozen UNet activations": part["activations"]}
    return memory.MemoryEstimate(parts, f"SD 1.5's ControlNet, batch {batch_size}, {size} px")
