"""Every public function is documented with a formula, shapes, an example and a reference."""

import doctest
import inspect
import pathlib
import re

import jax
import pytest

import jfocal

LOSSES = [name for name in jfocal.__all__
          if "entropy" in name or "focal" in name or name == "ghmc_loss"]
# The IoU-aware losses name their targets as the contract does, and take
# no label smoothing (it would make every IoU target positive).
TARGETS = {"quality_focal_loss": "scores", "varifocal_loss": "targets"}
MODULES = sorted({inspect.getmodule(getattr(jfocal, name)) for name in jfocal.__all__},
                 key=lambda module: module.__name__)


@pytest.mark.parametrize("name", jfocal.__all__)
def test_public_function_has_a_complete_docstring(name):
  doc = inspect.getdoc(getattr(jfocal, name))
  for section in ("Args:", "Returns:", "Examples:", ">>>", "References:"):
    assert section in doc, f"{name} docstring lacks {section!r}"
  if name in LOSSES:
    assert ".. math::" in doc and "arxiv.org/abs/1708.02002" in doc


@pytest.mark.parametrize("name", LOSSES)
def test_loss_signature_is_logits_labels_then_keyword_only(name):
  parameters = list(inspect.signature(getattr(jfocal, name)).parameters.values())
  assert [p.name for p in parameters[:2]] == ["logits", TARGETS.get(name, "labels")]
  assert all(p.kind is p.KEYWORD_ONLY for p in parameters[2:])
  common = {"weights", "where", "ignore_index", "label_smoothing", "reduction", "normalizer",
            "axis_name"} - ({"label_smoothing"} if name in TARGETS else set())
  assert common <= {p.name for p in parameters}
  assert inspect.signature(getattr(jfocal, name)).parameters["reduction"].default == "none"


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
  # Examples are written for JAX's defaults (float32), not the suite's x64 mode.
  with jax.enable_x64(False):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
  assert result.attempted > 0
  assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module.__name__}"


def test_readme_quick_start_runs():
  readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  code = re.search(r"## Quick start\n\n```python\n(.*?)```", readme, re.S).group(1)
  assert len(code.strip().splitlines()) <= 15
  namespace = {}
  with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
    exec(compile(code, "README.md", "exec"), namespace)
  assert namespace["loss"].shape == () and bool(jax.numpy.isfinite(namespace["loss"]))
