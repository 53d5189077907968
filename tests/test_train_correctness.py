"""What fp32 runs on a CPU cannot see: fp16 overflows in the fused step (injected), the EMA's warmup
and resume, the final pipeline's dtypes, non-finite cached latents, a process with no data on
several GPUs, reentrant checkpointing."""

import functools
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline

from sdcourse import latent_cache, train, training_set, validation
from sdcourse.optimizer import CpuEMA, LossScaler, UNetOptimizer
from sdcourse.train import TrainConfig


def config(tmp_path, model, data, **overrides) -> TrainConfig:
    settings = dict(model=model, dataset=str(data), output_dir=str(tmp_path / "finetune"), width=64, height=64,
                    lr=1e-3, max_steps=4, checkpoint_every=100, validate_every=0, num_workers=0)
    return TrainConfig(**{**settings, **overrides})


def test_final_pipeline_keeps_the_frozen_parts_and_loads_with_and_without_a_dtype(tmp_path, tiny_sd_path, sample_dir):
    result = train.train(config(tmp_path, tiny_sd_path, sample_dir, max_steps=2, mixed_precision="bf16"))
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    for dtype in (None, torch.float16):
        pipe = StableDiffusionPipeline.from_pretrained(result.final_dir, **({"torch_dtype": dtype} if dtype else {}))
        assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {dtype or torch.float32}
        image = pipe("a red circle", num_inference_steps=2, height=64, width=64).images[0]
        assert image.size == (64, 64)
    pipe = StableDiffusionPipeline.from_pretrained(result.final_dir)
    for name in ("vae", "text_encoder"):  # exactly the base's, not the bf16 copies training used
        ours, ref = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
        assert all(torch.equal(ours[k], ref[k]) for k in ref), name


def test_a_non_finite_cached_latent_is_encoded_again_in_fp32_or_named(tmp_path, tiny_sd_path, sample_dir, monkeypatch):
    cfg = config(tmp_path, tiny_sd_path, sample_dir, mixed_precision="bf16", max_steps=3, val_loss_every=0)
    data = latent_cache.cache_view(training_set.CaptionedImages(sample_dir, 64, 64), cfg.crop_margin)  # what the cache encodes
    hopeless = data.files.index("images/red_circle_on_white.png")
    hopeless_pixels = data[hopeless]["pixels"]
    real = latent_cache.encode_pixels

    def overflowing(vae, pixels):
        latents = real(vae, pixels)
        for j in range(len(pixels)):
            if torch.equal(pixels[j], hopeless_pixels) or (vae.dtype != torch.float32 and j == 0):
                latents[j] = float("nan")  # the first of each batch overflows in half precision only
        return latents
    monkeypatch.setattr(latent_cache, "encode_pixels", overflowing)
    result = train.train(cfg)
    assert list(result.skipped) == ["images/red_circle_on_white.png"]
    assert "not finite" in result.skipped["images/red_circle_on_white.png"]
    assert len(result.losses) == 3 and all(map(torch.isfinite, torch.tensor(result.losses)))


# --- fp16 and the fused step ------------------------------------------------------------------------

def tiny_unet(path):
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").train()
    unet.enable_gradient_checkpointing()
    return unet


def inject_overflow(param, when):
    """Make ``param``'s gradient infinite on the backward passes where ``when()`` is true (before the fused hook runs)."""
    param.register_hook(lambda grad: grad * float("inf") if when() else grad)


