"""Builds every notebook from its jupytext source, executes it and writes the .ipynb with outputs.

    python notebooks/run.py                                   # `make notebooks`
    python notebooks/run.py 03_tiny_retinanet                 # only the named notebooks
    JFOCAL_NOTEBOOK_BUDGET=small python notebooks/run.py      # the test suite's quick budget

The ``.py`` files (percent format) are the sources to edit; the ``.ipynb`` files are
generated, committed with their outputs so that they can be read on GitHub.
"""

from __future__ import annotations

import pathlib
import sys

import jupytext
import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).parent
SOURCES = sorted(HERE.glob("[0-9][0-9]_*.py"))
BUDGET_VARIABLE = "JFOCAL_NOTEBOOK_BUDGET"


def execute(source: pathlib.Path, *, timeout: int = 900) -> nbformat.NotebookNode:
  """The notebook of ``source`` executed in a fresh kernel whose working directory is notebooks/."""
  notebook = jupytext.read(source)
  NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                 resources={"metadata": {"path": str(source.parent)}}).execute()
  return notebook


def main(names: list[str]) -> None:
  unknown = set(names) - {s.stem for s in SOURCES}
  if unknown:
    raise SystemExit(f"no notebook named {sorted(unknown)}; have {[s.stem for s in SOURCES]}")
  for source in (s for s in SOURCES if not names or s.stem in names):
    print(f"executing {source.name}", flush=True)
    nbformat.write(execute(source), source.with_suffix(".ipynb"))


if __name__ == "__main__":
  main(sys.argv[1:])
