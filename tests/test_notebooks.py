"""Every notebook of the course runs top to bottom in smoke mode (tiny models, sample data, CPU).

They run in order and share one outputs folder, as a learner's would: 03 trains on what 02 wrote,
04 compares with what 03 saved.
"""

import pytest

from sdcourse.course import execute_notebook, notebook_paths


@pytest.fixture(scope="module")
def course_outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("course_outputs")


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, course_outputs):
    book = execute_notebook(path, course_outputs, smoke=True, save_dir=course_outputs / "executed")
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert all(c.execution_count for c in book.cells if c.cell_type == "code" and c.source.strip())


def test_notebooks_are_stored_without_outputs():
    import nbformat
    for path in notebook_paths():
        book = nbformat.read(path, as_version=4)
        assert all(not c.outputs for c in book.cells if c.cell_type == "code"), f"{path.name} has outputs"
        assert any("SDCOURSE_SMOKE" in c.source for c in book.cells), f"{path.name} lacks the smoke switch"
