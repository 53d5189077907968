"""Textual Inversion on the tiny model: only the new word's vector changes, and pipelines load it."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from sdcourse import textual_inversion as ti


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd_path, sample_dir):
    cfg = ti.TIConfig(model=tiny_sd_path, dataset=str(sample_dir), output_dir=str(tmp_path_factory.mktemp("ti")),
                      token="<shape-style>", init_word="shape", steps=20, batch_size=2, lr=5e-3, resolution=64)
    return cfg, ti.train_embedding(cfg)


def test_embedding_file_is_a1111_format_and_loads_in_diffusers(trained, tiny_sd_path):
    cfg, result = trained
    tensors = load_file(result.embedding_file)
    assert list(tensors) == ["emb_params"] and tensors["emb_params"].shape == (1, 32)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    base_vocab = len(pipe.tokenizer)
    init = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("shape</w>")].clone()
    pipe.load_textual_inversion(str(result.embedding_file), token=cfg.token)
    token_id = pipe.tokenizer.convert_tokens_to_ids(cfg.token)
    assert token_id == base_vocab and pipe.tokenizer.tokenize(f"a {cfg.token}")[-1] == cfg.token
    learned = pipe.text_encoder.get_input_embeddings().weight[token_id]
    assert torch.equal(learned, tensors["emb_params"][0])
    assert not torch.allclose(learned, init)  # it moved away from "shape"
    image = pipe(f"a red circle in the style of {cfg.token}", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)


def test_only_the_new_vector_is_trained(trained, tiny_sd_path):
    from transformers import CLIPTextModel

    cfg, result = trained
    before = CLIPTextModel.from_pretrained(tiny_sd_path, subfolder="text_encoder").get_input_embeddings().weight
    after = result.text_encoder.get_input_embeddings().weight
    assert after.shape == (len(before) + 1, before.shape[1])
    assert torch.equal(after[:len(before)], before)  # every known word keeps its embedding exactly
    assert len(result.losses) == cfg.steps and torch.isfinite(torch.tensor(result.losses)).all()


def test_fp16_scales_the_loss_and_skips_an_overflowing_step(tiny_sd_path, sample_dir, tmp_path, monkeypatch):
    # fp16 autocast on the CPU, as on a T4; the loss of step 2 made so large that its scaled gradient overflows.
    from transformers import CLIPTextModel

    monkeypatch.setattr(ti, "compute_dtype_for", lambda setting, device: torch.float16)
    real, calls = ti.diffusion_loss, []

    def overflow_at_step_2(unet, scheduler, latents, *args, **kwargs):
        calls.append(latents.dtype)
        loss = real(unet, scheduler, latents, *args, **kwargs)
        return loss * 1e38 if len(calls) == 2 else loss
    monkeypatch.setattr(ti, "diffusion_loss", overflow_at_step_2)
    cfg = ti.TIConfig(model=tiny_sd_path, dataset=str(sample_dir), output_dir=str(tmp_path), token="<s>",
                      init_word="shape", steps=3, batch_size=1, lr=5e-3, resolution=64)
    result = ti.train_embedding(cfg)
    assert result.overflow_steps == 1 and result.loss_scale == 2.0**15
    assert calls == [torch.float32] * 3  # noise, add_noise and the velocity are computed in fp32
    learned = load_file(result.embedding_file)["emb_params"]
    assert torch.isfinite(learned).all()
    table = result.text_encoder.get_input_embeddings().weight
    assert table.dtype == torch.float32 and torch.isfinite(table).all()
    base = CLIPTextModel.from_pretrained(tiny_sd_path, subfolder="text_encoder").get_input_embeddings().weight
    assert torch.equal(table[:len(base)], base)  # exact fp32 rows: never loaded through fp16
    init = base[result.tokenizer.convert_tokens_to_ids("shape</w>")]
    assert not torch.equal(learned[0], init)  # steps 1 and 3 were taken


def test_unknown_token_and_init_word_errors(tiny_sd_path, sample_dir, tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(tiny_sd_path, subfolder="text_encoder")
    with pytest.raises(ValueError, match="single token"):
        ti.add_token(tok, enc, "<new>", "a red circle")
    ti.add_token(tok, enc, "<new2>", "red")
    with pytest.raises(ValueError, match="already knows"):
        ti.add_token(tok, enc, "<new2>", "red")
    with pytest.raises(ValueError, match="what"):
        ti.train_embedding(ti.TIConfig(model=tiny_sd_path, dataset=str(sample_dir), what="face", steps=1))