def test_an_overflow_reaches_no_weight_and_no_optimizer_state_and_halves_the_scale(tiny_sd_path):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(tiny_sd_path, subfolder="scheduler")
    gen = torch.Generator().manual_seed(0)
    latents, embeddings = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    for fused in (True, False):
        unet = tiny_unet(tiny_sd_path)
        names = {p: n for n, p in unet.named_parameters()}
        params = list(unet.parameters())
        optimizer = UNetOptimizer(params, "adamw", 1e-3, LossScaler(True, scale=2.0**10), fused)
        order = []  # the order in which backward completes gradients
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: order.append(names[p]))
        victim = dict(unet.named_parameters())["down_blocks.1.resnets.0.conv1.weight"]
        overflow = {"now": False}
        inject_overflow(victim, lambda: overflow["now"])
        with torch.autocast("cpu", dtype=torch.float16):  # as on a T4
            loss = train.diffusion_loss(unet, scheduler, latents, embeddings, torch.Generator().manual_seed(1))
        optimizer.backward(loss)  # one good step first: every parameter has optimizer state
        optimizer.step()
        weights = {n: p.detach().clone() for n, p in unet.named_parameters()}
        states = [{k: v.clone() for k, v in o.state[p].items()} for o in optimizer.optimizers for p in o.state]
        before_victim = order[:order.index(names[victim])]
        order.clear()
        overflow["now"] = True
        with torch.autocast("cpu", dtype=torch.float16):
            loss = train.diffusion_loss(unet, scheduler, latents, embeddings, torch.Generator().manual_seed(2))
        optimizer.backward(loss)
        optimizer.step()
        assert optimizer.scaler.scale == 2.0**9
        assert all(torch.isfinite(p).all() for p in unet.parameters())
        after = [{k: v for k, v in o.state[p].items()} for o in optimizer.optimizers for p in o.state]
        assert all(torch.isfinite(v).all() for s in after for v in s.values() if torch.is_tensor(v))
        moved = {n for n, p in unet.named_parameters() if not torch.equal(p, weights[n])}
        if fused:  # the stated design: parameters before the victim in backward order took their step, no others
            assert moved == set(before_victim) and names[victim] not in moved and optimizer.partial_steps == 1
            for state, old, p in zip(after, states, params):
                changed = any(not torch.equal(state[k], old[k]) for k in state if torch.is_tensor(state[k]))
                assert changed == (names[p] in moved), names[p]
        else:  # the ordinary step skips the whole step, as torch's GradScaler does
            assert moved == set() and optimizer.partial_steps == 0
            assert all(torch.equal(state[k], old[k]) for state, old in zip(after, states) for k in state)


def test_fused_fp16_with_overflows_reaches_the_ordinary_steps_loss(tiny_sd_path):
    # fp16 steps on fixed data with an overflow injected into a mid-network gradient at steps 3 and
    # 6: partial steps (fused) against skipped steps (ordinary). Both runs draw the same noise and
    # timesteps at each step, so their losses differ only by what the partial steps changed; at the
    # end that difference must be inside the loss's own step-to-step scatter (about 0.1 here).
    # A longer run: benchmarks/bench_fused_overflow.py.
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(tiny_sd_path, subfolder="scheduler")
    gen = torch.Generator().manual_seed(0)
    latents, embeddings = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    runs = {}
    for fused in (True, False):
        unet = tiny_unet(tiny_sd_path)
        optimizer = UNetOptimizer(list(unet.parameters()), "adamw", 2e-3, LossScaler(True), fused)
        step = {"n": 0}
        inject_overflow(dict(unet.named_parameters())["up_blocks.1.attentions.0.proj_in.weight"],
                        lambda: step["n"] in (2, 5))
        runs[fused] = []
        for step["n"] in range(8):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = train.diffusion_loss(unet, scheduler, latents, embeddings, torch.Generator().manual_seed(step["n"]))
            optimizer.backward(loss)
            optimizer.step()
            runs[fused].append(loss.item())
        assert optimizer.scaler.scale == 2.0**14  # two overflows, each halved the scale
        assert optimizer.partial_steps == (2 if fused else 0)
    assert runs[True][:3] == runs[False][:3]  # identical until the first overflow
    scatter = sum(abs(a - b) for a, b in zip(runs[False], runs[False][1:])) / 7
    final = {fused: sum(losses[-3:]) / 3 for fused, losses in runs.items()}
    assert abs(final[True] - final[False]) < scatter, (final, scatter, runs)


def test_the_fused_step_refuses_reentrant_checkpointing():
    # One linear layer used in two reentrant checkpointed segments: its hook fires once per segment,
    # each time with part of the gradient. Stepping on each part would step twice.
    layer = torch.nn.Linear(4, 4)
    optimizer = UNetOptimizer(list(layer.parameters()), "adamw", 1e-3, LossScaler(False), fused=True)
    checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True)
    x = torch.randn(2, 4, requires_grad=True)
    loss = checkpoint(layer, checkpoint(layer, x)).sum()
    with pytest.raises(RuntimeError, match="reentrant"):
        optimizer.backward(loss)


