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
