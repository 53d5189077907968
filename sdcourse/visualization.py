"""Pictures: labelled image grids, plots, denoising steps.

(Interface stub from the foundation; issue 5 fills this module in. Keep ``image_grid``'s signature:
notebooks 01 and 03 call it.)
"""

from __future__ import annotations

from PIL import Image


def image_grid(images: list[Image.Image], rows: int, cols: int, row_labels: list[str] | None = None,
               col_labels: list[str] | None = None, title: str | None = None) -> Image.Image:
    """Paste images row-major into one labelled picture (labels come with issue 5)."""
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid
