"""ipywidgets panels for the notebooks. Works with ipywidgets 7.7+ (Colab) and 8.

One section per notebook; each panel is a plain function that builds widgets around library calls.
"""

from __future__ import annotations

# --- Notebook 02: caption editor (issue 3) ---

def caption_editor(dataset_dir, column: str = "text", size: int = 320):
    """Image, caption box, Previous / Next and Save over a dataset's ``metadata.csv``.

    Edits are kept as you type and move between images, and the panel counts the captions not yet
    saved; Save writes metadata.csv atomically (and the sidecar .txt files, if the dataset has them),
    or says why it could not. Nothing blocks: headless runs just build the panel.
    """
    from pathlib import Path

    import ipywidgets as w
    from PIL import Image

    from . import data

    dataset_dir = Path(dataset_dir)
    table = data.read_metadata(dataset_dir)
    if table.empty:
        raise ValueError(f"{dataset_dir / 'metadata.csv'} has no rows: build the dataset first (notebook 01).")
    if column not in table.columns:
        table[column] = ""
    on_disk = table[column].copy()  # what Save last wrote: an edit typed back to it is no edit
    picture = w.Image(format="png", width=size)
    caption = w.Textarea(layout=w.Layout(width="95%", height="70px"))
    position, status = w.Label(), w.Label()
    previous_button = w.Button(description="Previous", icon="arrow-left")
    next_button = w.Button(description="Next", icon="arrow-right")
    save_button = w.Button(description="Save", button_style="success", icon="save")
    state = {"row": 0, "problem": ""}

    def unsaved() -> int:
        return int((table[column] != on_disk).sum())

    def report(done: str = ""):
        count = unsaved()
        pending = f"{count} caption(s) not saved yet" if count else ""
        status.value = "; ".join(part for part in (state["problem"], done, pending) if part)

    def show(row: int):
        row = row % len(table)
        name = table.at[row, "file_name"]
        try:  # a picture gone from the folder must not stop its caption being shown and fixed
            with Image.open(dataset_dir / name) as img:
                thumb = img.convert("RGB")
            thumb.thumbnail((size, size))
            picture.value, state["problem"] = _png_bytes(thumb), ""
        except OSError as error:
            picture.value, state["problem"] = b"", f"cannot show {name}: {error.strerror or error}"
        state["row"] = row  # before the caption: the box's new text belongs to this row
        caption.value = table.at[row, column]
        position.value = f"{row + 1} / {len(table)}: {name}"
        report()

    def on_edit(change):
        if change["new"] != table.at[state["row"], column]:
            table.at[state["row"], column] = change["new"]
            report()

    def on_save(_):
        count = unsaved()
        try:
            path = data.write_metadata(dataset_dir, table)
        except OSError as error:  # a full or disconnected Drive: the edits stay here, unsaved
            report(f"NOT saved ({error}): try Save again")
            return
        on_disk[:] = table[column]
        report(f"saved {count} caption(s) to {path}")

    caption.observe(on_edit, names="value")
    previous_button.on_click(lambda _: show(state["row"] - 1))
    next_button.on_click(lambda _: show(state["row"] + 1))
    save_button.on_click(on_save)
    show(0)
    return w.VBox([w.HBox([previous_button, next_button, save_button, position]), picture, caption, status])


# --- Notebook 03: training config panel (issue 4) ---

