"""Build the miniature's ControlNet that notebook 07's smoke mode loads (sdcourse/miniature/controlnet-silhouette),
as notebook 07 on a GPU loads a published one: ``controlnet.miniature_config``'s run (seeded, one CPU thread,
about a minute), then the share of 24 corner prompts drawn where the control says, with and without it.

    python scripts/build_miniature_controlnet.py
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from sdcourse import controlnet, models, sampling, tiny


def main() -> None:
    torch.set_num_threads(1)
    target = Path(controlnet.MINIATURE_CONTROLNET)
    with tempfile.TemporaryDirectory() as tmp:
        result = controlnet.train_controlnet(controlnet.miniature_config(tiny.sd_path("epsilon"), tmp))
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(result.folder, target)
    pipe = models.load_pipeline(tiny.sd_path("epsilon"))
    pipe.set_progress_bar_config(disable=True)
    sampling.set_scheduler(pipe, "DPM++ 2M Karras")
    prompts, controls = controlnet.corner_prompts(24)
    cn = controlnet.load_controlnet(target)
    print(f"{target}: {result.seconds:.0f} s of training; object in the control's corner: "
          f"{controlnet.region_rate(pipe, cn, prompts, controls):.0%} with control, "
          f"{controlnet.region_rate(pipe, None, prompts, controls):.0%} without")


if __name__ == "__main__":
    main()
