"""UNet fine-tuning on the tiny models and the sample data (CPU, fp32): it learns, it resumes exactly,
it survives bad data and crashes, and the fused optimizer step is the ordinary step."""

import dataclasses
import json
import math
import shutil

import pytest
import torch

from sdcourse import models, train, training_set
from sdcourse.checkpoints import checkpoint_dirs, remove_unfinished_checkpoints, save_checkpoint
from sdcourse.optimizer import LossScaler, UNetOptimizer
from sdcourse.train import TrainConfig


def config(tmp_path, model, data, **overrides) -> TrainConfig:
    settings = dict(model=model, dataset=str(data), output_dir=str(tmp_path / "finetune"), width=64, height=64,
                    lr=1e-3, max_steps=8, checkpoint_every=100, validate_every=0, num_workers=0)
    return TrainConfig(**{**settings, **overrides})


def unet_weights(folder) -> dict:
    from safetensors.torch import load_file
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_loss_falls_and_the_result_loads(tmp_path, untrained_sd_path, sample_dir):
    # Predicting zero noise scores E[noise^2] = 1, and the untrained UNet starts at or above that.
    # Getting well below 1 means the UNet has learned to pull the noise out of noisy sample latents;
    # 0.6 leaves a wide margin over the ~0.34 this seeded run reaches (its steps scatter by ~0.05).
    cfg = config(tmp_path, untrained_sd_path, sample_dir, max_steps=40, validate_every=40, validation_steps=2,
                 validation_prompts=["a red circle on a white background"], validation_seeds=[0])
    result = train.train(cfg)
    last = sum(result.losses[-10:]) / 10
    assert result.losses[0] > 0.9 and last < 0.6, (result.losses[0], last)

    out = tmp_path / "finetune"
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000000.png", "step-000040.png"]
    assert (out / "loss.png").exists() and (out / "checkpoints" / "step-000040").is_dir()
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(result.final_dir, torch_dtype=torch.float32)
    assert all(t.dtype == torch.float16 for t in unet_weights(result.final_dir).values())
    trained = unet_weights(out / "checkpoints" / "step-000040")
    name = "conv_in.weight"
    torch.testing.assert_close(pipe.unet.state_dict()[name], trained[name].half().float())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_target_matches_an_independent_computation(tiny_sd_path, tiny_sd_v_path, prediction_type):
    path = tiny_sd_path if prediction_type == "epsilon" else tiny_sd_v_path
    m = models.load_models(path, torch.float32)
    assert m.noise_scheduler.config.prediction_type == prediction_type  # read from the model's scheduler config

    class Recorder(torch.nn.Module):  # a "UNet" that predicts zeros: the loss is then the mean squared target
        def forward(self, noisy, timesteps, embeddings):
            self.noisy, self.timesteps = noisy, timesteps
            return type("Out", (), {"sample": torch.zeros_like(noisy)})

    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    unet = Recorder()
    loss = train.diffusion_loss(unet, m.noise_scheduler, latents, torch.zeros(3, 77, 32), torch.Generator().manual_seed(2))

    # SD's "scaled_linear" schedule, written out: betas are squares of a linear ramp of their roots.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[unet.timesteps].view(-1, 1, 1, 1)
    noise = (unet.noisy.double() - alpha_bar.sqrt() * latents) / (1 - alpha_bar).sqrt()
    target = noise if prediction_type == "epsilon" else alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(loss.double(), (target**2).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["adamw", "adamw8bit"])
