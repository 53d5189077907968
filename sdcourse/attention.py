"""Attention, by hand and inside the UNet.

``attention_steps`` spells scaled dot-product attention out on small numbers (the worked example of
notebook 00). ``cross_attention_maps`` records, during a real generation, how much each image
position attends to each prompt token in the UNet's cross-attention layers.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionSteps:
    scores: torch.Tensor   # q . k for every (query, key) pair       [queries, keys]
    scaled: torch.Tensor   # scores / sqrt(d)                        [queries, keys]
    weights: torch.Tensor  # softmax over keys: each row sums to 1   [queries, keys]
    output: torch.Tensor   # weights @ values                        [queries, value dim]


def attention_steps(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> AttentionSteps:
    """softmax(Q K^T / sqrt(d)) V, keeping every intermediate so it can be printed and checked."""
    scores = query @ key.T
    scaled = scores / math.sqrt(query.shape[-1])  # keeps the softmax from saturating as d grows
    weights = scaled.softmax(dim=-1)
    return AttentionSteps(scores, scaled, weights, weights @ value)


class CrossAttentionRecorder:
    """An attention processor for the UNet's cross-attention (``attn2``) layers that also records maps.

    It computes exactly what diffusers' ``AttnProcessor`` computes for SD's cross-attention (image
    positions query, prompt tokens give keys and values), and adds each layer's softmax weights,
    averaged over heads and resized to the latent grid, into one running sum.
    """

    def __init__(self, latent_hw: tuple[int, int]):
        self.latent_hw = latent_hw
        self.total = None  # [tokens, h, w], sum over layers and steps
        self.calls = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch, tokens = encoder_hidden_states.shape[:2]
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)  # [batch*heads, pixels, tokens]
        self._record(probs.unflatten(0, (-1, attn.heads))[-1])  # the last batch entry: the prompt, not the negative
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))

    def _record(self, probs: torch.Tensor) -> None:
        h, w = self.latent_hw
        pixels, tokens = probs.shape[1:]
        factor = math.isqrt(h * w // pixels)  # this layer works at 1/factor of the latent resolution
        maps = probs.float().mean(0).T.reshape(tokens, 1, h // factor, w // factor)
        # Bilinear resizing mixes neighbouring distributions, so each position still sums to 1 over tokens.
        maps = F.interpolate(maps, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        self.total = maps if self.total is None else self.total + maps
        self.calls += 1

    def maps(self) -> torch.Tensor:
        """Average attention of every latent position to every token: [tokens, h, w], sums to 1 over tokens."""
        return self.total / self.calls


@contextmanager
def recording_cross_attention(pipe, latent_hw: tuple[int, int]):
    """Put a ``CrossAttentionRecorder`` on every cross-attention layer; restore the processors afterwards."""
    original = pipe.unet.attn_processors
    recorder = CrossAttentionRecorder(latent_hw)
    pipe.unet.set_attn_processor({name: recorder if ".attn2." in name else proc for name, proc in original.items()})
    try:
        yield recorder
    finally:
        pipe.unet.set_attn_processor(original)


@torch.no_grad()
def cross_attention_maps(pipe, prompt: str, seed: int, steps: int, guidance_scale: float = 7.5,
                         height: int | None = None, width: int | None = None):
    """Generate one image and return (image, tokens, maps): one [h, w] map per prompt token.

    ``tokens`` are the prompt's tokens between the start and end markers; ``maps`` holds all of the
    text encoder's 77 positions (start marker, words, end marker and padding), which together sum to
    1 at each latent position, the softmax at work. The start marker usually takes most of it.
    """
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    ids = pipe.tokenizer(prompt, truncation=True, max_length=pipe.tokenizer.model_max_length).input_ids
    tokens = [t.removesuffix("</w>") for t in pipe.tokenizer.convert_ids_to_tokens(ids[1:-1])]
    with recording_cross_attention(pipe, (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)) as rec:
        image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
                     generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    return image, tokens, rec.maps()
