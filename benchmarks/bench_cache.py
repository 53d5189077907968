"""What random crops and flips cost the latent cache, and whether a flipped latent decodes like the flipped image.

    .venv/bin/python benchmarks/bench_cache.py                    # tiny model, sample data, 64 px (~1 min)
    .venv/bin/python benchmarks/bench_cache.py --model PATH --size 512 --device cuda

- cache: ``latent_cache.build_cache`` over the dataset at the exact training size, with the default crop
  margin, and with the margin and flips; seconds (best of ``--repeats``) and MiB of latents.
- flip: for each image, z = encode(x). If the VAE commuted with mirroring, decode(flip(z)) would
  equal flip(decode(z)) and flip(z) would equal encode(flip(x)). Each difference is printed beside
  the difference between a result and its own mirror image (what an unflipped picture misses by):
  a ratio near 0 means flipping latents is safe, near 1 means it is as wrong as not flipping.
  The cache stores encode(flip(x)) when flips are on, which is exact on any VAE.
"""

from __future__ import annotations

import argparse
import time

import torch

from sdcourse import latent_cache, models, tiny, training_set


def cache_costs(data, m, size: int, repeats: int) -> None:
    print(f"cache of {len(data)} images at {size}x{size} px (best of {repeats}):")
    print(f"  {'setting':<28}{'seconds':>9}{'latent MiB':>12}{'vs exact':>10}")
    exact = None
    for label, margin, flip in (("exact size (no crops)", 0.0, False), ("margin 12.5 %", 0.125, False),
                                ("margin 12.5 % + flips", 0.125, True)):
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            cache = latent_cache.build_cache(latent_cache.cache_view(data, margin), m, 4, 0, print, flip=flip)
            seconds.append(time.perf_counter() - started)
        mib = sum(t.numel() * t.element_size() for t in [*cache.latents.values(), *cache.flipped.values()]) / 2**20
        exact = exact or (min(seconds), mib)
        print(f"  {label:<28}{min(seconds):9.2f}{mib:12.3f}{mib / exact[1]:9.2f}x   time {min(seconds) / exact[0]:.2f}x")


@torch.no_grad()
def flip_equivariance(data, m) -> None:
    from sdcourse.latent_cache import encode_pixels

    vae = m.vae
    pixels = torch.stack([data[i]["pixels"] for i in range(len(data))]).to(vae.device, vae.dtype)
    z = encode_pixels(vae, pixels)
    scale = vae.config.scaling_factor

    def decode(latents):
        return vae.decode(latents / scale).sample.float()

    flipped_z, z_of_flipped = z.flip(-1), encode_pixels(vae, pixels.flip(-1))
    latent_err = (flipped_z - z_of_flipped).abs().mean() / (z - z.flip(-1)).abs().mean()
    decoded = decode(z)
    pixel_err = (decode(flipped_z) - decoded.flip(-1)).abs().mean() / (decoded - decoded.flip(-1)).abs().mean()
    print(f"flip test on {len(data)} images: |flip(E(x)) - E(flip x)| / |E(x) - flip(E(x))| = {latent_err:.3f}; "
          f"|D(flip z) - flip(D z)| / |D z - flip(D z)| = {pixel_err:.3f} (0: flipping latents is exact, 1: no better "
          "than not flipping)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a diffusers pipeline folder (default: the tiny SD 1.x model)")
    parser.add_argument("--data", help="a dataset folder (default: the bundled sample data)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from sdcourse.sample_data import sample_dataset_dir

    model = args.model or tiny.sd_path("epsilon")
    m = models.load_models(model, torch.float32 if args.device == "cpu" else torch.float16)
    m.vae.to(args.device)
    m.text_encoder.to(args.device)
    data = training_set.CaptionedImages(args.data or sample_dataset_dir(), args.size, args.size, crop="center")
    print(f"model: {model}; VAE {sum(p.numel() for p in m.vae.parameters()):,} parameters; device {args.device}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    cache_costs(data, m, args.size, args.repeats)
    flip_equivariance(data, m)


if __name__ == "__main__":
    main()
