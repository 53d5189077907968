import os
from pathlib import Path

import pytest

# The tiny BLIP is built once per machine into this cache (the SD miniature ships with the package);
# tests never touch the hub.
os.environ.setdefault("SDCOURSE_CACHE", str(Path.home() / ".cache" / "sdcourse"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core (scripts/test.sh): torch's own threads would only contend with the other
    # workers. The environment variable reaches the kernels that execute the notebooks.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd_path():
    from sdcourse import tiny
    return tiny.sd_path("epsilon")


@pytest.fixture(scope="session")
def tiny_sd_v_path():
    from sdcourse import tiny
    return tiny.sd_path("v_prediction")


@pytest.fixture(scope="session")
def untrained_sd_path(tmp_path_factory):
    """The miniature's architecture with its seeded initial weights: for tests that watch learning from scratch."""
    from sdcourse import tiny
    folder = tmp_path_factory.mktemp("untrained-sd")
    tiny.build_sd_pipeline("epsilon").save_pretrained(folder, safe_serialization=True)
    tiny.to_hub_layout(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_blip_path():
    from sdcourse import tiny
    return tiny.blip_path()


@pytest.fixture(scope="session")
def sample_dir():
    from sdcourse.sample_data import sample_dataset_dir
    return sample_dataset_dir()


@pytest.fixture(scope="session")
def sample_subject(tiny_sd_path, tmp_path_factory):
    """Notebook 06's DreamBooth of the sample subject with its smoke settings (keep them in step with the
    notebook), for tests/test_concepts.py and tests/test_toolbox.py: the photos' folder, the class word,
    both prompts and the trained LoRA's folder."""
    from types import SimpleNamespace

    from sdcourse import dreambooth, models, sampling
    from sdcourse.train import TrainConfig, train

    root = tmp_path_factory.mktemp("dreambooth")
    instance_dir, class_word = dreambooth.choose_subject("", "", use_sample=True, out_dir=root / "instance")
    instance_prompt, class_prompt = f"a photo of sks {class_word}", f"a photo of a {class_word}"
    pipe = models.load_pipeline(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    sampling.set_scheduler(pipe, "DPM++ 2M Karras")  # as notebook 06 samples, 20 steps in smoke mode
    dreambooth.prior_images(pipe, class_prompt, 4, root / "prior", steps=20, size=64)
    db_dir = dreambooth.build_dataset(instance_dir, instance_prompt, root / "prior", class_prompt, root / "db")
    lora = train(TrainConfig(model=tiny_sd_path, dataset=str(db_dir), output_dir=str(root / "lora"), lr=1e-2,
                             max_steps=100, checkpoint_every=50, width=64, height=64, num_workers=0, validate_every=0,
                             optimizer="adamw", lora_rank=8)).final_dir
    return SimpleNamespace(instance_dir=instance_dir, class_word=class_word, instance_prompt=instance_prompt,
                           class_prompt=class_prompt, lora=lora)


@pytest.fixture
def miniature():
    """Loads the miniature as notebook 04 samples it (DPM++ 2M Karras), to measure with ``world.hit_rate``."""
    from sdcourse import models, sampling

    def load(prediction_type: str = "epsilon"):
        pipe = models.load_pipeline(models.resolve("sd15" if prediction_type == "epsilon" else "sd2", smoke=True))
        pipe.set_progress_bar_config(disable=True)
        sampling.set_scheduler(pipe, "DPM++ 2M Karras")
        return pipe
    return load
