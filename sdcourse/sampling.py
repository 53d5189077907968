"""Generating images: fixed seeds, chosen schedulers, base vs fine-tuned.

(Interface stub from the foundation; issue 5 fills this module in. Keep ``generate``'s signature:
notebook 03's validation images call it.)
"""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = 30, guidance_scale: float = 7.5,
             height: int | None = None, width: int | None = None, negative_prompt: str | None = None):
    """One image per (prompt, seed), prompt-major: [p0s0, p0s1, ..., p1s0, ...]. Same seeds, same images."""
    images = []
    for prompt in prompts:
        for seed in seeds:
            generator = torch.Generator("cpu").manual_seed(seed)
            images += pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                           guidance_scale=guidance_scale, height=height, width=width,
                           generator=generator).images
    return images
