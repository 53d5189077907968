"""Build the miniature Stable Diffusion that smoke mode and the tests use (sdcourse/miniature/).

Deterministic and seeded, on one CPU thread: 24 minutes here (1,445 s for the shipped build, on this
2-core machine with other work beside it). Three stages:

1. the VAE learns to reconstruct 64 px scenes of the whole world (every colour and shape, also the
   ones the UNet never sees, as the real VAE reconstructs everything), through 8x8x4 latents;
2. the text encoder stays as initialised (seeded, frozen): its outputs for the few caption words
   are random but distinct, and that is all the UNet needs to read them;
3. the UNet learns epsilon prediction on cached latents of the base world (sdcourse.world:
   BASE_COLOURS x BASE_SHAPES x backgrounds), captioned half as sentences and half as booru tags
   (the smoke run's notebook 01 captions with tags), with 10 % empty captions so that
   classifier-free guidance works; the SD 2.x flavour is that UNet fine-tuned to v-prediction.

    python scripts/build_miniature.py            # writes sdcourse/miniature/{sd-epsilon,sd-v}
    python scripts/build_miniature.py --out /tmp/m --vae-steps 50 --unet-steps 50 --v-steps 20  # a pilot

It measures as it goes, with sdcourse.world.check: the VAE round trip (84 % of all scenes read back
right for the shipped build: the ceiling for everything drawn through it) and, at the end, each
flavour's share of the 45 base-world prompts drawn right with DPM++ 2M Karras, as notebook 04 and
tests/test_miniature.py sample (64 % and 67 % for the shipped build).
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdcourse import sampling, tiny, world

REPO = Path(__file__).resolve().parent.parent


def pixels(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) for i in images])).permute(0, 3, 1, 2) / 127.5 - 1


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae, steps: int, log, lr: float = 1e-3, batch: int = 16) -> None:
    # Every colour and shape: the VAE must reconstruct what fine-tuning will later teach the UNet.
    data = pixels(img for _, img in world.scenes(3000, colours=tuple(world.COLOURS), shapes=world.SHAPES, seed=1))
    # The object is a small part of each picture: weighting its pixels 5x makes the VAE learn
    # colours and outlines in hundreds of steps instead of thousands.
    border = torch.cat([data[:, :, 0], data[:, :, -1]], dim=2).median(dim=2).values
    weight = 1 + 4 * ((data - border[:, :, None, None]).abs().amax(1, keepdim=True) > 0.2).float()
    # Start with almost no sampling noise (log-variance about -8): at the default (variance 1) the
    # noise drowns the young latents and learning crawls. The KL term then sets the variance.
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:] = -8.0
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    vae.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=50)
        # Random 32 px crops: a quarter of the cost of whole pictures, and convolutions do not care.
        idx = torch.randint(0, len(data), (batch,), generator=gen)
        i, j = (int(v) for v in torch.randint(0, 5, (2,), generator=gen) * 8)
        x, w = data[idx, :, i:i + 32, j:j + 32], weight[idx, :, i:i + 32, j:j + 32]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = (w * ((recon - x) ** 2 + 0.5 * (recon - x).abs())).mean() + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}: loss {loss.item():.4f} (kl {kl.item():.3f})")
    vae.eval()


def vae_round_trip(vae) -> float:
    """The ceiling for every later measurement: how often the checker still reads a scene right after
    the VAE encoded and decoded it (every colour, shape and background, twice)."""
    rng = random.Random(9)
    combos = list(itertools.product(world.COLOURS, world.SHAPES, world.BACKGROUNDS)) * 2
    scenes = [world.draw(s, c, b, rng).resize((64, 64), Image.BICUBIC) for c, s, b in combos]
    with torch.no_grad():
        decoded = vae.decode(vae.encode(pixels(scenes)).latent_dist.mode()).sample
    images = [Image.fromarray(((d.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()) for d in decoded]
    return sum(world.check(im).matches(c, s) for (c, s, _), im in zip(combos, images)) / len(combos)


def unet_v_from_epsilon(unet_eps, unet_v) -> None:
    """SD 2.x uses linear projections into its attention blocks where SD 1.x has 1x1 convolutions:
    the same weights, one reshape."""
    state = unet_eps.state_dict()
    target = unet_v.state_dict()
    unet_v.load_state_dict({k: v.reshape(target[k].shape) for k, v in state.items()})


def train_unet(unet, latents, embeddings, caption_ids, empty, scheduler, steps: int, lr: float, log, seed: int) -> None:
    prediction = scheduler.config.prediction_type
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed)
    unet.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        idx = torch.randint(0, len(latents), (32,), generator=gen)
        x0 = latents[idx]
        cond = embeddings[caption_ids[idx]]
        drop = torch.rand(len(idx), generator=gen) < 0.1
        cond = torch.where(drop[:, None, None], empty, cond)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        noisy = scheduler.add_noise(x0, noise, t)
        target = noise if prediction == "epsilon" else scheduler.get_velocity(x0, noise, t)
        loss = F.mse_loss(unet(noisy, t, cond).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"unet ({prediction}) step {step}: loss {loss.item():.4f}")
    unet.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "sdcourse" / "miniature"))
    ap.add_argument("--vae-steps", type=int, default=4000)
    ap.add_argument("--unet-steps", type=int, default=4000)
    ap.add_argument("--v-steps", type=int, default=600)
    ap.add_argument("--scenes", type=int, default=4000, help="base-world pictures the UNet learns from")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 keeps the build deterministic and unslowed by anything else running")
    ap.add_argument("--vae", help="take the VAE of this built miniature instead of training one (to iterate on the UNet)")
    args = ap.parse_args()
    from diffusers import AutoencoderKL, DDPMScheduler

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    random.seed(0)
    start = time.time()
    log = lambda msg: print(f"[{time.time() - start:6.0f} s] {msg}", flush=True)  # noqa: E731

    pipe = tiny.build_sd_pipeline("epsilon")  # seeded: the architecture, the tokenizer, the text encoder
    if args.vae:
        sub = "vae" if (Path(args.vae) / "vae").is_dir() else None
        pipe.vae.load_state_dict(AutoencoderKL.from_pretrained(args.vae, subfolder=sub).state_dict())
    else:
        train_vae(pipe.vae, args.vae_steps, log)

    log(f"VAE round trip: right colour and shape for {vae_round_trip(pipe.vae):.0%} of 168 scenes of the whole world")

    captions, images = zip(*world.scenes(args.scenes, seed=2, tag_share=0.5))
    with torch.no_grad():
        x = pixels(images)
        latents = torch.cat([pipe.vae.encode(x[i:i + 256]).latent_dist.mode() for i in range(0, len(x), 256)])
        # The real VAEs' scaling_factor (0.18215 for SD 1.x) makes latents unit-variance; same here.
        scaling = float(1 / latents.std())
        pipe.vae.register_to_config(scaling_factor=round(scaling, 5))
        latents = latents * pipe.vae.config.scaling_factor
        unique = sorted(set(captions)) + [""]
        ids = pipe.tokenizer(unique, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        embeddings = pipe.text_encoder(ids)[0]
    caption_ids = torch.tensor([unique.index(c) for c in captions])
    log(f"cached {len(latents)} latents (scaling_factor {pipe.vae.config.scaling_factor}), {len(unique)} captions")

    eps_sched = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")
    train_unet(pipe.unet, latents, embeddings, caption_ids, embeddings[-1], eps_sched, args.unet_steps, 2e-3, log, 3)

    sd2 = tiny.build_sd_pipeline("v_prediction")
    sd2.vae.load_state_dict(pipe.vae.state_dict())
    sd2.vae.register_to_config(scaling_factor=pipe.vae.config.scaling_factor)
    unet_v_from_epsilon(pipe.unet, sd2.unet)
    with torch.no_grad():
        embeddings_v = sd2.text_encoder(ids)[0]
    v_sched = DDPMScheduler.from_config(sd2.scheduler.config, prediction_type="v_prediction")
    train_unet(sd2.unet, latents, embeddings_v, caption_ids, embeddings_v[-1], v_sched, args.v_steps, 5e-4, log, 4)

    out = Path(args.out)
    for name, p in (("sd-epsilon", pipe), ("sd-v", sd2)):
        p.save_pretrained(out / name, safe_serialization=True)
        tiny.to_hub_layout(out / name)
        p.set_progress_bar_config(disable=True)
        sampling.set_scheduler(p, "DPM++ 2M Karras")  # as notebook 04 and tests/test_miniature.py sample
        combos = itertools.product(world.BASE_COLOURS, world.BASE_SHAPES, world.BACKGROUNDS)
        log(f"{name}: right colour and shape for {world.hit_rate(p, world.expectations(combos)):.0%} of the 45 base-world prompts")
    log("done")


if __name__ == "__main__":
    main()
