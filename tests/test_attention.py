"""The worked attention example and the cross-attention maps recorded during a real generation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdcourse import attention, models


def test_worked_example_by_hand():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    steps = attention.attention_steps(q, k, v)
    assert steps.scores.tolist() == [[1.0, 0.0]]
    assert steps.scaled[0, 0].item() == pytest.approx(1 / math.sqrt(2))
    e = math.exp(1 / math.sqrt(2))
    assert steps.weights[0].tolist() == pytest.approx([e / (e + 1), 1 / (e + 1)])
    assert steps.output[0].tolist() == pytest.approx([10 * e / (e + 1), 10 / (e + 1)])


def test_worked_example_matches_torch():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)
    steps = attention.attention_steps(q, k, v)
    assert torch.allclose(steps.output, F.scaled_dot_product_attention(q[None], k[None], v[None])[0], atol=1e-6)
    assert torch.allclose(steps.weights.sum(-1), torch.ones(3))


@pytest.fixture(scope="module")
def pipe(tiny_sd_path):
    return models.load_pipeline(tiny_sd_path)


def test_one_map_per_token_summing_to_one(pipe):
    prompt = "a red circle on a blue background"
    image, tokens, maps = attention.cross_attention_maps(pipe, prompt, seed=0, steps=2, height=64, width=96)
    assert tokens == prompt.split()
    assert maps.shape == (pipe.tokenizer.model_max_length, 8, 12)  # every text position, on the latent grid
    assert torch.allclose(maps.sum(0), torch.ones(8, 12), atol=1e-5)
    assert (maps >= 0).all() and image.size == (96, 64)


def test_recording_does_not_change_the_image(pipe):
    from sdcourse import sampling
    sampling.set_scheduler(pipe, "DDIM")
    processors = pipe.unet.attn_processors
    image, _, _ = attention.cross_attention_maps(pipe, "a blue square", seed=1, steps=2, height=64, width=64)
    plain = sampling.generate(pipe, ["a blue square"], [1], steps=2, height=64, width=64)[0]
    assert np.abs(np.asarray(image, dtype=int) - np.asarray(plain, dtype=int)).max() <= 1
    assert all(type(p) is type(processors[name]) for name, p in pipe.unet.attn_processors.items())