def training_config_panel(cfg, config_path="train_config.json"):
    """Edit a ``TrainConfig`` in place, see the GPU memory estimate change, save or load it as JSON.

    Optional settings (max steps, min-SNR gamma, EMA decay) are off at 0. The estimate is for the
    model ``cfg.model`` names and the settings shown (see ``memory.estimate_for_config``). Training
    reads ``cfg`` when it starts: an edit reaches it when the train cell runs after the edit, which
    the panel says under its boxes.
    """
    import dataclasses

    import ipywidgets as w

    from . import memory
    from .train import TrainConfig

    # Wide enough for the longest label in JupyterLab's and Jupyter classic's fonts (the browser test checks).
    wide = {"style": {"description_width": "200px"}, "layout": w.Layout(width="390px")}
    boxes = {
        "epochs": w.BoundedIntText(min=1, max=1000, description="epochs", **wide),
        "max_steps": w.BoundedIntText(min=0, max=10**7, description="max steps (0: epochs)", **wide),
        "batch_size": w.BoundedIntText(min=1, max=64, description="batch size", **wide),
        "grad_accum": w.BoundedIntText(min=1, max=64, description="gradient accumulation", **wide),
        "lr": w.FloatText(description="learning rate", **wide),
        "lr_schedule": w.Dropdown(options=["cosine", "linear", "constant"], description="schedule", **wide),
        "warmup_ratio": w.BoundedFloatText(min=0, max=1, step=0.01, description="warmup ratio", **wide),
        "width": w.BoundedIntText(min=64, max=2048, step=64, description="width", **wide),
        "height": w.BoundedIntText(min=64, max=2048, step=64, description="height", **wide),
        "crop": w.Dropdown(options=["random", "center"], description="crop", **wide),
        "flip": w.Checkbox(description="random horizontal flip", indent=False),
        "buckets": w.Checkbox(description="aspect-ratio buckets", indent=False),
        "min_snr_gamma": w.BoundedFloatText(min=0, max=100, description="min-SNR gamma (0: off)", **wide),
        "noise_offset": w.BoundedFloatText(min=0, max=1, step=0.01, description="noise offset", **wide),
        "ema_decay": w.BoundedFloatText(min=0, max=1, step=0.0001, description="EMA decay (0: off)", **wide),
        "checkpoint_every": w.BoundedIntText(min=1, max=10**7, description="checkpoint every", **wide),
        "validate_every": w.BoundedIntText(min=0, max=10**7, description="samples every (0: never)", **wide),
        "gradient_checkpointing": w.Checkbox(description="gradient checkpointing", indent=False),
        "fused_step": w.Checkbox(description="optimizer step in backward", indent=False),
        "cache_latents": w.Checkbox(description="cache latents", indent=False),
        "optimizer": w.Dropdown(options=["adamw8bit", "adamw"], description="optimizer", **wide),
        "mixed_precision": w.Dropdown(options=["auto", "fp16", "bf16", "fp32"], description="mixed precision", **wide),
        "crop_margin": w.BoundedFloatText(min=0, max=1, step=0.025, description="crop margin (cached crops)", **wide),
        "val_loss_every": w.BoundedIntText(min=0, max=10**7, description="val. loss every (0: never)", **wide),
    }
    optional = {"max_steps", "min_snr_gamma", "ema_decay"}  # None in the config, 0 in the box
    estimate = w.HTML()
    path_box = w.Text(value=str(config_path), description="file", layout=w.Layout(width="420px"))
    save_button = w.Button(description="Save", icon="save")
    load_button = w.Button(description="Load", icon="folder-open")
    status = w.Label()
    when = w.HTML("<b>Training reads these values when the Train cell runs.</b> After <i>Run All</i> it has "
                  "already started with the values shown then: change them, then run the Train cell again.")

    def show_estimate():
        lines = str(memory.estimate_for_config(cfg)).splitlines()
        estimate.value = "<pre>" + "\n".join(lines) + "\n(T4: about 15 GiB usable)</pre>"

    def fill_from_config():
        for name, box in boxes.items():
            value = getattr(cfg, name)
            box.value = 0 if value is None and name in optional else value
        show_estimate()

    def on_change(change, name):
        value = change["new"]
        setattr(cfg, name, (value or None) if name in optional else value)
        show_estimate()
        status.value = f"{name} = {getattr(cfg, name)!r}: used when the Train cell runs next"

    def on_save(_):
        status.value = f"Saved {cfg.save(path_box.value)}"

    def on_load(_):
        try:
            loaded = TrainConfig.load(path_box.value)
        except (OSError, ValueError) as e:
            status.value = f"Not loaded: {e}"
            return
        for f in dataclasses.fields(cfg):
            setattr(cfg, f.name, getattr(loaded, f.name))
        fill_from_config()
        status.value = f"Loaded {path_box.value}"

    fill_from_config()
    for name, box in boxes.items():
        box.observe(lambda change, name=name: on_change(change, name), names="value")
    save_button.on_click(on_save)
    load_button.on_click(on_load)
    names = list(boxes)
    columns = w.HBox([w.VBox([boxes[n] for n in names[:12]]), w.VBox([boxes[n] for n in names[12:]])])
    return w.VBox([columns, when, estimate, w.HBox([path_box, save_button, load_button]), status])


# --- Notebooks 00 and 04: sampler and denoising-step scrubber (issue 5) ---

