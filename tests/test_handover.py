"""Hand-over between notebooks (each on a new machine, sharing only the outputs root), one model
through the course, and checkpoints that check the disk before they are written."""

import shutil
import subprocess

import pytest
import torch

from sdcourse import handover, runtime, train
from sdcourse.checkpoints import NotEnoughSpace, checkpoint_bytes, checkpoint_dirs, folder_bytes, save_checkpoint
from sdcourse.sample_data import sample_dataset_dir, write_sample_dataset
from sdcourse.train import TrainConfig


def make_runtime(tmp_path, smoke: bool) -> runtime.Runtime:
    return runtime.setup(smoke=smoke, outputs=tmp_path / "outputs")


def test_a_missing_dataset_stops_with_the_ways_on(tmp_path, capsys):
    rt = make_runtime(tmp_path, smoke=False)
    with pytest.raises(handover.MissingInput) as missing:
        handover.dataset(rt)
    message = str(missing.value)
    assert str(rt.outputs / "dataset") in message
    assert "run notebook 01" in message and "DATASET_FOLDER" in message and "USE_SAMPLE_DATA" in message
    # Only the learner's explicit choice, or smoke mode, falls back to the bundled sample.
    assert handover.dataset(rt, use_sample=True) == sample_dataset_dir()
    assert handover.dataset(make_runtime(tmp_path, smoke=True)) == sample_dataset_dir()
    assert "you ticked USE_SAMPLE_DATA" in capsys.readouterr().out
    with pytest.raises(handover.MissingInput, match="no metadata.csv"):
        handover.dataset(rt, folder=tmp_path)
    write_sample_dataset(rt.outputs / "dataset")
    assert handover.dataset(rt) == rt.outputs / "dataset"
    assert "built by notebooks 01-02" in capsys.readouterr().out


def test_a_missing_finetune_stops_and_names_notebook_03(tmp_path):
    rt = make_runtime(tmp_path, smoke=True)  # smoke mode has no bundled fine-tune to fall back to
    with pytest.raises(handover.MissingInput, match="run notebook 03 first"):
        handover.finetune(rt)
    with pytest.raises(handover.MissingInput, match="BASE_MODEL"):
        handover.base_model(rt)


def test_the_finetune_names_its_base_model(tmp_path, tiny_sd_v_path, capsys):
    rt = make_runtime(tmp_path, smoke=True)
    final = rt.outputs / "finetune" / "final"
    shutil.copytree(tiny_sd_v_path, final)
    TrainConfig(model=tiny_sd_v_path, dataset=str(sample_dataset_dir()), max_steps=7).save(final.parent / "config.json")
    ft = handover.finetune(rt)
    assert (ft.base_model, ft.prediction_type, ft.steps) == (tiny_sd_v_path, "v_prediction", 7)
    assert ft.caption() == "a red circle on a white background"
    assert f"fine-tuned from {tiny_sd_v_path}" in capsys.readouterr().out
    assert handover.base_model(rt) == tiny_sd_v_path
    (final.parent / "config.json").unlink()
    with pytest.raises(handover.MissingInput, match="set BASE_MODEL"):
        handover.finetune(rt)
    assert handover.finetune(rt, base_model="sd2").base_model == tiny_sd_v_path  # sd2 -> its tiny stand-in


def test_an_sd2_unet_in_an_sd15_pipeline_is_a_clear_error(tiny_sd_path, tiny_sd_v_path):
    from diffusers import UNet2DConditionModel

    from sdcourse import models

    pipe = models.load_pipeline(tiny_sd_path)
    sd2_unet = UNet2DConditionModel.from_pretrained(tiny_sd_v_path, subfolder="unet")
    with pytest.raises(handover.ModelMismatch, match="use_linear_projection: True here, False in the base"):
        handover.check_unet_fits(pipe, sd2_unet, "finetune/final")
    wider = UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": 48})
    with pytest.raises(handover.ModelMismatch, match="48-wide text embeddings.*writes 32-wide"):
        handover.check_unet_fits(pipe, wider)
    handover.check_unet_fits(pipe, UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet"))


def test_checkpoint_sizes_are_computed_from_parameter_counts():
    assert handover.unet_parameters(sd2=False) == 859_520_964  # SD 1.5's UNet, as published
    sd2 = handover.unet_parameters(sd2=True)
    assert 860e6 < sd2 < 870e6
    assert checkpoint_bytes(859_520_964, "adamw8bit") == 859_520_964 * 6  # ~5.2 GB: 2 fit a free Drive
    assert checkpoint_bytes(1000, "adamw") == 12_000


# ---------------------------------------------------------------------------------------------
# A small real disk (tmpfs) filled while checkpoints are written

@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk, leave: int):
    """Fill ``disk`` up to ``leave`` free bytes."""
    filler = disk / "filler.bin"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, shutil.disk_usage(disk).free - leave))
    return filler


def disk_config(small_disk, tiny_sd_path, sample_dir, **overrides):
    settings = dict(model=tiny_sd_path, dataset=str(sample_dir), output_dir=str(small_disk / "finetune"), width=64,
                    height=64, lr=1e-3, max_steps=6, checkpoint_every=2, validate_every=0, num_workers=0, snapshots=[])
    return TrainConfig(**{**settings, **overrides})


