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
