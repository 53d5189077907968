"""Checkpoints that never lose a run: written aside and renamed, the last K kept, the disk checked first.

A resumable checkpoint holds the UNet's fp32 weights (or only its LoRA layers), the training state
(step, optimizer and loss scale, loss history: ``training_state``) and the EMA weights; ``resume``
puts them back, so a resumed run ends with the same weights as an uninterrupted one. Every write
goes to a temporary folder that is renamed when complete (a rename is atomic), so an interruption
never leaves half a checkpoint. The free space is checked before each write, and room made by
deleting what ``keep_checkpoints`` would delete anyway; a full disk stops the run with a message
that says what to do, the last good checkpoint intact. ``Checkpoints`` can keep them on a fast disk
that does not last (Colab's) with a copy of the newest on Drive. The snapshots for comparing the
model over training and the final model are written the same careful way.
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import lora
from .models import Models
from .optimizer import CpuEMA
from .runtime import atomic_dir


def checkpoint_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob("step-*") if p.is_dir())


class NotEnoughSpace(RuntimeError):
    """A checkpoint does not fit where it goes; nothing half-written is left, the message says what to do."""


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a (nested) state dict: what saving it writes, near enough."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def checkpoint_bytes(n_params: int, optimizer: str) -> int:
    """What a resumable checkpoint of a full fine-tune weighs, computed: fp32 weights (4 bytes per
    parameter) and AdamW's two moments (8-bit: 2 bytes, plus per-block scales under 1 %; else
    fp32: 8 bytes)."""
    return n_params * (4 + (2 if optimizer == "adamw8bit" else 8))


def size_text(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def space_message(what: str, folder: Path, needed: int, free: int, last_good: Path | None) -> str:
    on_drive = "/content/drive" in str(Path(folder).resolve())
    return (f"Not enough space for {what} in {folder}: it needs about {size_text(needed)}, {size_text(free)} "
            f"is free. Nothing was left half-written; the last good checkpoint is {last_good or 'none yet'}. "
            "What to do: free space there"
            + (" (files deleted on Google Drive, also through Colab, go to Drive's bin and still count for "
               "30 days: empty it, drive.google.com > Bin > Empty bin)" if on_drive else "")
            + "; keep fewer checkpoints (keep_checkpoints=1); or keep resumable checkpoints on the Colab disk "
            "and only a copy of the newest on Drive (local_checkpoints='/content/checkpoints', copy_every=2000). "
            "Then run the training again: it resumes from the last good checkpoint.")


def make_room(folder: Path, needed: int, keep: int | None, what: str) -> None:
    """Check that ``needed`` bytes fit in ``folder``; if not, delete the checkpoints this save would
    delete anyway (``keep``: keep_checkpoints; None deletes nothing), oldest first, never the newest;
    else raise ``NotEnoughSpace``."""
    free = shutil.disk_usage(folder).free
    existing = checkpoint_dirs(folder)
    for old in existing[:len(existing) - max(keep - 1, 1)] if keep else []:
        if free >= needed:
            return
        print(f"Deleting {old.name} before writing {what}: there is not room for both, and "
              f"keep_checkpoints={keep} would delete it afterwards anyway.")
        shutil.rmtree(old)
        free = shutil.disk_usage(folder).free
    if free < needed:
        raise NotEnoughSpace(space_message(what, folder, needed, free, existing[-1] if existing else None))


def disk_full(error: BaseException) -> bool:
    """A write failed for lack of space (safetensors and torch.save report it as text, not errno)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error).lower()
    return "no space left" in text or "quota exceeded" in text or "file write failed" in text


