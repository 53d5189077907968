import os
from pathlib import Path

import pytest

# Tiny models are built once per machine into this cache (a few MB); tests never touch the hub.
os.environ.setdefault("SDCOURSE_CACHE", str(Path.home() / ".cache" / "sdcourse"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def tiny_sd_path():
    from sdcourse import tiny
    return tiny.sd_path("epsilon")


@pytest.fixture(scope="session")
def tiny_sd_v_path():
    from sdcourse import tiny
    return tiny.sd_path("v_prediction")


@pytest.fixture(scope="session")
def tiny_blip_path():
    from sdcourse import tiny
    return tiny.blip_path()


@pytest.fixture(scope="session")
def sample_dir():
    from sdcourse.sample_data import sample_dataset_dir
    return sample_dataset_dir()
