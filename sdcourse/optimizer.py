"""The optimizer step: AdamW after backward or fused into it, fp16 loss scaling one parameter at a time,
the learning-rate schedule, and an EMA of the weights kept in CPU memory.

The fused step (``UNetOptimizer``) steps each parameter the moment its gradient is complete, so a
full set of gradients never exists: 3.4 GB less for SD 1.5's UNet (``memory.py`` counts it).
Deciding per parameter needs a loss scaler that unscales and checks one gradient at a time, which
``torch.amp.GradScaler`` does not: ``LossScaler``.
"""

from __future__ import annotations

import math
import weakref

import torch


def lr_factor(step: int, total_steps: int, warmup_ratio: float, schedule: str) -> float:
    """Linear warmup over the first ``warmup_ratio`` of the steps, then cosine/linear decay to 0 or constant."""
    warmup = round(total_steps * warmup_ratio)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[schedule]


class LossScaler:
    """Dynamic loss scaling for fp16 (what ``torch.amp.GradScaler`` does), usable per parameter.

    GradScaler unscales and checks all gradients of an optimizer at once; the fused step needs
    the same for one gradient at a time, inside backward. Disabled (scale 1) unless fp16.
    """

    def __init__(self, enabled: bool, scale: float = 2.0**16, growth_interval: int = 2000):
        self.enabled, self.scale, self.growth_interval, self.good_steps = enabled, scale if enabled else 1.0, growth_interval, 0

    def unscale_(self, grad: torch.Tensor) -> bool:
        """Unscale in place; False when the gradient overflowed."""
        if not self.enabled:
            return True
        grad.mul_(1.0 / self.scale)
        return bool(torch.isfinite(grad).all())  # a GPU sync per call: the price of deciding per parameter

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale, self.good_steps = self.scale / 2, 0
        else:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale, self.good_steps = self.scale * 2, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = state["scale"], state["good_steps"]


def make_adamw(params, kind: str, lr: float):
    if kind == "adamw8bit":
        import bitsandbytes as bnb  # blockwise 8-bit states: 2 bytes per parameter instead of 8
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=1e-2)
    return torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)


