"""What one notebook hands to the next, and a loud stop when it is not there.

On Colab every notebook opens in a new runtime with its own disk: only the outputs folder on Google
Drive carries the dataset (01, 02), the fine-tune (03) and its base model on to the next notebook.
Each notebook asks for what it needs with one call here, which prints one line saying what it uses
and where that came from, or raises ``MissingInput`` naming what is missing and the ways on. Only
smoke mode, or the learner's explicit choice, falls back to the bundled sample data.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import costs, models
from .runtime import Runtime

# What makes two UNets interchangeable in one pipeline: the same layers with the same shapes.
ARCHITECTURE_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
                     "cross_attention_dim", "attention_head_dim", "use_linear_projection")


class MissingInput(RuntimeError):
    """A notebook's input (a previous notebook's output) is not there; the message says the ways on."""


class ModelMismatch(ValueError):
    """A fine-tuned UNet and a base pipeline of different architectures (an SD 2 UNet, an SD 1.5 pipeline)."""


def _drive_hint(rt: Runtime) -> str:
    return (f"The outputs folder is {rt.outputs}. On Colab each notebook runs on a new machine: tick USE_DRIVE "
            "in every notebook so they share Google Drive's MyDrive/sdcourse.")


def dataset(rt: Runtime, folder: str | Path = "", use_sample: bool = False) -> Path:
    """The captioned dataset: ``folder`` if given, else notebook 01/02's ``outputs/dataset``, else
    the bundled sample when asked for (or in smoke mode); otherwise stop and say what to do."""
    from .sample_data import sample_dataset_dir

    if folder:
        folder = Path(folder)
        if not (folder / "metadata.csv").is_file():
            raise MissingInput(f"DATASET_FOLDER={str(folder)!r} has no metadata.csv (file_name,text): point it "
                               "at a folder built by notebook 01, or leave it empty.")
        print(f"Dataset: {folder} (the folder you chose)")
        return folder
    built = rt.outputs / "dataset"
    if (built / "metadata.csv").is_file():
        print(f"Dataset: {built} (built by notebooks 01-02)")
        return built
    if use_sample or rt.smoke:
        sample = sample_dataset_dir()
        why = "you ticked USE_SAMPLE_DATA" if use_sample else "smoke mode"
        print(f"Dataset: the bundled sample of 36 coloured shapes, {sample} ({why}; nothing at {built})")
        return sample
    raise MissingInput(
        f"No dataset at {built} (no metadata.csv). Ways on: run notebook 01 (then 02 for captions) first; "
        "or set DATASET_FOLDER to a folder with images and a metadata.csv; or tick USE_SAMPLE_DATA to use "
        f"the bundled sample of 36 coloured shapes. {_drive_hint(rt)}")


@dataclass
class FineTune:
    folder: Path            # a pipeline folder with unet/ (notebook 03's finetune/final)
    base_model: str         # what from_pretrained loads for the model it was fine-tuned from
    prediction_type: str    # "epsilon" or "v_prediction", from its scheduler config
    dataset: Path | None    # what it was trained on, when recorded
    steps: int | None       # the training run's max_steps, when recorded

    def caption(self) -> str | None:
        """The first caption of the data it was trained on, when that is still there."""
        try:
            texts = pd.read_csv(self.dataset / "metadata.csv", dtype=str, keep_default_na=False)["text"]
        except (OSError, KeyError, TypeError, ValueError):
            return None
        return next((t for t in texts if t.strip()), None)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def finetune(rt: Runtime, folder: str | Path = "", base_model: str = "") -> FineTune:
    """Notebook 03's fine-tune (``outputs/finetune/final``) or ``folder``, with the base model it was
    trained from, read from the run's ``config.json`` beside it (``base_model`` overrides it)."""
    final = Path(folder) if folder else rt.outputs / "finetune" / "final"
    if not (final / "unet").is_dir():
        chosen = f"The folder you chose, {final}," if folder else f"{final}"
        raise MissingInput(
            f"No fine-tuned model: {chosen} has no unet/ folder. Ways on: run notebook 03 first (it writes "
            "finetune/final); or set FINETUNE_FOLDER to a diffusers pipeline folder of a fine-tune. "
            + ("" if folder else _drive_hint(rt)))
    run = _read_json(final.parent / "config.json")  # TrainConfig.save of the run that wrote it
    base = base_model or run.get("model", "")
    if not base:
        raise MissingInput(f"{final} does not say which model it was fine-tuned from (no config.json beside it, "
                           "as notebook 03 writes): set BASE_MODEL to that model's preset, hub id or folder.")
    base = models.resolve(base, smoke=rt.smoke)
    scheduler = _read_json(final / "scheduler" / "scheduler_config.json")
    ft = FineTune(final, base, scheduler.get("prediction_type", "epsilon"),
                  Path(run["dataset"]) if run.get("dataset") else None, run.get("max_steps"))
    source = "notebook 03" if not folder else "the folder you chose"
    print(f"Fine-tune: {final} ({source}; fine-tuned from {base}, {ft.prediction_type} prediction"
          + (f", on {ft.dataset}" if ft.dataset else "") + ")")
    return ft


