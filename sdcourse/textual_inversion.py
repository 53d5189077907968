"""Textual Inversion: teach the model a new word instead of changing the model.

The UNet, VAE and text encoder all stay frozen. A new token (``<my-style>``) is added to the
tokenizer, its embedding row starts as a related word's ("painting"), and only that row is trained,
with the same diffusion loss as the fine-tune: the result is a few kilobytes that any copy of the base
model can load. It needs the least GPU memory of all methods (gradients flow through the frozen UNet
to one vector), at the price of expressiveness: a word can only point at what the model can already draw.

The saved file is ``learned_embeds.safetensors`` with one tensor ``emb_params`` [vectors, width], the
AUTOMATIC1111 web UI's embedding format, which diffusers' ``pipe.load_textual_inversion`` also reads.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import models
from .latent_cache import encode_pixels
from .optimizer import LossScaler
from .runtime import compute_dtype_for
from .train import diffusion_loss, step_seed
from .training_set import CaptionedImages

# Captions are made from templates so the token learns what the images share, not their captions.
TEMPLATES = {
    "style": ["a painting in the style of {}", "a picture in the style of {}", "an image in the style of {}",
              "a drawing in the style of {}", "artwork in the style of {}", "a small picture in the style of {}"],
    "object": ["a photo of a {}", "a picture of a {}", "an image of the {}", "a close-up photo of the {}",
               "a photo of a small {}", "a rendering of a {}"],
}


@dataclass
class TIConfig:
    model: str = "sd15"                  # preset, hub id or local folder
    dataset: str = "outputs/dataset"     # a folder of images, with or without metadata.csv (captions are not used)
    output_dir: str = "outputs/textual_inversion"
    token: str = "<my-style>"            # the new word; pick one the tokenizer does not know
    init_word: str = "painting"          # its embedding starts from this word's
    what: str = "style"                  # "style" or "object": which caption templates
    steps: int = 1500
    batch_size: int = 4
    lr: float = 5e-4                     # large: one vector moves, nothing else can break
    resolution: int = 512
    mixed_precision: str = "auto"
    seed: int = 0


@dataclass
class TIResult:
    embedding_file: Path
    losses: list[float]
    tokenizer: object      # with the new token
    text_encoder: object   # with the learned vector, ready to sample with
    overflow_steps: int = 0    # fp16: steps skipped because the scaled gradient overflowed
    loss_scale: float = 1.0    # fp16: the loss scale at the end


def add_token(tokenizer, text_encoder, token: str, init_word: str) -> int:
    """Add ``token`` with ``init_word``'s embedding; return its id."""
    if tokenizer.add_tokens([token]) != 1:
        raise ValueError(f"The tokenizer already knows {token!r}: choose a new word, e.g. <my-{token.strip('<>')}>.")
    init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if len(init_ids) != 1:
        raise ValueError(f"init_word {init_word!r} is {len(init_ids)} tokens; choose a word that is a single token.")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the new row is set just below
    token_id = tokenizer.convert_tokens_to_ids(token)
    weights = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weights[token_id] = weights[init_ids[0]]
    return token_id


def train_embedding(cfg: TIConfig, on_step=None) -> TIResult:
    """Train the new token's embedding; ``on_step(step, loss)`` is called after each step."""
    from tqdm.auto import tqdm

    if cfg.what not in TEMPLATES:
        raise ValueError(f"TIConfig.what = {cfg.what!r}; choose one of {sorted(TEMPLATES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype_for(cfg.mixed_precision, device)
    # Loaded in fp32, never through a half-precision copy: the text encoder's embedding table holds
    # the one trained vector and Adam's state (and every other word's exact row); the VAE encodes the
    # few images once, and fp32 cannot overflow there.
    m = models.load_models(models.resolve(cfg.model, smoke=False), frozen_dtype=torch.float32)
    m.text_encoder.to(device)
    m.unet.requires_grad_(False).to(device)
    if dtype != torch.float32:  # frozen: no fp32 master copy needed
        m.unet.to(dtype=dtype)
    m.unet.enable_gradient_checkpointing()  # activations of the frozen UNet are what the backward pass needs
    m.vae.to(device)
    token_id = add_token(m.tokenizer, m.text_encoder, cfg.token, cfg.init_word)
    embeddings = m.text_encoder.get_input_embeddings().weight
    embeddings.requires_grad_(True)
    others = torch.arange(len(embeddings), device=device) != token_id
    original = embeddings.detach().clone()

    images = CaptionedImages(cfg.dataset, cfg.resolution, cfg.resolution, crop="center", seed=cfg.seed, captions=False)
    latents = []
    for i in range(len(images)):  # a style or an object: a handful of images, encoded once
        item = images[i]
        if "pixels" in item:
            latents.append(encode_pixels(m.vae, item["pixels"][None]).cpu())
        else:
            print(f"Skipping {images.files[i]}: {item['error']}")
    if not latents:
        raise ValueError(f"No readable image in {cfg.dataset}.")
    m.vae.to("cpu")

    optimizer = torch.optim.AdamW([embeddings], lr=cfg.lr, weight_decay=0.0)
    # The gradient reaches the vector through the frozen fp16 UNet: unscaled, much of it underflows.
    scaler = LossScaler(dtype == torch.float16)
    rng = random.Random(cfg.seed)
    losses, overflow_steps = [], 0
    for step in tqdm(range(cfg.steps), desc="textual inversion"):
        batch = torch.cat(rng.choices(latents, k=cfg.batch_size)).to(device)
        prompts = [rng.choice(TEMPLATES[cfg.what]).format(cfg.token) for _ in range(cfg.batch_size)]
        ids = m.tokenizer(prompts, padding="max_length", max_length=m.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids.to(device)
        generator = torch.Generator(device).manual_seed(step_seed(cfg.seed, 0, step))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = diffusion_loss(m.unet, m.noise_scheduler, batch, m.text_encoder(ids)[0], generator)
        (loss * scaler.scale).backward()
        finite = scaler.unscale_(embeddings.grad)
        if finite:  # an overflow skips the step, as in the training loop
            optimizer.step()
        overflow_steps += not finite
        scaler.update(overflow=not finite)
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # every other word keeps its embedding exactly
            embeddings[others] = original[others]
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    file = out / "learned_embeds.safetensors"
    tmp = file.with_name(f".{file.name}.partial")
    save_file({"emb_params": embeddings[token_id][None].detach().float().cpu().contiguous()}, tmp,
              metadata={"token": cfg.token, "base_model": cfg.model})
    tmp.replace(file)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    return TIResult(file, losses, m.tokenizer, m.text_encoder.requires_grad_(False), overflow_steps, scaler.scale)