class UNetOptimizer:
    """AdamW over the UNet's parameters, stepped after backward or fused into it.

    Fused: every parameter gets its own optimizer, stepped by a hook the moment its gradient is
    complete (``register_post_accumulate_grad_hook``); the gradient is freed right away, so peak
    memory holds one gradient instead of all of them. This needs the whole gradient in one
    backward: with gradient accumulation, or on several GPUs (their gradients are averaged after
    the hook would fire), the ordinary step runs instead. No gradient clipping: it needs the norm
    of all gradients before any step.

    fp16 overflow, by design different from the ordinary step: an inf/NaN gradient never reaches a
    weight or an optimizer state, and the loss scale halves, as with ``torch.amp.GradScaler``; but
    the parameters whose gradients completed before it in backward order have already taken their
    step, so that batch's update is partial (each parameter's Adam stays self-consistent). Skipping
    the whole step would need every gradient checked before any is applied: a second backward
    pass per step (about a third more time on every step) or all gradients kept (the memory this
    saves). Overflows come a few times while the scale calibrates and then about once per
    ``growth_interval`` (2,000) steps, when the scale doubles and overflows again: one partial
    batch in 2,000. ``partial_steps`` counts them; the run reports the number.
    """

    def __init__(self, params: list[torch.nn.Parameter], kind: str, lr: float, scaler: LossScaler, fused: bool):
        self.params, self.scaler, self.fused, self.lr, self.overflow = params, scaler, fused, lr, False
        self.reached: set[int] = set()  # ids of the parameters whose hook ran in this backward
        self.applied = 0                # of those, how many took their step
        self.partial_steps = 0          # fused fp16 steps cut short by an overflow after some parameters stepped
        self.hooks = []
        if fused:
            self.optimizers = [make_adamw([p], kind, lr) for p in params]
            # A hook lives on its parameter, where the garbage collector cannot see it: one that held this
            # object would keep it, every parameter and every optimizer state alive after training (found
            # by benchmarks/rehearsal.py: 3.5 GB for SD 1.5). So the hooks hold a weak reference, and go with it.
            me = weakref.ref(self)
            self.hooks = [p.register_post_accumulate_grad_hook(lambda p, i=i: me()._step_one(p, me().optimizers[i]))
                          for i, p in enumerate(params)]
        else:
            self.optimizers = [make_adamw(params, kind, lr)]

    def __del__(self):
        for hook in self.hooks:
            hook.remove()

    def _step_one(self, p: torch.nn.Parameter, optimizer) -> None:
        if id(p) in self.reached:
            # Reentrant checkpointing runs a backward inside the backward: a parameter's hook fires
            # for a part of its gradient, and it would step twice on parts.
            raise RuntimeError(
                "fused_step: a parameter's gradient completed twice in one backward pass, which happens under "
                "reentrant gradient checkpointing (torch.utils.checkpoint with use_reentrant=True). Use "
                "unet.enable_gradient_checkpointing() without a custom function (diffusers' default is "
                "non-reentrant), or set fused_step=False.")
        self.reached.add(id(p))
        if not self.overflow and self.scaler.unscale_(p.grad):
            optimizer.param_groups[0]["lr"] = self.lr
            optimizer.step()
            self.applied += 1
        else:
            self.overflow = True
        p.grad = None

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of the (scaled) loss; the fused step happens in here."""
        self.reached.clear()
        (loss * self.scaler.scale).backward()

    def step(self) -> None:
        """After the last micro-batch of a step: the ordinary optimizer step, and the loss-scale update."""
        if not self.fused:
            grads = [p.grad for p in self.params if p.grad is not None]
            self.overflow = not all([self.scaler.unscale_(g) for g in grads])
            optimizer = self.optimizers[0]
            if grads and not self.overflow:
                optimizer.param_groups[0]["lr"] = self.lr
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        elif self.overflow and self.applied:
            self.partial_steps += 1
        self.scaler.update(self.overflow)
        self.overflow, self.applied = False, 0

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers], "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        self.scaler.load_state_dict(state["scaler"])


def trainable(unet) -> list[torch.nn.Parameter]:
    """The parameters that train: all of the UNet's, or only its LoRA layers'."""
    return [p for p in unet.parameters() if p.requires_grad]


class CpuEMA:
    """Exponential moving average of the trained weights, kept in CPU memory (no GPU cost).

    The decay warms up as in diffusers' ``EMAModel``: at optimizer step ``s`` it is
    ``min(decay, (1 + t) / (10 + t))`` with ``t = s - 1`` (0 at the first step). Without the warmup a
    0.9999 EMA after 1,000 steps would still be 90 % the base model. ``step`` is the optimizer step
    of the last update (saved in the training state as ``last_ema``).
    """

    def __init__(self, unet, decay: float, step: int = 0):
        self.decay, self.step = decay, step
        self.weights = {name: p.detach().to("cpu", torch.float32, copy=True)
                        for name, p in unet.named_parameters() if p.requires_grad}

    def decay_at(self, step: int) -> float:
        t = step - 1
        return 0.0 if t <= 0 else min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, unet, step: int) -> None:
        """Bring the average to optimizer step ``step``, as if updated at each step since the last update
        with the weights as they are now: the old average keeps the product of those steps' decays."""
        keep = math.prod(self.decay_at(s) for s in range(self.step + 1, step + 1))
        for name, p in unet.named_parameters():
            if name in self.weights:
                self.weights[name].lerp_(p.detach().to("cpu", torch.float32), 1 - keep)
        self.step = step

    @torch.no_grad()
    def copy_to(self, unet) -> None:
        for name, p in unet.named_parameters():
            if name in self.weights:
                p.copy_(self.weights[name])