def save_checkpoint(folder: Path, step: int, unet, training_state: dict, ema: CpuEMA | None, keep: int,
                    subfolder: str = "unet") -> Path:
    """``folder/step-000500/`` with ``unet/`` (diffusers layout; ``subfolder`` names it for another model, a
    ControlNet's) or, for LoRA, its LoRA weights, ``training_state.pt`` and the EMA weights. The free space is
    checked first, against the size of the last checkpoint (or, for the first, what its tensors weigh)."""
    from safetensors.torch import save_file

    target = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    existing = [d for d in checkpoint_dirs(folder) if d != target]
    needed = (folder_bytes(existing[-1]) if existing else
              tensor_bytes([p for p in unet.parameters() if p.requires_grad]) + tensor_bytes(training_state)
              + (tensor_bytes(ema.weights) if ema is not None else 0))
    make_room(folder, int(needed * 1.02) + 2**20, keep, f"checkpoint {target.name}")
    try:
        if lora.has_lora(unet):
            lora.save_lora(unet, tmp)
        else:
            unet.save_pretrained(tmp / subfolder, safe_serialization=True)
        torch.save(training_state, tmp / "training_state.pt")
        if ema is not None:
            save_file(ema.weights, tmp / "ema_unet.safetensors")
    except BaseException as e:  # an interruption or a full disk: give the space back at once
        free = shutil.disk_usage(folder).free
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and disk_full(e):
            raise NotEnoughSpace(space_message(f"checkpoint {target.name}", folder, int(needed), free,
                                               existing[-1] if existing else None)) from e
        raise
    if target.exists():  # the same step saved again by a resumed run
        shutil.rmtree(target)
    tmp.rename(target)
    for old in checkpoint_dirs(folder)[:-keep]:
        shutil.rmtree(old)
    return target


def remove_unfinished_checkpoints(folder: Path) -> None:
    for tmp in Path(folder).glob(".tmp-step-*"):
        print(f"Removing {tmp.name}: a checkpoint that was interrupted while being written.")
        shutil.rmtree(tmp)


def newest_checkpoint(*folders: Path | None) -> Path | None:
    """The checkpoint with the highest step in any of ``folders`` (the local disk, the copy on Drive)."""
    found = [d for f in folders if f is not None for d in checkpoint_dirs(f)]
    return max(found, key=lambda d: d.name, default=None)


def copy_newest(checkpoint: Path, to: Path) -> Path | None:
    """Copy a checkpoint to ``to`` (on Drive) and then delete the older copies there. When it does not
    fit, say so and carry on: training goes on with the checkpoints on the local disk."""
    target = to / checkpoint.name
    needed = folder_bytes(checkpoint)
    to.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(to).free
    if free < needed * 1.02:
        print("WARNING, the copy on Drive was NOT updated. "
              + space_message(f"a copy of {checkpoint.name}", to, needed, free, newest_checkpoint(to)))
        return None
    tmp = to / f".tmp-{checkpoint.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(checkpoint, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    for old in checkpoint_dirs(to)[:-1]:
        shutil.rmtree(old)
    print(f"Copied {checkpoint.name} to {to}")
    return target


@dataclass
class Checkpoints:
    """Where a run keeps its resumable checkpoints: ``folder``, the newest ``keep`` of them. When that is a
    fast disk that does not last, ``copies`` (on Drive) gets a copy of the newest every ``copy_every``
    steps and at the last step. ``subfolder``: the model's folder in each (``save_checkpoint``'s)."""
    folder: Path
    keep: int
    copies: Path | None = None
    copy_every: int = 1
    subfolder: str = "unet"

    @classmethod
    def of(cls, cfg, subfolder: str = "unet") -> "Checkpoints":
        """Where the run ``cfg`` (a ``TrainConfig`` or a ``ControlNetConfig``) keeps them: ``output_dir/checkpoints``,
        or ``cfg.local_checkpoints`` with the copies in ``output_dir/checkpoints``."""
        out = Path(cfg.output_dir) / "checkpoints"
        if cfg.local_checkpoints:
            return cls(Path(cfg.local_checkpoints), cfg.keep_checkpoints, out, cfg.copy_every, subfolder)
        return cls(out, cfg.keep_checkpoints, subfolder=subfolder)

    def newest(self) -> Path | None:
        return newest_checkpoint(self.folder, self.copies)

    def remove_unfinished(self) -> None:
        for folder in (self.folder, self.copies):
            if folder is not None and folder.is_dir():
                remove_unfinished_checkpoints(folder)

    def save(self, step: int, unet, state: dict, ema: CpuEMA | None, last: bool) -> None:
        saved = save_checkpoint(self.folder, step, unet, state, ema, self.keep, self.subfolder)
        if self.copies is not None and (step % self.copy_every == 0 or last):
            copy_newest(saved, self.copies)


