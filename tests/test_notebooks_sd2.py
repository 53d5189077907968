"""The SD 2.x flavour (v-prediction, the miniature's sd-v) goes through notebooks 03, 04 and 05.

A file of its own, so that the suite's workers (scripts/test.sh) run it beside test_notebooks.py.
"""

from sdcourse.course import execute_notebook
from test_notebooks import NOTEBOOKS, check_ran


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
