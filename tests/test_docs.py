"""Public functions: written-out docstrings whose Args match the signature, typed signatures,
doctested examples, and a registry entry for every loss."""

import doctest
import inspect
import pathlib
import re
import typing

import jax
import pytest

import jfocal
import registry
from jfocal.engine import program

LOSSES = sorted(info.name for info in program.REGISTRY.values())
# The losses of a linear layer's logits, (features, kernel, labels): tests/test_linear.py.
STREAMED = sorted(info.name for info in program.REGISTRY.values()
                  if info.family == "linear_softmax")
MODULES = sorted({inspect.getmodule(getattr(jfocal, name)) for name in jfocal.__all__},
                 key=lambda module: module.__name__)


def documented_args(doc: str) -> list[str]:
  """The argument names of the Google-style ``Args:`` section of a dedented docstring."""
  section = re.search(r"^Args:\n(.*?)(?:\n\n|\Z)", doc, re.S | re.M)
  assert section, "no Args: section"
  return re.findall(r"^  (\w+):", section.group(1), re.M)


@pytest.mark.parametrize("name", jfocal.__all__)
def test_public_function_has_a_complete_docstring(name):
  doc = inspect.getdoc(getattr(jfocal, name))
  assert doc, f"{name} has no docstring"
  for section in ("Args:", "Returns:", "Examples:", ">>>", "References:"):
    assert section in doc, f"{name} docstring lacks {section!r}"
  if name in LOSSES:
    assert ".. math::" in doc and "<http" in doc


@pytest.mark.parametrize("name", jfocal.__all__)
def test_docstring_args_match_the_signature(name):
  fn = getattr(jfocal, name)
  parameters = list(inspect.signature(fn).parameters)
  assert documented_args(inspect.getdoc(fn)) == parameters


def test_docstrings_are_written_in_the_source():
  """No decorator assembles them: the source holds the text an editor shows."""
  for name in LOSSES:
    fn = getattr(jfocal, name)
    source = inspect.getsource(fn.__wrapped__)
    assert inspect.getdoc(fn).splitlines()[0] in source


@pytest.mark.parametrize("name", LOSSES)
def test_loss_signature_is_typed_logits_labels_then_keyword_only(name):
  fn = getattr(jfocal, name)
  signature = inspect.signature(fn)
  parameters = list(signature.parameters.values())
  positional = (["features", "kernel"] if name in STREAMED else ["logits"]) + [
      program.REGISTRY[fn].labels]
  assert [p.name for p in parameters[:len(positional)]] == positional
  assert all(p.kind is p.KEYWORD_ONLY for p in parameters[len(positional):])
  assert signature.parameters["reduction"].default == "none"
  hints = typing.get_type_hints(fn.__wrapped__)
  for parameter in parameters:
    assert parameter.name in hints, f"{name}({parameter.name}) is not typed"
    assert hints[parameter.name] is not typing.Any, f"{name}({parameter.name}) is typed Any"
  assert typing.get_args(hints["reduction"]) == ("none", "sum", "mean")
  assert "return" in hints


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_takes_its_familys_common_keywords(name):
  fn = getattr(jfocal, name)
  family = program.REGISTRY[fn].family
  keywords = set(inspect.signature(fn).parameters)
  common = {"weights", "where", "ignore_index", "reduction", "normalizer", "axis_name"}
  assert common <= keywords
  # IoU targets would all become positive with label smoothing.
  assert ("label_smoothing" in keywords) == (name not in ("quality_focal_loss", "varifocal_loss"))
  assert ("axis" in keywords) == (family == "softmax")
  assert ("z_loss" in keywords) == (family in ("softmax", "linear_softmax"))
  assert ("vocab_axis_name" in keywords) == (family == "linear_softmax")
  if family != "sigmoid":
    assert "pos_weight" not in keywords


def test_the_registry_covers_every_loss_and_every_hyper_parameter():
  """Every public loss has one registry entry, which passes all its own keywords."""
  assert set(registry.NAMES) == set(LOSSES) - set(STREAMED)
  for entry in registry.LOSSES.values():
    info = program.REGISTRY[entry.fn]
    assert entry.family == info.family and entry.stateful == info.stateful
    own = entry.keywords - registry.COMMON - {info.labels}
    assert own == set(entry.params), f"{entry.name}: registry params {set(entry.params)} != {own}"


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