# --- EMA ---------------------------------------------------------------------------------------------

def test_ema_warms_up_like_diffusers_ema_model():
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    ours, theirs = CpuEMA(model, 0.9999), EMAModel(model.parameters(), decay=0.9999)
    for step in range(1, 31):  # weights change every step; the EMA is updated every step
        with torch.no_grad():
            model.weight.add_(torch.randn(3, 3))
        ours.update(model, step)
        theirs.step(model.parameters())
    torch.testing.assert_close(ours.weights["weight"], theirs.shadow_params[0])
    # Updated every 5 steps, with weights that changed only right after each update: the same EMA.
    model2 = torch.nn.Linear(3, 3)
    ours, theirs = CpuEMA(model2, 0.99), EMAModel(model2.parameters(), decay=0.99)
    for step in range(1, 31):
        if step % 5 == 1:
            with torch.no_grad():
                model2.weight.add_(torch.randn(3, 3))
        theirs.step(model2.parameters())
        if step % 5 == 0:
            ours.update(model2, step)
    torch.testing.assert_close(ours.weights["weight"], theirs.shadow_params[0])


def test_extended_run_continues_the_ema_from_its_last_update_and_validates_the_ema(tmp_path, tiny_sd_path,
                                                                                sample_dir, monkeypatch):
    from safetensors.torch import load_file

    shown = []  # the UNet weight each validation grid is drawn with
    monkeypatch.setattr(validation, "validation_grid", lambda pipe, *args: (
        shown.append(pipe.unet.conv_in.weight.detach().clone()), __import__("PIL.Image").Image.new("RGB", (8, 8)))[1])
    common = dict(ema_decay=0.9, ema_every=3, checkpoint_every=1, keep_checkpoints=20, validate_every=100)
    train.train(config(tmp_path, tiny_sd_path, sample_dir, max_steps=5, **common))  # EMA updates at 3 and 5
    train.train(config(tmp_path, tiny_sd_path, sample_dir, max_steps=8, **common))  # extended: updates at 6 and 8
    ckpt = tmp_path / "finetune" / "checkpoints"
    name = "conv_in.weight"
    weight = {s: load_file(ckpt / f"step-{s:06d}" / "unet" / "diffusion_pytorch_model.safetensors")[name] for s in (6, 8)}
    ema5 = load_file(ckpt / "step-000005" / "ema_unet.safetensors")[name]
    decay = CpuEMA(torch.nn.Linear(1, 1), 0.9).decay_at
    ema6 = decay(6) * ema5 + (1 - decay(6)) * weight[6]
    keep = decay(7) * decay(8)
    expected = keep * ema6 + (1 - keep) * weight[8]
    torch.testing.assert_close(load_file(ckpt / "step-000008" / "ema_unet.safetensors")[name], expected)
    assert torch.load(ckpt / "step-000008" / "training_state.pt", weights_only=True)["last_ema"] == 8
    # The last validation grid of each run shows the EMA, the model that is saved.
    torch.testing.assert_close(shown[-1], expected)
    final = StableDiffusionPipeline.from_pretrained(tmp_path / "finetune" / "final").unet.conv_in.weight
    torch.testing.assert_close(final, expected.half().float())


# --- Several GPUs -----------------------------------------------------------------------------------

def test_a_process_whose_micro_batch_is_all_unreadable_joins_the_all_reduce(tmp_path, tiny_sd_path, sample_dir):
    # Two processes (gloo), no latent cache, batch 1: process 0's first image cannot be read. It must
    # still take part in the backward's all-reduce, or process 1 waits for it forever.
    import os
    import subprocess
    import sys

    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    dataset = training_set.CaptionedImages(data, 64, 64)
    first_of_rank0 = training_set.epoch_batches(dict(enumerate(dataset.sizes)), 1, seed=0, epoch=0)[0][0]
    (data / dataset.files[first_of_rank0]).write_bytes(b"not an image")
    path = config(tmp_path, tiny_sd_path, data, max_steps=2, batch_size=1, cache_latents=False,
                  val_loss_every=0).save(tmp_path / "run.json")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "sdcourse.train", "--config", str(path)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Skipping unreadable image {data / dataset.files[first_of_rank0]}" in done.stdout + done.stderr
    assert (tmp_path / "finetune" / "final" / "model_index.json").exists()
