"""Pictures: labelled image grids saved with their settings, latent previews, GIFs, plots, and the
live loss curve of a training run.

Every grid is a plain PIL image (shown inline by Jupyter, saved as PNG); every plot is a matplotlib
figure with a title and labelled axes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Linear map from the 4 channels of an SD 1.x latent (already multiplied by the VAE's scaling factor
# 0.18215, as the pipeline's latents are) to RGB in about [-1, 1]: the 4x3 factors ComfyUI uses for its
# cheap previews (github.com/comfyanonymous/ComfyUI, comfy/latent_formats.py, class SD15). SD 2.x uses
# the same VAE latent space, and ComfyUI the same factors for it.
SD1_LATENT_RGB_FACTORS = torch.tensor([
    #  R        G        B
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
])


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # a scalable font since Pillow 10.1


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Break ``text`` into lines no wider than ``width`` pixels (a single long word stays whole)."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return "\n".join(lines + [line])


def image_grid(images: list[Image.Image], rows: int, cols: int, row_labels: list[str] | None = None,
               col_labels: list[str] | None = None, title: str | None = None, *,
               font_size: int | None = None, min_cell: int = 0) -> Image.Image:
    """Paste images row-major into one picture, with a title on top, column titles and row titles.

    Cells take the size of the largest image; smaller ones are centred, never stretched. Images
    smaller than ``min_cell`` pixels a side are first enlarged by a whole factor (see ``enlarge``) so
    that tiny pictures and their labels stay readable. The font scales with the cell (about 1/14 of
    its height, at least 14 px) so labels are readable at any size.
    """
    if len(images) != rows * cols:
        raise ValueError(f"image_grid got {len(images)} images for {rows} rows x {cols} columns.")
    for name, labels, n in (("row_labels", row_labels, rows), ("col_labels", col_labels, cols)):
        if labels is not None and len(labels) != n:
            raise ValueError(f"{name} has {len(labels)} entries for {n} {name[:3]}s.")
    if min_cell:
        images = [enlarge(img, min_cell) for img in images]
    cell_w = max(img.width for img in images)
    cell_h = max(img.height for img in images)
    size = font_size or max(14, cell_h // 14)
    font, title_font = _font(size), _font(round(size * 1.3))
    pad = size // 2
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def block_height(text, fnt, width):
        box = measure.multiline_textbbox((0, 0), _wrap(measure, text, fnt, width), font=fnt)
        return box[3] + 2 * pad

    left = max((measure.textlength(s, font=font) for s in row_labels), default=0) if row_labels else 0
    left = min(int(left) + 2 * pad, 2 * cell_w) if row_labels else 0  # very long row titles wrap instead
    col_h = max(block_height(s, font, cell_w - 2 * pad) for s in col_labels) if col_labels else 0
    grid_w = left + cols * cell_w
    title_h = block_height(title, title_font, grid_w - 2 * pad) if title else 0

    grid = Image.new("RGB", (grid_w, title_h + col_h + rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.multiline_text((pad, pad), _wrap(draw, title, title_font, grid_w - 2 * pad), fill="black", font=title_font)
    for c, label in enumerate(col_labels or []):
        x = left + c * cell_w + cell_w // 2
        draw.multiline_text((x, title_h + pad), _wrap(draw, label, font, cell_w - 2 * pad), fill="black",
                            font=font, anchor="ma", align="center")
    for r, label in enumerate(row_labels or []):
        text = _wrap(draw, label, font, left - 2 * pad)
        height = draw.multiline_textbbox((0, 0), text, font=font)[3]
        # Centred by hand: older Pillows (Colab's) accept only top anchors for multi-line text.
        draw.multiline_text((pad, title_h + col_h + r * cell_h + (cell_h - height) // 2), text, fill="black", font=font)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        x = left + c * cell_w + (cell_w - img.width) // 2
        y = title_h + col_h + r * cell_h + (cell_h - img.height) // 2
        grid.paste(img.convert("RGB"), (x, y))
    return grid


def save_with_settings(image: Image.Image, path: str | Path, settings: dict) -> Path:
    """Save ``image`` as PNG and the settings that made it beside it (same name, ``.json``)."""
    path = Path(path).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    path.with_suffix(".json").write_text(json.dumps(settings, indent=2, default=str) + "\n")
    return path


def enlarge(image: Image.Image, min_side: int = 256) -> Image.Image:
    """Scale a small image up by a whole factor (nearest neighbour: pixels stay visible squares)."""
    factor = max(1, -(-min_side // min(image.size)))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def fit(image: Image.Image, max_side: int) -> Image.Image:
    """Scale a large image down to at most ``max_side`` pixels a side, keeping its aspect ratio."""
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def latents_to_rgb(latents: torch.Tensor, scale: int = 8) -> Image.Image:
    """The cheap preview: a [4, h, w] latent through the linear 4->3 map, no VAE, upscaled ``scale`` x.

    Each latent pixel stands for an 8x8 patch, so the preview is blocky and its colours are only
    roughly right: this is why samplers' live previews look like blurry mosaics until the end.
    """
    rgb = torch.einsum("chw,cr->rhw", latents.float().cpu(), SD1_LATENT_RGB_FACTORS)
    rgb = ((rgb + 1) / 2).clamp(0, 1)  # the factors map to roughly [-1, 1], like the VAE's pixels
    image = Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """A [3, H, W] tensor in [-1, 1] (pixels) or any [H, W] map (min-max scaled to grey) as a PIL image."""
    x = x.detach().float().cpu()
    if x.ndim == 2:
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
    else:
        x = ((x + 1) / 2).clamp(0, 1).permute(1, 2, 0)
    return Image.fromarray((x.numpy() * 255).round().astype("uint8"))


def save_gif(frames: list[Image.Image], path: str | Path, ms_per_frame: int = 400, hold_last_ms: int = 1500) -> Path:
    """An animated GIF that loops forever and lingers on its last frame."""
    path = Path(path).with_suffix(".gif")
    path.parent.mkdir(parents=True, exist_ok=True)
    durations = [ms_per_frame] * (len(frames) - 1) + [hold_last_ms]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return path


def denoising_pictures(pipe, trace, min_cell: int = 192, max_cell: int = 256,
                       frame_cell: int = 384) -> tuple[Image.Image, list[Image.Image]]:
    """A ``sampling.DenoisingTrace`` as the talk's figure, and as one frame per step (for a GIF or a slider).

    Grid: one column per captured step; rows show the noisy latent through the VAE, the x0 estimate
    through the cheap linear preview, and the x0 estimate through the VAE. Its cells are scaled to
    at most ``max_cell`` pixels a side so many steps still fit a screen; the frames' cells to at most
    ``frame_cell``, which keeps a GIF of 512 px generations a few MB.
    """
    from .sampling import decode_latents

    noisy = decode_latents(pipe, torch.stack(trace.latents))
    x0 = decode_latents(pipe, torch.stack(trace.x0))
    previews = [latents_to_rgb(z, scale=pipe.vae_scale_factor) for z in trace.x0]
    steps = [f"step {s}/{trace.total_steps}" for s in trace.steps]
    grid = image_grid([fit(img, max_cell) for img in noisy + previews + x0], rows=3, cols=len(steps), col_labels=steps,
                      row_labels=["noisy latent, VAE decode", "x0 estimate, linear preview", "x0 estimate, VAE decode"],
                      title=f'"{trace.prompt}", seed {trace.seed}', min_cell=min_cell)
    frames = [image_grid([fit(p, frame_cell), fit(d, frame_cell)], rows=1, cols=2, title=s, min_cell=min_cell,
                         col_labels=["linear preview", "VAE decode"]) for p, d, s in zip(previews, x0, steps)]
    return grid, frames


def plot_noise_schedule(scheduler):
    """The training noise schedule: how much signal is left (alpha-bar) and the signal-to-noise ratio."""
    import matplotlib.pyplot as plt

    alpha_bar = scheduler.alphas_cumprod.float()
    t = torch.arange(len(alpha_bar))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax1.plot(t, alpha_bar, label=r"$\bar\alpha_t$ (signal variance)")
    ax1.plot(t, 1 - alpha_bar, label=r"$1-\bar\alpha_t$ (noise variance)")
    ax1.set(title="How much of the image is left at timestep t", xlabel="timestep t", ylabel="variance share")
    ax1.legend()
    ax2.semilogy(t, alpha_bar / (1 - alpha_bar))
    ax2.axhline(1, color="gray", linestyle=":", label="SNR = 1: as much noise as signal")
    ax2.set(title="Signal-to-noise ratio", xlabel="timestep t", ylabel=r"SNR = $\bar\alpha_t/(1-\bar\alpha_t)$ (log)")
    ax2.legend()
    fig.tight_layout()
    return fig


def plot_latent_channels(latents: torch.Tensor, title: str):
    """The 4 channels of one [4, h, w] latent, each with its own colour scale."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, latents.shape[0], figsize=(3.2 * latents.shape[0], 3.4))
    for c, ax in enumerate(axes):
        shown = ax.imshow(latents[c].float().cpu(), cmap="RdBu_r")
        ax.set(title=f"channel {c}", xlabel="latent x", ylabel="latent y")
        fig.colorbar(shown, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_attention_maps(image: Image.Image, tokens: list[str], maps: torch.Tensor, title: str, per_row: int = 5):
    """The generated image, then one heat map per prompt token over it (brighter = more attention)."""
    import matplotlib.pyplot as plt

    rows = -(-(len(tokens) + 1) // per_row)
    fig, axes = plt.subplots(rows, per_row, figsize=(2.8 * per_row, 3.0 * rows), squeeze=False)
    axes = axes.ravel()
    axes[0].imshow(image)
    axes[0].set(title="generated image", xlabel="x (px)", ylabel="y (px)")
    extent = (0, image.width, image.height, 0)
    for ax, token, heat in zip(axes[1:], tokens, maps):
        ax.imshow(image, extent=extent)
        ax.imshow(heat.float().cpu(), cmap="jet", alpha=0.55, extent=extent, interpolation="bilinear")
        ax.set(title=f"'{token}'  (mean {heat.mean():.3f})", xlabel="x (px)", ylabel="y (px)")
    for ax in axes[len(tokens) + 1:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in shell.config


class LossCurve:
    """Training and validation loss per step, redrawn in place in a notebook (one output, updated);
    saved as a PNG at the end.

    ``steps``/``losses`` are this session's; ``state_dict`` holds the whole run (earlier sessions
    included), travels in every checkpoint and comes back on resume, so the curve shows the whole run.
    """

    def __init__(self, live: bool, held_out: bool = True):
        import matplotlib.pyplot as plt

        self.fig, (self.ax, self.val_ax) = plt.subplots(1, 2, figsize=(11, 3))
        plt.close(self.fig)  # drawn only through the display handle, never twice
        self.ax.set(xlabel="step", ylabel="loss (MSE)", title="Training loss")
        (self.raw,) = self.ax.plot([], [], lw=0.8, alpha=0.4, label="per step")
        (self.smooth,) = self.ax.plot([], [], lw=2, label="moving average")
        self.ax.legend(loc="upper right")
        which = "held-out images" if held_out else "fixed training images"
        self.val_ax.set(xlabel="step", ylabel="loss (MSE)", title=f"Validation loss ({which}, fixed t and noise)")
        (self.val_line,) = self.val_ax.plot([], [], "o-", color="C2", ms=3)
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.earlier_steps: list[int] = []   # earlier sessions of this run, from the checkpoint
        self.earlier_losses: list[float] = []
        self.val_steps: list[int] = []       # the whole run
        self.val_losses: list[float] = []
        self.handle, self.drawn_at = None, 0.0
        if live and in_notebook():
            from IPython.display import display
            self.handle = display(self.fig, display_id=True)

    def add(self, step: int, loss: float) -> None:
        self.steps.append(step)
        self.losses.append(loss)

    def add_validation(self, step: int, loss: float) -> None:
        self.val_steps.append(step)
        self.val_losses.append(loss)

    def state_dict(self) -> dict:
        return {"steps": self.earlier_steps + self.steps, "losses": self.earlier_losses + self.losses,
                "val_steps": list(self.val_steps), "val_losses": list(self.val_losses)}

    def load_state_dict(self, state: dict) -> None:
        self.earlier_steps, self.earlier_losses = list(state["steps"]), list(state["losses"])
        self.val_steps, self.val_losses = list(state["val_steps"]), list(state["val_losses"])

    def draw(self, force: bool = False) -> None:
        # Rendering the figure takes a good fraction of a second: at most every 2 s, whatever the step rate.
        if not self.losses or (not force and time.perf_counter() - self.drawn_at < 2.0):
            return
        self.drawn_at = time.perf_counter()
        steps, losses = self.earlier_steps + self.steps, self.earlier_losses + self.losses
        window = max(1, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        self.raw.set_data(steps, losses)
        self.smooth.set_data(steps[window - 1:], smooth)
        self.val_line.set_data(self.val_steps, self.val_losses)
        for ax in (self.ax, self.val_ax):
            ax.relim()
            ax.autoscale_view()
        if self.handle is not None:
            self.handle.update(self.fig)