def training_state(step: int, optimizer, curve, ema: CpuEMA | None) -> dict:
    """What a checkpoint holds besides the weights; ``resume`` reads it back."""
    return {"step": step, "optimizer": optimizer.state_dict(), "curve": curve.state_dict(),
            "last_ema": ema.step if ema is not None else None}


def resume(checkpoint: Path, optimizer, ema: CpuEMA | None, ema_every: int, device, say) -> dict:
    """Put a checkpoint's optimizer state and EMA back (its weights came with the model); the rest of its
    training state (step, loss history), without the optimizer's tensors.

    Loaded to the CPU and the optimizer part dropped once loaded: the optimizers copy what they load to
    their parameters' device (bitsandbytes deep-copies it first), so a state loaded to the GPU and kept
    would hold a second copy of every optimizer state there for the whole resumed run (1.6 GiB for SD 1.5
    with 8-bit AdamW, measured by benchmarks/rehearsal.py as the resumed run's extra peak).
    """
    state = torch.load(checkpoint / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state.pop("optimizer"))
    step = state["step"]
    if ema is not None and (checkpoint / "ema_unet.safetensors").exists():
        from safetensors.torch import load_file
        ema.weights = load_file(checkpoint / "ema_unet.safetensors")
        last = state.get("last_ema")  # absent from checkpoints written before it was kept
        ema.step = last if last is not None else step - step % ema_every
    elif ema is not None:
        say("The checkpoint has no EMA weights (EMA was off): the EMA starts from its weights now.")
        ema.step = step
    return state


def save_snapshot(folder: Path, step: int, unet) -> Path:
    """``folder/step-000025/unet``: the UNet in fp16 (half a checkpoint's weights, no optimizer
    state), kept for comparing the model over training; written aside, then renamed."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float16) for k, v in unet.state_dict().items()}
    target = Path(folder) / f"step-{step:06d}"
    target.parent.mkdir(parents=True, exist_ok=True)
    make_room(target.parent, tensor_bytes(state) + 2**20, None, f"snapshot {target.name}")
    with atomic_dir(target) as tmp:
        unet.save_config(tmp / "unet")
        save_file(state, tmp / "unet" / "diffusion_pytorch_model.safetensors")
    return target


def save_pipeline(model_id: str, m: Models, unet, final: Path) -> None:
    """A complete diffusers pipeline folder in safetensors; written aside, then renamed.

    The trained UNet in fp16 (1.7 GB for SD 1.5 instead of 3.4 GB of fp32 master weights: what a
    free Drive holds and a Colab loads quickly). The frozen VAE and text encoder come again from the
    base in fp32, never the copies training held in its compute dtype (bf16 would round them), and
    tokenizer and scheduler from the base too: the folder is 2.5 GB for SD 1.5. fp32 frozen parts make
    both common calls consistent: ``from_pretrained(folder)`` with no dtype gives fp32 throughout
    (diffusers upcasts the fp16 UNet; transformers 5 keeps a text encoder in its saved dtype, so an
    fp16 one would meet an fp32 UNet), and ``torch_dtype=torch.float16`` gives fp16 throughout.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTextModel

    unet.to("cpu").half()  # training is over: the fp32 master weights can go
    frozen = dict(torch_dtype=torch.float32, use_safetensors=True)
    pipe = StableDiffusionPipeline.from_pretrained(
        model_id, unet=unet, vae=AutoencoderKL.from_pretrained(model_id, subfolder="vae", **frozen),
        text_encoder=CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder", **frozen),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler.register_to_config(prediction_type=m.noise_scheduler.config.prediction_type)
    with atomic_dir(final) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)


def save_lora_result(unet, final: Path) -> None:
    """The LoRA weights alone (a few MB): they load on top of the base model. Written aside, then renamed."""
    with atomic_dir(final) as tmp:
        lora.save_lora(unet, tmp)
