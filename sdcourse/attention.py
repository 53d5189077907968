"""Attention, by hand and inside the UNet.

``attention_steps`` spells scaled dot-product attention out on small numbers (the worked example of
notebook 00). ``recording_cross_attention`` records, during a real generation, how much each image
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
def recording_cross_attention(pipe, height: int | None = None, width: int | None = None):
    """Record cross-attention maps during whatever the pipeline generates inside the block.

        with recording_cross_attention(pipe) as recorder:
            image = pipe(prompt).images[0]
        maps = recorder.maps()  # [77, h, w]: every text position, on the latent grid

    ``height`` and ``width`` are the generated image's (default: the model's resolution). Generate one
    image per prompt inside the block: the maps are those of the last image of each batch. The
    original attention processors come back afterwards.
    """
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    latent_hw = ((height or default) // pipe.vae_scale_factor, (width or default) // pipe.vae_scale_factor)
    for name, module in pipe.unet.named_modules():
        if name.endswith(".attn2") and (module.norm_cross or module.group_norm or module.spatial_norm
                                        or module.residual_connection):
            raise ValueError(f"{name} normalises or adds a residual inside attention; the recorder computes "
                             "SD 1.x/2.x cross-attention only.")
    original = pipe.unet.attn_processors
    recorder = CrossAttentionRecorder(latent_hw)
    pipe.unet.set_attn_processor({name: recorder if ".attn2." in name else proc for name, proc in original.items()})
    try:
        yield recorder
    finally:
        pipe.unet.set_attn_processor(original)


def prompt_tokens(tokenizer, prompt: str) -> list[str]:
    """The prompt's tokens as words, without the start and end markers: maps[1:1 + len(tokens)] are theirs."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return [t.removesuffix("</w>") for t in tokenizer.convert_ids_to_tokens(ids[1:-1])]