def base_model(rt: Runtime, override: str = "") -> str:
    """The course's base model: ``override`` (a preset, hub id or folder) when given, else the one
    notebook 03 fine-tuned, so every notebook after 03 works on the same model."""
    if override:
        model = models.resolve(override, smoke=rt.smoke)
        print(f"Base model: {model} (BASE_MODEL, your choice)")
        return model
    try:
        return finetune(rt).base_model
    except MissingInput as e:
        raise MissingInput(f"{e} (Here only its base model is needed: setting BASE_MODEL to 'sd15', 'sd2' or a "
                           "hub id also works.)") from None


# Notebook 06's two LoRAs, by the names notebook 07's prompt tags use: <lora:style:0.8>, <lora:subject:1>.
LORA_OUTPUTS = {"style": ("lora", "final"), "subject": ("dreambooth", "lora", "final")}


def loras(rt: Runtime, **folders: str) -> dict[str, Path]:
    """Notebook 06's LoRAs (``outputs/lora/final``, the style; ``outputs/dreambooth/lora/final``, the
    subject), or the folders or ``.safetensors`` files given by name (``style="..."``)."""
    from .lora import WEIGHT_NAME

    found = {}
    for name, parts in LORA_OUTPUTS.items():
        chosen = folders.get(name, "")
        path = Path(chosen) if chosen else rt.outputs.joinpath(*parts)
        file = path if path.suffix == ".safetensors" else path / WEIGHT_NAME
        if not file.is_file():
            chosen_text = f"The file you chose for {name!r}, {file}," if chosen else f"{file}"
            raise MissingInput(
                f"No {name} LoRA: {chosen_text} does not exist. Ways on: run notebook 06 first (it writes "
                f"{'/'.join(parts)}); or set the {name.upper()}_LORA setting to a LoRA folder or a .safetensors file "
                "(kohya's format, as the web UIs share them). " + ("" if chosen else _drive_hint(rt)))
        found[name] = path
    print("LoRAs: " + ", ".join(f"<lora:{name}:...> = {path}" for name, path in found.items())
          + (" (notebook 06)" if not any(folders.values()) else ""))
    return found


def check_unet_fits(pipe, unet, source: str | Path = "the fine-tuned UNet") -> None:
    """Raise ``ModelMismatch`` when ``unet`` cannot run in ``pipe`` (instead of a shape error mid-sampling)."""
    text_width = pipe.text_encoder.config.hidden_size
    differences = [f"{key}: {unet.config.get(key)} here, {pipe.unet.config.get(key)} in the base"
                   for key in ARCHITECTURE_KEYS if unet.config.get(key) != pipe.unet.config.get(key)]
    if unet.config.cross_attention_dim != text_width:
        differences.insert(0, f"it reads {unet.config.cross_attention_dim}-wide text embeddings, the base "
                              f"pipeline's text encoder writes {text_width}-wide ones")
    if differences:
        raise ModelMismatch(
            f"{source} was not fine-tuned from this base model ({pipe.config._name_or_path}): "
            + "; ".join(differences) + ". SD 2 models read 1024-wide text embeddings, SD 1.x 768-wide. Load "
            "the base model it was trained from (notebook 03 records it in finetune/config.json, `model`), "
            "or set BASE_MODEL to it.")


FREE_DRIVE_BYTES = 15e9  # a free Google account's storage, shared with Gmail and Photos


def unet_parameters(sd2: bool) -> int:
    """Parameters of SD 1.5's or SD 2's UNet, counted on the meta device (no memory, no download)."""
    from .memory import unet_shape

    return sum(p.numel() for p in unet_shape(sd2).parameters())