def test_fused_step_equals_ordinary_step(tiny_sd_path, kind):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    scheduler = DDPMScheduler.from_pretrained(tiny_sd_path, subfolder="scheduler")
    unets, optimizers = [], []
    for fused in (False, True):
        unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet").train()
        unet.enable_gradient_checkpointing()
        unets.append(unet)
        optimizers.append(UNetOptimizer(list(unet.parameters()), kind, 1e-3, LossScaler(False), fused))
    data = torch.Generator().manual_seed(0)
    for step in range(4):
        latents, embeddings = torch.randn(2, 4, 8, 8, generator=data), torch.randn(2, 77, 32, generator=data)
        for unet, optimizer in zip(unets, optimizers):
            optimizer.lr = 1e-3 * (step + 1)
            optimizer.backward(train.diffusion_loss(unet, scheduler, latents, embeddings, torch.Generator().manual_seed(step)))
            optimizer.step()
    ordinary, fused = (dict(u.named_parameters()) for u in unets)
    assert all(p.grad is None for p in fused.values())  # freed inside backward
    original = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet").state_dict()
    assert not torch.equal(ordinary["conv_in.weight"], original["conv_in.weight"])  # it did train
    for name in ordinary:
        torch.testing.assert_close(fused[name], ordinary[name], rtol=0, atol=1e-7, msg=name)


def test_kill_and_resume_equals_uninterrupted(tmp_path, tiny_sd_path, sample_dir):
    # Batch 6 over the 32 images left after 4 are held out for the validation loss: 6 batches an epoch,
    # so the resume starts mid-epoch and the 8 steps cross an epoch boundary after it.
    common = dict(batch_size=6, max_steps=8, checkpoint_every=4, ema_decay=0.9, ema_every=3, flip=True,
                  val_loss_every=3)
    whole = train.train(config(tmp_path / "whole", tiny_sd_path, sample_dir, **common))

    cfg = config(tmp_path / "killed", tiny_sd_path, sample_dir, **common)

    def kill_at_step_6(step, loss):
        if step == 6:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, on_step=kill_at_step_6)
    checkpoints = tmp_path / "killed" / "finetune" / "checkpoints"
    assert [p.name for p in checkpoint_dirs(checkpoints)] == ["step-000004"]
    resumed = train.train(cfg)
    assert train.train(cfg).losses == []  # a finished run is not trained again

    assert resumed.losses == whole.losses[4:]
    assert resumed.history == whole.history  # the curve after the resume shows the whole run
    assert whole.history["val_steps"] == [0, 3, 6, 8] and len(whole.history["losses"]) == 8
    a, b = (tmp_path / name / "finetune" / "checkpoints" / "step-000008" for name in ("whole", "killed"))
    for name, weight in unet_weights(a).items():
        assert torch.equal(weight, unet_weights(b)[name]), name
    from safetensors.torch import load_file
    ema_a, ema_b = load_file(a / "ema_unet.safetensors"), load_file(b / "ema_unet.safetensors")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


@pytest.mark.parametrize("cache_latents", [True, False])
def test_corrupt_images_are_reported_and_skipped(tmp_path, tiny_sd_path, sample_dir, cache_latents, capsys):
    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    (data / "images" / "red_circle_on_white.png").write_bytes(b"not a png")
    png = (data / "images" / "blue_square_on_black.png")
    png.write_bytes(png.read_bytes()[:100])  # truncated mid-file
    with open(data / "metadata.csv", "a") as f:
        f.write("images/missing.png,a file that is not there\n")
    cfg = config(tmp_path, tiny_sd_path, data, batch_size=1, max_steps=37, cache_latents=cache_latents)
    result = train.train(cfg)
    assert sorted(result.skipped) == ["images/blue_square_on_black.png", "images/missing.png", "images/red_circle_on_white.png"]
    assert "Skipping unreadable image" in capsys.readouterr().out + capsys.readouterr().err
    assert (result.final_dir / "model_index.json").exists()


