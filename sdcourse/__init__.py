"""sdcourse: fine-tune Stable Diffusion end to end on one free Colab T4.

One module per idea: ``runtime`` (GPU, dtype, outputs), ``handover`` (what one notebook passes to
the next, or a loud stop), ``models`` (which model, loading it),
``tiny`` (offline stand-ins for smoke mode), ``sample_data``, ``sources`` and ``web`` (where a
dataset's images come from), ``data`` (cleaning them into a dataset, the report),
``practice`` (a local booru and broken files to practise on), ``captioning`` (BLIP), ``train``
(the UNet fine-tune: its settings, loss and loop) with the modules of the loop's steps, ``run``
(processes, precision, folders), ``training_set``, ``latent_cache``, ``optimizer``, ``checkpoints``
and ``validation``; ``memory`` (what it costs), ``sampling``, ``attention``, ``visualization``,
``widgets``, ``export`` (merging, single-file checkpoints), ``dreambooth``, ``textual_inversion``,
``course`` (run every notebook).
"""

__version__ = "0.1.0"