def plan_checkpoints(cfg, rt: Runtime, on_colab_disk: bool = True) -> None:
    """Say what a checkpoint weighs and how many fit, and, when the outputs are on Drive and
    ``on_colab_disk``, keep the resumable checkpoints on the runtime's own disk (keep_checkpoints=1)
    with a copy of the newest on Drive every 4 checkpoints: what a free Drive can hold."""
    print("What a resumable checkpoint weighs, computed from parameter counts (benchmarks/rehearsal.py measured "
          "5.19 GB for SD 1.5 and 5.23 GB for SD 2 with 8-bit AdamW, within 1 % of this): fp32 UNet + "
          f"{'8-bit ' if cfg.optimizer == 'adamw8bit' else ''}AdamW states")
    _print_checkpoint_sizes("UNet", unet_parameters, cfg.optimizer,
                            snapshot=lambda n: f"; a comparison snapshot (fp16 UNet) {2 * n / 1e9:.2f} GB")
    _place_checkpoints(cfg, rt, on_colab_disk, "checkpoints")


def plan_controlnet_checkpoints(cfg, rt: Runtime, on_colab_disk: bool = True) -> None:
    """``plan_checkpoints`` for a ``controlnet.ControlNetConfig``: what its checkpoint weighs (the ControlNet's
    parameters, not the UNet's), and on Colab with Drive the resumable ones on the runtime's disk, in a folder
    of their own (a UNet checkpoint of notebook 03 there is no ControlNet to resume from)."""
    from .controlnet import controlnet_parameters

    print("What a resumable ControlNet checkpoint weighs, computed from parameter counts (not measured): fp32 "
          f"ControlNet + {'8-bit ' if cfg.optimizer == 'adamw8bit' else ''}AdamW states")
    _print_checkpoint_sizes("ControlNet", controlnet_parameters, cfg.optimizer)
    _place_checkpoints(cfg, rt, on_colab_disk, "controlnet-checkpoints")


def _print_checkpoint_sizes(model: str, parameters, optimizer: str, snapshot=lambda n: "") -> None:
    """For SD 1.5 and SD 2: ``parameters(sd2)`` of ``model``, what its checkpoint weighs, how many fit a free Drive."""
    from .checkpoints import checkpoint_bytes

    for name, sd2 in (("SD 1.5", False), ("SD 2", True)):
        n = parameters(sd2)
        size = checkpoint_bytes(n, optimizer)
        print(f"  {name}: {n:,} {model} parameters -> {size / 1e9:.2f} GB per checkpoint, "
              f"{int(FREE_DRIVE_BYTES // size)} fit an empty free Drive (15 GB){snapshot(n)}")


def _place_checkpoints(cfg, rt: Runtime, on_colab_disk: bool, local_name: str) -> None:
    """Where the resumable checkpoints go (see ``plan_checkpoints``): ``rt.local / local_name`` with a copy on Drive."""
    print("  Each kept checkpoint plus the one being written must fit; on Drive, deleted checkpoints sit in "
          "the bin and still count for 30 days.")
    on_drive = rt.local is not None and rt.local != rt.outputs
    if on_drive and on_colab_disk:
        cfg.local_checkpoints = str(rt.local / local_name)
        cfg.keep_checkpoints, cfg.copy_every = 1, 4 * cfg.checkpoint_every
        free = shutil.disk_usage(rt.local).free
        print(f"Resumable checkpoints: {cfg.local_checkpoints} (this runtime's disk, {free / 1e9:.0f} GB free), "
              f"keep_checkpoints=1; every {cfg.copy_every} steps and at the end the newest is copied to "
              f"{Path(cfg.output_dir) / 'checkpoints'}, which a new session resumes from. Each copy replaces the "
              "previous one, which goes to Drive's bin: empty the bin between sessions of a long run, or the next "
              "copy will not fit (training then says so and goes on on this disk).")
    else:
        print(f"Resumable checkpoints: {Path(cfg.local_checkpoints or Path(cfg.output_dir) / 'checkpoints')}, "
              f"every {cfg.checkpoint_every} steps, keep_checkpoints={cfg.keep_checkpoints}: room for "
              f"{cfg.keep_checkpoints + 1} is needed while the next one is written.")


def announce_training(cfg, smoke: bool) -> None:
    """Print what a training run will cost before it starts (steps from max_steps or the dataset's size)."""
    images = len(pd.read_csv(Path(cfg.dataset) / "metadata.csv"))
    steps = cfg.max_steps or cfg.epochs * max(1, images // cfg.batch_size) // cfg.grad_accum
    costs.announce(f"Training {steps:,} steps of {cfg.batch_size * cfg.grad_accum} images on {images:,} images",
                   costs.t4_training_time(steps, cfg.batch_size * cfg.grad_accum, cfg.width, cfg.height), smoke)
