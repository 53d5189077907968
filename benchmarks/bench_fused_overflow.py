"""fp16 with the fused step against the ordinary step when gradients overflow: the loss they reach.

    python benchmarks/bench_fused_overflow.py [--steps 60] [--every 6]

Trains the tiny UNet (sdcourse/tiny.py) twice on fixed latents under fp16 autocast (CUDA when there
is a GPU, else the CPU), with an infinite gradient injected into a mid-network parameter every
``--every`` steps: the fused step then takes a partial step (parameters before it in backward order
step), the ordinary step skips the step. Prints both loss curves' means and the partial-step count.
Same noise and timesteps in both runs at each step, so the difference is the partial steps' doing.
"""

import argparse
import time

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from sdcourse import tiny, train
from sdcourse.optimizer import LossScaler, UNetOptimizer


def run(fused: bool, steps: int, every: int, device: str) -> tuple[list[float], int]:
    path = tiny.sd_path("epsilon")
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").to(device).train()
    unet.enable_gradient_checkpointing()
    optimizer = UNetOptimizer(list(unet.parameters()), "adamw", 2e-3, LossScaler(True), fused)
    gen = torch.Generator().manual_seed(0)
    latents, embeddings = (torch.randn(4, 4, 8, 8, generator=gen).to(device),
                           torch.randn(4, 77, 32, generator=gen).to(device))
    step = {"n": 0}
    victim = dict(unet.named_parameters())["up_blocks.1.attentions.0.proj_in.weight"]
    victim.register_hook(lambda g: g * float("inf") if step["n"] % every == every - 1 else g)
    losses = []
    for step["n"] in range(steps):
        with torch.autocast(device, dtype=torch.float16):
            loss = train.diffusion_loss(unet, scheduler, latents, embeddings,
                                        torch.Generator(device).manual_seed(step["n"]))
        optimizer.backward(loss)
        optimizer.step()
        losses.append(loss.item())
    return losses, optimizer.partial_steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=6)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, torch {torch.__version__}, {args.steps} steps, overflow every {args.every}")
    curves = {}
    for fused in (True, False):
        start = time.perf_counter()
        curves[fused], partial = run(fused, args.steps, args.every, device)
        tail = curves[fused][-args.steps // 3:]
        print(f"{'fused' if fused else 'ordinary':8s}: first loss {curves[fused][0]:.4f}, mean of the last "
              f"{len(tail)} {sum(tail) / len(tail):.4f}, partial steps {partial}, {time.perf_counter() - start:.0f} s")
    ordinary = curves[False]
    scatter = sum(abs(a - b) for a, b in zip(ordinary, ordinary[1:])) / (len(ordinary) - 1)
    gaps = [abs(a - b) for a, b in zip(curves[True], ordinary)]
    print(f"step-to-step scatter of the loss {scatter:.4f}; |fused - ordinary| per step: mean {sum(gaps) / len(gaps):.4f}, "
          f"max {max(gaps):.4f}")


if __name__ == "__main__":
    main()