def test_a_crash_while_checkpointing_leaves_no_half_checkpoint(tmp_path, tiny_sd_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    folder = tmp_path / "checkpoints"
    save_checkpoint(folder, 1, unet, {"step": 1}, None, keep=2)

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)  # after unet/ is written, before the state is
    with pytest.raises(OSError):
        save_checkpoint(folder, 2, unet, {"step": 2}, None, keep=2)
    assert [p.name for p in checkpoint_dirs(folder)] == ["step-000001"]
    remove_unfinished_checkpoints(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["step-000001"]
    monkeypatch.undo()
    for step in (2, 3, 4):
        save_checkpoint(folder, step, unet, {"step": step}, None, keep=2)
    assert [p.name for p in checkpoint_dirs(folder)] == ["step-000003", "step-000004"]
    loaded = UNet2DConditionModel.from_pretrained(folder / "step-000004", subfolder="unet")
    assert torch.equal(loaded.conv_in.weight, unet.conv_in.weight)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_sd_path, sample_dir, monkeypatch):
    real_loss, calls = train.diffusion_loss, []

    def nan_at_step_5(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss
    monkeypatch.setattr(train, "diffusion_loss", nan_at_step_5)
    cfg = config(tmp_path, tiny_sd_path, sample_dir, checkpoint_every=2)
    with pytest.raises(train.TrainingDiverged, match="nan at step 5.*step-000004"):
        train.train(cfg)
    out = tmp_path / "finetune"
    assert [p.name for p in checkpoint_dirs(out / "checkpoints")] == ["step-000002", "step-000004"]
    assert all(torch.isfinite(w).all() for w in unet_weights(out / "checkpoints" / "step-000004").values())
    assert not (out / "final").exists()


def test_cli_writes_a_config_and_trains_a_v_prediction_model(tmp_path, tiny_sd_v_path, sample_dir):
    path = tmp_path / "run.json"
    assert train.main(["--write-config", str(path)]) == 0
    defaults = TrainConfig.load(path)
    assert (defaults.epochs, defaults.batch_size, defaults.lr, defaults.lr_schedule, defaults.warmup_ratio,
            defaults.width, defaults.height, defaults.crop) == (30, 4, 5e-6, "cosine", 0.06, 512, 512, "random")
    config(tmp_path, tiny_sd_v_path, sample_dir, max_steps=3, width=64, height=48, buckets=True,
           min_snr_gamma=5.0, noise_offset=0.05, grad_accum=2).save(path)
    assert train.main(["--config", str(path)]) == 0
    final = tmp_path / "finetune" / "final"
    assert json.loads((final / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"


def test_config_and_dataset_errors_name_the_problem(tmp_path, sample_dir):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"epochs": 3, "learning_rate": 1e-5}))
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.load(path)
    with pytest.raises(ValueError, match="crop"):
        TrainConfig(crop="middle").check()
    (tmp_path / "metadata.csv").write_text("file,caption\na.png,a cat\n")
    with pytest.raises(ValueError, match=r"metadata.csv has no column \['file_name', 'text'\]"):
        training_set.CaptionedImages(tmp_path, 64, 64)
    with pytest.raises(FileNotFoundError, match="metadata.csv"):
        training_set.CaptionedImages(tmp_path / "nowhere", 64, 64)


