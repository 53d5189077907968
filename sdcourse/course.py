"""Run the whole course, notebook after notebook, outside Jupyter.

``python -m sdcourse.course`` executes every notebook in ``notebooks/`` top to bottom, in order,
sharing one outputs folder so each notebook picks up what the previous one wrote, and saves the
executed copies (with their pictures) under ``outputs/executed``. With ``SDCOURSE_SMOKE=1`` (what
``scripts/course.sh`` sets) this is the whole course on the sample data and tiny models, on a CPU.
The test suite runs the notebooks through the same function.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from .runtime import REPO_ROOT

NOTEBOOKS = REPO_ROOT / "notebooks"
# The talk's one-notebook path, beside the ordered course: it runs in an outputs folder of its own.
QUICK_START = NOTEBOOKS / "quick_start.ipynb"


def notebook_paths() -> list[Path]:
    """The quick start (the README lists it first), then the ordered course, 00..07."""
    return [QUICK_START] + sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def outputs_for(path: Path, outputs: Path) -> Path:
    """The outputs folder a notebook runs with: the course's, or a folder of its own for the quick start."""
    return outputs / "quick_start" if path == QUICK_START else outputs


def set_params(book, params: dict) -> None:
    """Set a notebook's top-level settings (``MODEL = "sd15"  # @param ...`` lines), as a learner would."""
    for name, value in params.items():
        pattern = re.compile(rf"^{re.escape(name)} = .*?(\s+# @param.*)?$", re.MULTILINE)
        for cell in book.cells:
            if cell.cell_type == "code" and pattern.search(cell.source):
                cell.source = pattern.sub(lambda m: f"{name} = {value!r}{m.group(1) or ''}", cell.source, count=1)
                break
        else:
            raise KeyError(f"{name} is not a setting of this notebook")


def execute_notebook(path: Path, outputs: Path, smoke: bool = True, timeout: int = 1800, save_dir: Path | None = None,
                     params: dict | None = None, workdir: Path | None = None):
    """Execute one notebook; raise on the first failing cell. ``workdir``: a fresh working folder that
    is also the runtime's own disk (``rt.local``), as a new Colab runtime would have; only ``outputs``
    is shared with other notebooks. Without it, ``notebooks/`` is the working folder."""
    import nbformat
    from nbclient import NotebookClient

    book = nbformat.read(path, as_version=4)
    set_params(book, params or {})
    env = dict(os.environ, SDCOURSE_SMOKE="1" if smoke else "0", SDCOURSE_OUTPUTS=str(outputs),
               MPLBACKEND="module://matplotlib_inline.backend_inline")
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        env["SDCOURSE_LOCAL"] = str(workdir)
    client = NotebookClient(book, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir or path.parent)}})
    try:
        client.execute(env=env)
    finally:
        if save_dir is not None:  # keep the partial notebook too: it shows where it stopped
            save_dir.mkdir(parents=True, exist_ok=True)
            nbformat.write(book, save_dir / path.name)
    return book


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=Path, default=REPO_ROOT / "outputs" / "course",
                        help="outputs folder shared by the notebooks (default: outputs/course)")
    parser.add_argument("--only", nargs="*", default=None, help="notebook name prefixes to run, e.g. 00 03")
    args = parser.parse_args(argv)
    smoke = os.environ.get("SDCOURSE_SMOKE", "0") == "1"
    args.outputs.mkdir(parents=True, exist_ok=True)
    for path in notebook_paths():
        if args.only and not any(path.name.startswith(p) for p in args.only):
            continue
        start = time.perf_counter()
        print(f"Running {path.name} ({'smoke mode' if smoke else 'real models'}) ...", flush=True)
        execute_notebook(path, outputs_for(path, args.outputs), smoke=smoke, save_dir=args.outputs / "executed")
        print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
    print(f"\nExecuted notebooks, with their pictures: {args.outputs / 'executed'}")
    for label, pattern in (("Comparison grids", "compare/**/*.png"), ("Denoising steps", "**/*denois*.*")):
        found = sorted({p for p in args.outputs.glob(pattern) if "executed" not in p.parts})
        print(f"{label}:" + ("".join(f"\n  {p}" for p in found) if found else " none written"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