def _png_bytes(image) -> bytes:
    import io
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _show(picture, image, min_side: int = 256) -> None:
    """Put a PIL image into an ``ipywidgets.Image`` at its own size, never stretched to the output's width
    (a box stretches its children unless they have a width); one under ``min_side`` px is enlarged by a
    whole factor first, so a tiny model's 64 px picture can be seen."""
    from .visualization import enlarge

    image = enlarge(image, min_side)
    picture.value = _png_bytes(image)
    picture.layout.width = f"{image.width}px"


def sampler_panel(pipe, prompt: str, negative_prompt: str = "", steps: int = 30, guidance_scale: float = 7.5,
                  seed: int = 0, scheduler: str = "DPM++ 2M Karras", height: int | None = None,
                  width: int | None = None, unets: dict | None = None):
    """Prompt, negative prompt, steps, guidance, seed, scheduler, FreeU and a Generate button.

    ``unets`` ({label: UNet}) adds a model menu; the pipeline keeps its own UNet otherwise.
    Generates once straight away, so the panel is never empty (and a headless run shows a picture);
    each click generates again with the current settings.
    """
    import ipywidgets as w

    from . import sampling

    style = {"description_width": "110px"}
    layout = w.Layout(width="95%")
    prompt_box = w.Textarea(value=prompt, description="Prompt", style=style, layout=layout)
    negative_box = w.Text(value=negative_prompt, description="Negative prompt", style=style, layout=layout)
    steps_slider = w.IntSlider(value=steps, min=1, max=100, description="Steps", style=style)
    guidance_slider = w.FloatSlider(value=guidance_scale, min=1.0, max=15.0, step=0.5, description="Guidance", style=style)
    seed_box = w.IntText(value=seed, description="Seed", style=style)
    scheduler_menu = w.Dropdown(options=list(sampling.SCHEDULERS), value=scheduler, description="Scheduler", style=style)
    freeu_box = w.Checkbox(value=False, description="FreeU")
    unets = unets or {"pipeline's UNet": pipe.unet}
    model_menu = w.Dropdown(options=list(unets), description="Model", style=style)
    button = w.Button(description="Generate", button_style="primary", icon="paint-brush")
    picture = w.Image(format="png")
    caption = w.Label()

    def on_generate(_):
        button.disabled = True
        try:
            sampling.set_scheduler(pipe, scheduler_menu.value)
            with sampling.unet_swapped(pipe, unets[model_menu.value]):
                image = sampling.generate(pipe, [prompt_box.value], [seed_box.value], steps=steps_slider.value,
                                          guidance_scale=guidance_slider.value, height=height, width=width,
                                          negative_prompt=negative_box.value or None, freeu=freeu_box.value)[0]
        except Exception as error:  # a button's callback fails silently in Colab: say it in the panel too
            caption.value = f"Generation failed: {type(error).__name__}: {error}"
            raise
        else:
            _show(picture, image)
            caption.value = (f"{model_menu.value}: {scheduler_menu.value}, {steps_slider.value} steps, "
                             f"guidance {guidance_slider.value}, seed {seed_box.value}"
                             f"{', FreeU' if freeu_box.value else ''}")
        finally:
            button.disabled = False

    button.on_click(on_generate)
    on_generate(None)
    return w.VBox([prompt_box, negative_box, w.HBox([steps_slider, guidance_slider]),
                   w.HBox([seed_box, scheduler_menu, freeu_box]), model_menu, w.HBox([button, caption]), picture])


def step_scrubber(frames: list, labels: list[str]):
    """A slider over the frames of one generation (e.g. preview | decode per captured step).

    The slider's readout is the frame's own label ("step 5 of 40"), so it can never disagree with
    the picture; frames are shown at their own size.
    """
    import ipywidgets as w

    if len(frames) != len(labels) or not frames:
        raise ValueError(f"step_scrubber needs one label per frame, got {len(frames)} frames, {len(labels)} labels.")
    if len(set(labels)) != len(labels):
        raise ValueError(f"step_scrubber needs a different label for every frame, got {labels}.")
    pngs = [_png_bytes(frame) for frame in frames]  # encoded once: scrubbing only swaps bytes
    picture = w.Image(value=pngs[0], format="png", layout=w.Layout(width=f"{max(f.width for f in frames)}px"))
    slider = w.SelectionSlider(options=list(zip(labels, range(len(frames)))), index=0, description="Frame",
                               continuous_update=True, layout=w.Layout(width="420px"))

    def show(change):
        picture.value = pngs[change["new"]]

    slider.observe(show, names="value")
    return w.VBox([slider, picture])