def test_a_checkpoint_that_will_not_fit_stops_before_writing(small_disk, tiny_sd_path, sample_dir, capsys):
    cfg = disk_config(small_disk, tiny_sd_path, sample_dir)
    checkpoints = small_disk / "finetune" / "checkpoints"
    filler = None

    def fill_after_first_checkpoint(step, loss):
        nonlocal filler
        if step == 3:  # half of a checkpoint free: the one at step 4 cannot fit
            filler = fill(small_disk, folder_bytes(checkpoints / "step-000002") // 2)
    with pytest.raises(NotEnoughSpace) as full:
        train.train(cfg, on_step=fill_after_first_checkpoint)
    message = str(full.value)
    assert "checkpoint step-000004" in message and " is free" in message and "needs about" in message
    assert "keep_checkpoints=1" in message and "Colab disk" in message and "step-000002" in message
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002"]  # the last good one, nothing else
    filler.unlink()
    resumed = train.train(cfg)
    assert "Resuming from" in capsys.readouterr().out and len(resumed.losses) == 4
    assert [p.name for p in checkpoint_dirs(checkpoints)] == ["step-000004", "step-000006"]


def test_a_disk_that_fills_during_the_write_leaves_no_temporary_folder(small_disk, tiny_sd_path, sample_dir,
                                                                        monkeypatch):
    # The free space a network mount reports can be stale: the check passes and the write itself fails.
    cfg = disk_config(small_disk, tiny_sd_path, sample_dir)
    checkpoints = small_disk / "finetune" / "checkpoints"
    monkeypatch.setattr("sdcourse.checkpoints.make_room", lambda *args: None)
    filler = None

    def fill_after_first_checkpoint(step, loss):
        nonlocal filler
        if step == 3:
            filler = fill(small_disk, folder_bytes(checkpoints / "step-000002") // 3)
    with pytest.raises(NotEnoughSpace, match="Not enough space for checkpoint step-000004") as full:
        train.train(cfg, on_step=fill_after_first_checkpoint)
    assert "last good checkpoint is" in str(full.value)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002"]  # .tmp-step-000004 is gone
    filler.unlink()
    monkeypatch.undo()
    assert len(train.train(cfg).losses) == 4  # resumed from step 2
    assert (small_disk / "finetune" / "final" / "model_index.json").exists()


def test_room_is_made_by_deleting_what_keep_checkpoints_would_delete(small_disk, tiny_sd_path, capsys):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    folder = small_disk / "checkpoints"
    for step in (1, 2):
        save_checkpoint(folder, step, unet, {"step": step}, None, keep=2)
    filler = fill(small_disk, folder_bytes(folder / "step-000002") // 2)
    save_checkpoint(folder, 3, unet, {"step": 3}, None, keep=2)  # step 1 goes first, to make room
    assert [p.name for p in checkpoint_dirs(folder)] == ["step-000002", "step-000003"]
    assert "Deleting step-000001 before writing checkpoint step-000003" in capsys.readouterr().out
    filler.unlink()
    save_checkpoint(folder, 4, unet, {"step": 4}, None, keep=1)
    filler = fill(small_disk, folder_bytes(folder / "step-000004") // 2)
    with pytest.raises(NotEnoughSpace):  # the only room to make is the last good one's: never
        save_checkpoint(folder, 5, unet, {"step": 5}, None, keep=1)
    assert [p.name for p in folder.iterdir()] == ["step-000004"]


def test_local_checkpoints_with_a_copy_of_the_newest_resume_on_a_new_machine(tmp_path, tiny_sd_path, sample_dir):
    # Session 1 writes checkpoints on its own disk and copies the newest to the outputs (Drive);
    # session 2 has a new, empty disk and resumes from the copy.
    def session(name):
        return TrainConfig(model=tiny_sd_path, dataset=str(sample_dir), output_dir=str(tmp_path / "drive" / "finetune"),
                           width=64, height=64, lr=1e-3, max_steps=8, checkpoint_every=2, copy_every=4,
                           keep_checkpoints=1, validate_every=0, num_workers=0, snapshots=[0.25, 0.5],
                           local_checkpoints=str(tmp_path / name / "checkpoints"))

    def stop_at_5(step, loss):
        if step == 5:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train.train(session("runtime1"), on_step=stop_at_5)
    copies = tmp_path / "drive" / "finetune" / "checkpoints"
    assert [p.name for p in checkpoint_dirs(copies)] == ["step-000004"]
    assert [p.name for p in checkpoint_dirs(tmp_path / "runtime1" / "checkpoints")] == ["step-000004"]
    result = train.train(session("runtime2"))
    assert len(result.losses) == 4  # steps 5-8: resumed from the copy
    assert [p.name for p in checkpoint_dirs(copies)] == ["step-000008"]
    snapshots = sorted((tmp_path / "drive" / "finetune" / "snapshots").iterdir())
    assert [p.name for p in snapshots] == ["step-000002", "step-000004"]
    weights = (snapshots[0] / "unet" / "diffusion_pytorch_model.safetensors")
    from safetensors.torch import load_file
    assert all(t.dtype == torch.float16 for t in load_file(weights).values())
    assert weights.stat().st_size < folder_bytes(copies / "step-000008") / 2
