"""ipywidgets panels for the notebooks. Works with ipywidgets 7.7+ (Colab) and 8.

One section per notebook; each panel is a plain function that builds widgets around library calls.
"""

from __future__ import annotations

# --- Notebook 02: caption editor (issue 3) ---

# --- Notebook 03: training config panel (issue 4) ---

# --- Notebooks 00 and 04: sampler and denoising-step scrubber (issue 5) ---
