"""Every notebook executes (on the small budget), and the committed copy matches its source."""

from __future__ import annotations

import jupytext
import nbformat
import pytest

from notebooks import run

SOURCES = run.SOURCES


def cell_sources(notebook: nbformat.NotebookNode) -> list[tuple[str, str]]:
  return [(cell.cell_type, cell.source) for cell in notebook.cells]


def test_the_notebooks_of_the_examples_issue_are_there():
  assert {"01_focal_loss_explained", "02_composing_with_optax", "03_tiny_retinanet"} <= {
      s.stem for s in SOURCES}


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.stem)
def test_notebook_executes_without_errors(source, monkeypatch):
  monkeypatch.setenv(run.BUDGET_VARIABLE, "small")
  notebook = run.execute(source)  # raises CellExecutionError on the first failing cell
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook draws nothing"


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.stem)
def test_committed_notebook_is_its_source_executed(source):
  committed = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
  assert cell_sources(committed) == cell_sources(jupytext.read(source)), (
      f"{source.with_suffix('.ipynb').name} is out of date: run `make notebooks`")
  for cell in committed.cells:
    if cell.cell_type == "code":
      assert cell.execution_count is not None, "committed without outputs: run `make notebooks`"
      assert not [o for o in cell.outputs if o.output_type == "error"]
