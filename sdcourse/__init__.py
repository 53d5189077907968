"""sdcourse: fine-tune Stable Diffusion end to end on one free Colab T4.

One module per idea: ``runtime`` (GPU, dtype, outputs), ``handover`` (what one notebook passes to
the next, or a loud stop), ``models`` (which model, loading it),
``tiny`` (offline stand-ins for smoke mode), ``sample_data``, ``data`` (building a dataset),
``practice`` (a local booru and broken files to practise on), ``captioning`` (BLIP), ``train``
(the UNet fine-tune), ``memory`` (what it costs), ``sampling``, ``attention``, ``visualization``,
``widgets``, ``export`` (merging, single-file checkpoints), ``dreambooth``, ``textual_inversion``,
``course`` (run every notebook).
"""

__version__ = "0.1.0"
