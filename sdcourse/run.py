"""One training run's surroundings: which process it is of how many, the precision it computes in, its
folders and the checkpoint it resumes from; and what it loads from there and writes there.

``train.train`` makes a ``Run`` first, then asks it for the models, the UNet ready to train with its
optimizer, each checkpoint and the final model. On one GPU (or the CPU) there is one process; under
``accelerate launch`` one per GPU, and only the main process writes files while the others wait.
"""

from __future__ import annotations

import importlib.util as importlib_util
from pathlib import Path

import torch

from . import lora, memory, models
from .checkpoints import Checkpoints, save_lora_result, save_pipeline, training_state
from .models import Models, load_models
from .optimizer import CpuEMA, LossScaler, UNetOptimizer, trainable
from .runtime import compute_dtype_for, free_memory


class Run:
    """The processes, precision and folders of the run that ``cfg`` (a ``TrainConfig``) describes. Making
    one prepares the folders (on the main process) and finds the checkpoint to resume from, if any."""

    def __init__(self, cfg):
        from accelerate import Accelerator

        self.cfg = cfg
        self.accelerator = Accelerator(mixed_precision="no")  # autocast and loss scaling are ours (see UNetOptimizer)
        self.device, self.rank, self.world, self.main = (self.accelerator.device, self.accelerator.process_index,
                                                         self.accelerator.num_processes, self.accelerator.is_main_process)
        self.say, self.unwrap = self.accelerator.print, self.accelerator.unwrap_model
        self.fused = cfg.fused_step and cfg.grad_accum == 1 and self.world == 1
        if cfg.fused_step and not self.fused:
            self.say("fused_step is off: it needs grad_accum=1 and a single GPU. Using the ordinary optimizer step.")
        self.dtype = compute_dtype_for(cfg.mixed_precision, self.device)
        # No autocast weight cache: it would hold a half-precision copy of every weight until the forward
        # pass ends (1.6 GiB for SD 1.5); casting again where a weight is used costs milliseconds.
        self.autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32,
                                       cache_enabled=False)
        self.out = Path(cfg.output_dir)
        self.checkpoints = Checkpoints.of(cfg)  # local_checkpoints: on the local disk, a copy of the newest in output_dir
        if self.main:
            self.checkpoints.folder.mkdir(parents=True, exist_ok=True)
            (self.out / "samples").mkdir(parents=True, exist_ok=True)
            self.checkpoints.remove_unfinished()
            cfg.save(self.out / "config.json")
        self.resume_from = self.checkpoints.newest() if cfg.resume else None

    def load_models(self) -> tuple[str, Models]:
        """The model's id and its parts, the frozen ones on the GPU in the compute dtype. The UNet comes from
        the checkpoint when resuming, else from the base model."""
        cfg = self.cfg
        model_id = models.resolve(cfg.model, smoke=False)
        m = load_models(model_id, frozen_dtype=self.dtype, prediction_type=cfg.prediction_type,
                        unet_from=None if cfg.lora_rank else self.resume_from)
        if cfg.lora_rank:  # the base UNet stays frozen; only the small LoRA layers train
            lora.add_lora(m.unet, cfg.lora_rank, seed=cfg.seed, conv=cfg.lora_conv)
            if self.resume_from is not None:
                lora.load_lora_into(m.unet, self.resume_from)
        for module in (m.vae, m.text_encoder):
            module.to(self.device)
        return model_id, m

    def prepare_unet(self, m: Models) -> tuple[torch.nn.Module, UNetOptimizer, CpuEMA | None]:
        """The UNet on the GPU in training mode, its optimizer, and the EMA of its weights if asked for."""
        cfg = self.cfg
        unet = m.unet.to(self.device).train()
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()  # recompute activations in backward: far less memory, ~30% slower
        if cfg.xformers and self.device.type == "cuda" and importlib_util.find_spec("xformers"):
            unet.enable_xformers_memory_efficient_attention()  # else PyTorch's scaled_dot_product_attention
        optimizer = UNetOptimizer(trainable(unet), cfg.optimizer, cfg.lr, LossScaler(self.dtype == torch.float16),
                                  self.fused)
        ema = CpuEMA(unet, cfg.ema_decay) if cfg.ema_decay and self.main else None  # saved by the main process only
        return unet, optimizer, ema

    def estimate_memory(self, unet, m: Models) -> memory.MemoryEstimate:
        cfg = self.cfg
        estimate = memory.estimate_peak(unet, sum(p.numel() for f in (m.vae, m.text_encoder) for p in f.parameters()),
                                        batch_size=cfg.batch_size, width=cfg.width, height=cfg.height,
                                        half_precision=self.dtype != torch.float32, optimizer=cfg.optimizer,
                                        fused_step=self.fused, gradient_checkpointing=cfg.gradient_checkpointing,
                                        cache_latents=cfg.cache_latents)
        estimate.on_cpu = self.device.type != "cuda"
        return estimate

    def measured_peak(self, estimate: memory.MemoryEstimate) -> float | None:
        """The peak GPU memory so far in GiB, said next to the estimate (on a GPU; None on the CPU)."""
        if self.device.type != "cuda":
            return None
        peak = torch.cuda.max_memory_allocated() / memory.GIB
        self.say(f"Measured peak GPU memory: {peak:.2f} GiB (estimated {estimate.total:.2f} GiB).")
        return peak

    def checkpoint(self, step: int, unet, optimizer: UNetOptimizer, curve, ema: CpuEMA | None, last: bool) -> None:
        """A resumable checkpoint at ``step`` (``last``: the run's last step), written by the main process."""
        if self.main:
            self.checkpoints.save(step, self.unwrap(unet), training_state(step, optimizer, curve, ema), ema, last)
        self.accelerator.wait_for_everyone()

    def save_result(self, model_id: str, m: Models, unet, final: Path) -> None:
        """The fine-tuned pipeline, or for LoRA its weights alone, in ``final``."""
        if self.main:
            unet = self.unwrap(unet)
            free_memory()
            if self.cfg.lora_rank:
                save_lora_result(unet, final)
                self.say(f"Saved the LoRA weights to {final / lora.WEIGHT_NAME} (load with "
                         f"pipe.load_lora_weights(folder, weight_name=\"{lora.WEIGHT_NAME}\"))")
            else:
                save_pipeline(model_id, m, unet, final)
                self.say(f"Saved the fine-tuned pipeline to {final}")
        self.accelerator.wait_for_everyone()
