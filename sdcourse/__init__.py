"""sdcourse: fine-tune Stable Diffusion end to end on one free Colab T4.

One module per idea: ``runtime`` (GPU, dtype, outputs), ``models`` (which model, loading it),
``tiny`` (offline stand-ins for smoke mode), ``sample_data``, ``data`` (building a dataset),
``captioning`` (BLIP), ``training`` (the UNet fine-tune), ``sampling``, ``visualization``,
``widgets``, ``export``.
"""

__version__ = "0.1.0"
