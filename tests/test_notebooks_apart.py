"""The notebooks that hand nothing over to the others, and the SD 2.x flavour's path through 03, 04 and 05.

A file of their own, so that the suite's workers (scripts/test.sh) run them beside test_notebooks.py's
chain of notebooks 01 to 07, which must run in order on one worker.
"""

import pytest

from sdcourse.course import execute_notebook, notebook_paths, outputs_for
from test_notebooks import APART, NOTEBOOKS, check_ran


@pytest.mark.parametrize("path", [p for p in notebook_paths() if p.stem in APART], ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, tmp_path):
    check_ran(execute_notebook(path, outputs_for(path, tmp_path / "drive"), smoke=True, workdir=tmp_path / "runtime"))


def test_the_sd2_flavour_goes_through_03_04_05(tmp_path):
    outputs = tmp_path / "drive"
    for number in ("03", "04", "05"):
        # 100 smoke steps: this test follows the v-prediction path; what a fine-tune teaches the
        # miniature is measured on the SD 1.x course run (test_notebooks.py).
        params = {"MODEL": "sd2", "SMOKE_STEPS": 100} if number == "03" else {}
        book = execute_notebook(NOTEBOOKS[number], outputs, smoke=True, params=params, workdir=tmp_path / number)
        check_ran(book)
    text = "".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.outputs)
    assert "miniature/sd-v" in text and "v_prediction prediction" in text  # 05 merged onto the SD 2 base
