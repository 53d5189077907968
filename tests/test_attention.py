"""The worked attention example and the cross-attention maps recorded during a real generation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdcourse import attention, models, sampling


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


@pytest.mark.parametrize("flavour", ["epsilon", "v_prediction"])  # SD 1.x and SD 2.x attention layouts
def test_one_map_per_token_summing_to_one(flavour):
    from sdcourse import tiny
    pipe = models.load_pipeline(tiny.sd_path(flavour))
    sampling.set_scheduler(pipe, "DDIM")  # one UNet call per step (PNDM makes one more)
    prompt = "a red circle on a blue background"
    with attention.recording_cross_attention(pipe, height=64, width=96) as recorder:
        pipe(prompt, num_inference_steps=2, height=64, width=96)
    maps = recorder.maps()
    assert attention.prompt_tokens(pipe.tokenizer, prompt) == prompt.split()
    assert maps.shape == (pipe.tokenizer.model_max_length, 8, 12)  # every text position, on the latent grid
    assert torch.allclose(maps.sum(0), torch.ones(8, 12), atol=1e-5)
    assert (maps >= 0).all()
    # each cross-attention layer recorded once per step
    layers = sum(".attn2." in name for name in pipe.unet.attn_processors)
    assert recorder.calls == 2 * layers


def test_recording_does_not_change_the_image(pipe):
    sampling.set_scheduler(pipe, "DDIM")
    processors = pipe.unet.attn_processors
    with attention.recording_cross_attention(pipe):
        recorded = sampling.generate(pipe, ["a blue square"], [1], steps=2)[0]
    plain = sampling.generate(pipe, ["a blue square"], [1], steps=2)[0]
    assert np.abs(np.asarray(recorded, dtype=int) - np.asarray(plain, dtype=int)).max() <= 1
    assert all(type(p) is type(processors[name]) for name, p in pipe.unet.attn_processors.items())


def test_recorder_refuses_attention_it_does_not_reproduce(pipe):
    attn2 = next(m for name, m in pipe.unet.named_modules() if name.endswith(".attn2"))
    attn2.residual_connection = True
    try:
        with pytest.raises(ValueError, match="SD 1.x/2.x cross-attention only"):
            with attention.recording_cross_attention(pipe):
                pass
    finally:
        attn2.residual_connection = False