def test_buckets_keep_the_area_and_group_batches_by_size(tmp_path):
    from PIL import Image

    sizes = training_set.bucket_sizes(512, 512)
    assert {(512, 512), (576, 448), (448, 576), (640, 384), (384, 640)} <= set(sizes)
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w / h, h / w) <= 2 for w, h in sizes)
    (tmp_path / "images").mkdir()
    rows = ["file_name,text"]
    for i, (w, h) in enumerate([(300, 100), (100, 300), (200, 200), (310, 100)]):
        Image.new("RGB", (w, h), "red").save(tmp_path / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,a picture")
    (tmp_path / "metadata.csv").write_text("\n".join(rows) + "\n")
    data = training_set.CaptionedImages(tmp_path, 128, 128, buckets=True)
    assert data.sizes[0] == data.sizes[3] and data.sizes[0][0] > data.sizes[0][1]
    assert data.sizes[1][0] < data.sizes[1][1] and data.sizes[2] == (128, 128)
    assert data[0]["pixels"].shape == (3, data.sizes[0][1], data.sizes[0][0])
    batches = training_set.epoch_batches(dict(enumerate(data.sizes)), 4, seed=0, epoch=0)
    assert sorted(map(sorted, batches)) == [[0, 3], [1], [2]]


def test_memory_estimate_counts_what_the_fused_step_saves(tiny_sd_path):
    from diffusers import UNet2DConditionModel
    from sdcourse import memory

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    n, largest = sum(p.numel() for p in unet.parameters()), max(p.numel() for p in unet.parameters())
    settings = dict(batch_size=4, width=512, height=512, half_precision=True, optimizer="adamw8bit",
                    gradient_checkpointing=True, cache_latents=True)
    fused = memory.estimate_peak(unet, 0, fused_step=True, **settings)
    ordinary = memory.estimate_peak(unet, 0, fused_step=False, **settings)
    assert math.isclose(ordinary.total - fused.total, 4 * (n - largest) / 2**30)
    uncached = memory.estimate_peak(unet, 10**9, fused_step=True, **{**settings, "cache_latents": False})
    assert math.isclose(uncached.total - fused.total, 2 * 10**9 / 2**30)


def test_a_cpu_run_says_its_memory_estimate_is_for_a_gpu(tmp_path, tiny_sd_path, sample_dir, capsys):
    result = train.train(config(tmp_path, tiny_sd_path, sample_dir, max_steps=1))
    out = capsys.readouterr().out
    assert result.estimate.on_cpu
    assert "Estimated peak GPU memory that these settings would need on a GPU (this run is on the CPU" in out
    assert str(result.estimate) in out
    on_gpu = dataclasses.replace(result.estimate, on_cpu=False)
    assert str(on_gpu).startswith("Estimated peak GPU memory (an estimate, see sdcourse/memory.py):")
    assert str(on_gpu).splitlines()[1:] == str(result.estimate).splitlines()[1:]  # the same figures


def test_the_progress_bar_speed_reads_for_slow_steps_too():
    assert train.speed_text(8, 2.0) == "4.0 img/s"
    assert train.speed_text(1, 47.0) == "47.0 s/img"  # a CPU's full-size step; at one decimal 0.021 img/s read 0.0
    assert train.speed_text(3, 4.5) == "1.5 s/img"
    assert train.speed_text(0, 5.0) == "-"


def test_loss_scaler_halves_on_overflow_and_grows_back():
    scaler = LossScaler(enabled=True, scale=8.0, growth_interval=2)
    grad = torch.tensor([8.0, 16.0])
    assert scaler.unscale_(grad) and grad.tolist() == [1.0, 2.0]
    assert not scaler.unscale_(torch.tensor([1.0, float("inf")]))
    scaler.update(overflow=True)
    assert scaler.scale == 4.0
    scaler.update(overflow=False)
    scaler.update(overflow=False)
    assert scaler.state_dict() == {"scale": 8.0, "good_steps": 0}


def test_two_processes_train_one_model_like_accelerate_launch(tmp_path, tiny_sd_path, sample_dir):
    # What `accelerate launch` does on several GPUs, on the CPU: two processes (gloo), gradients
    # averaged by DistributedDataParallel, so the fused step must give way to the ordinary one.
    import os
    import subprocess
    import sys

    path = config(tmp_path, tiny_sd_path, sample_dir, max_steps=4, checkpoint_every=2).save(tmp_path / "run.json")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "sdcourse.train", "--config", str(path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fused_step is off" in done.stdout
    assert done.stdout.count("Saved the fine-tuned pipeline") == 1  # only the main process writes
    out = tmp_path / "finetune"
    assert [p.name for p in checkpoint_dirs(out / "checkpoints")] == ["step-000002", "step-000004"]
    assert (out / "final" / "model_index.json").exists()


def test_training_says_how_many_captions_are_cut(tmp_path, tiny_sd_path, sample_dir, capsys):
    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    import pandas as pd
    table = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False)
    table.loc[0, "text"] = ", ".join(["red circle"] * 40)
    table.to_csv(data / "metadata.csv", index=False)
    train.train(config(tmp_path, tiny_sd_path, data, max_steps=1))
    assert f"1 of {len(table)} captions are longer than the text encoder's 77 tokens" in capsys.readouterr().out
