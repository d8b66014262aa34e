"""Fuzzing campaign: the promised semantics of every loss of the registry over wide inputs.

Every test draws the loss itself (any entry of `registry.LOSSES`) together with
its inputs: shapes with 0-sized axes, every float dtype, logits with
subnormals, huge values, +-inf and NaN, integer class ids in and out of range
in five integer dtypes (also class counts the dtype cannot hold), dense
integer 0/1 targets, float and bool targets, (class_ids, scores) pairs,
masks, weights, the loss's hyper-parameters from the registry's grid (static,
or traced as arrays), label smoothing, the softmax family's z_loss,
ignore_index, reductions and normalisers. The properties are stated once, in
the docstring of each test.

Under the default "ci" profile of `conftest.py` each test runs 6
derandomised examples; its "fuzz" profile runs thousands of random ones
(`make fuzz`).

Compiled callables are cached per static configuration (`_jitted`), so
examples that differ only in array values or in shapes already seen reuse
them.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

import registry
from helpers import FLOAT_DTYPES, host

NAMES = registry.NAMES
# The losses whose limits at +-inf logits the tests below compute.
SIGMOID_LIMITS = ("sigmoid_cross_entropy", "sigmoid_balanced_cross_entropy", "sigmoid_focal_loss")
SOFTMAX_LIMITS = ("softmax_cross_entropy", "softmax_balanced_cross_entropy", "softmax_focal_loss")

REDUCTIONS = ("none", "sum", "mean")
INT_DTYPES = (np.int8, np.int16, np.int32, np.int64, np.uint8)
FLOAT_LABEL_DTYPES = (np.float32, np.float64, jnp.bfloat16, np.float16)
SMOOTHINGS = (0.0, 0.1, 0.5, 1.0)
# The softmax family's z_loss; up to 0.5 its gradient 2 z lse softmax(x) fits every float
# range at every finite logit.
Z_LOSSES = (0.0, 1e-4, 0.5)
IGNORE_INDICES = (-100, -1, 0, 1, 255, 1000)  # plus C, added per case
BOUND = 1e4  # the README's "finite everywhere" range: |logit| <= 1e4

# (shape, axis); sigmoid cases ignore the axis. Simple shapes first: hypothesis
# shrinks towards the front of each list.
SHAPES = {
    "sigmoid": {
        "nonempty": [((3,), -1), ((2, 3), -1), ((1,), -1), ((), -1), ((4, 1), -1),
                     ((2, 2, 3), -1), ((2, 130), -1), ((1, 260), -1), ((1, 32768), -1)],
        "empty": [((0, 3), -1), ((2, 0, 3), -1), ((3, 0), -1), ((0,), -1), ((0, 0), -1),
                  ((2, 0), -1)],
    },
    "softmax": {
        "nonempty": [((2, 3), -1), ((3,), -1), ((2, 3), 0), ((4, 1), -1), ((2, 3, 4), 1),
                     ((2, 3, 4), -1), ((2, 130), -1), ((1, 260), -1), ((2, 3, 4), (1, 2))],
        "empty": [((0, 3), -1), ((2, 0, 3), -1), ((3, 0), 0), ((2, 0, 3), 2), ((0, 1), -1)],
    },
}


@dataclasses.dataclass(eq=False)
class Case:
  """One call: ``loss.fn(logits, labels, where=..., weights=..., **params, **options)``."""
  name: str
  logits: np.ndarray
  labels: Any                    # an array, or a (class_ids, scores) pair
  where: Any = None
  weights: Any = None
  params: dict = dataclasses.field(default_factory=dict)  # hyper-parameters; arrays are traced
  normalizer: Any = None         # None, "num_positives", a Python number, or a 0-d array
  reduction: str = "none"
  options: tuple = ()            # static keywords: label_smoothing, ignore_index, axis

  @property
  def loss(self):
    return registry.LOSSES[self.name]

  @property
  def family(self):
    return self.loss.family

  @property
  def axes(self):
    if self.family == "sigmoid":
      return (self.logits.ndim - 1,) if self.logits.ndim else ()
    axis = self.option("axis", -1)
    return tuple(a % self.logits.ndim for a in (axis if isinstance(axis, tuple) else (axis,)))

  @property
  def num_classes(self):
    return math.prod(self.logits.shape[a] for a in self.axes) if self.logits.ndim else None

  @property
  def out_shape(self):
    if self.family == "sigmoid":
      return self.logits.shape
    return tuple(d for i, d in enumerate(self.logits.shape) if i not in self.axes)

  @property
  def ids(self):
    """The integer labels (class ids, or dense 0/1 targets), or None."""
    labels = self.labels[0] if isinstance(self.labels, tuple) else self.labels
    return labels if np.issubdtype(np.asarray(labels).dtype, np.integer) else None

  @property
  def dense_integer(self):
    return self.ids is not None and np.shape(self.ids) == self.logits.shape

  def option(self, key, default):
    return dict(self.options).get(key, default)


# ---------------------------------------------------------------------------
# Calling the losses: one compiled callable per static configuration.

def _split(case, reduction):
  """(static key, traced arrays) of a call."""
  normalizer = case.normalizer if reduction == "mean" else None
  arrays = {k: v for k, v in case.params.items() if isinstance(v, np.ndarray)}
  static = tuple(sorted((k, v) for k, v in case.params.items() if k not in arrays))
  if isinstance(normalizer, np.ndarray):
    arrays["normalizer"], normalizer = normalizer, None
  return (case.name, reduction, normalizer, static, case.options), arrays


@functools.lru_cache(maxsize=None)
def _loss_fn(name, reduction, normalizer, static, options):
  fn = registry.LOSSES[name].fn
  stateful = registry.LOSSES[name].stateful

  def loss(logits, labels, where, weights, arrays):
    kwargs = dict(options) | dict(static) | arrays
    if normalizer is not None:
      kwargs["normalizer"] = normalizer
    result = fn(logits, labels, where=where, weights=weights, reduction=reduction, **kwargs)
    return result[0] if stateful else result

  return loss


@functools.lru_cache(maxsize=None)
def _jitted(*key):
  return jax.jit(_loss_fn(*key))


@functools.lru_cache(maxsize=None)
def _jitted_grad(*key):
  return jax.jit(jax.grad(_loss_fn(*key)))


def loss(case, reduction=None, *, jit=True, logits=None):
  """The loss of `case` (with its own reduction unless given), compiled or eager."""
  reduction = case.reduction if reduction is None else reduction
  key, arrays = _split(case, reduction)
  fn = _jitted(*key) if jit else _loss_fn(*key)
  logits = case.logits if logits is None else logits
  return fn(logits, case.labels, case.where, case.weights, arrays)


def grad_of_sum(case, logits=None):
  """The gradient of the "sum" reduction with respect to the logits."""
  key, arrays = _split(case, "sum")
  logits = case.logits if logits is None else logits
  return _jitted_grad(*key)(logits, case.labels, case.where, case.weights, arrays)


def compute_dtype(dtype):
  return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def fits(case, value, computed_in_float32):
  """Where a result may be required finite: everywhere, but in float16 only where the
  same result computed from float32 logits fits its range (GHM-C's weights reach N / bins,
  and a true loss of 7000 at |x| = 1e4 times them exceeds 65504)."""
  if case.logits.dtype != np.float16:
    return np.ones(np.shape(value), bool)
  return np.abs(host(computed_in_float32)) <= float(np.finfo(np.float16).max)


def as_float32(case):
  return np.asarray(host(case.logits), np.float32)


# ---------------------------------------------------------------------------
# Strategies.

def _specials(dtype, *, finite, bound=math.inf):
  info = jnp.finfo(dtype)
  values = [0.0, -0.0, 1.0, -1.0, 0.5, -2.0, 30.0, -30.0, 88.0, -104.0, 1e4, -1e4,
            float(info.eps), float(info.tiny), -float(info.tiny),
            float(info.smallest_subnormal), -float(info.smallest_subnormal),
            float(info.max), -float(info.max), float(info.max) / 2]
  values = [v for v in values if abs(v) <= bound]
  if not finite:
    values += [math.inf, -math.inf, math.nan]
  return values


def logit_arrays(dtype, shape, kind, bound=None):
  """`kind`: "wide" (anything, NaN and +-inf included), "finite" (|x| <= bound) or "inf"."""
  if kind == "wide":
    elements = st.one_of(st.sampled_from(_specials(dtype, finite=False)), st.floats(-30, 30),
                         st.floats(allow_nan=True, allow_infinity=True))
  elif kind == "finite":
    elements = st.one_of(st.sampled_from(_specials(dtype, finite=True, bound=bound)),
                         st.floats(-30, 30), st.floats(-bound, bound))
  elif kind == "inf":
    elements = st.one_of(st.sampled_from([math.inf, -math.inf]),
                         st.sampled_from([0.0, 1.0, -1.0, 30.0, -30.0]), st.floats(-30, 30))
  else:
    raise ValueError(kind)
  return hnp.arrays(np.float64, shape, elements=elements).map(functools.partial(_cast, dtype))


def _cast(dtype, array):
  with np.errstate(over="ignore"):  # huge float64 values become +-inf in narrow dtypes
    return np.asarray(array).astype(dtype)


@st.composite
def broadcast_shapes(draw, shape):
  """`shape` with some axes set to 1 and some leading axes dropped."""
  keep = draw(st.lists(st.booleans(), min_size=len(shape), max_size=len(shape)))
  reduced = tuple(d if k else 1 for d, k in zip(shape, keep))
  return reduced[draw(st.integers(0, len(reduced))):]


def _representable(value, dtype):
  info = np.iinfo(dtype)
  return info.min <= value <= info.max


@st.composite
def integer_labels(draw, shape, top, *, kind, ignore_index, dtype):
  """Integers of `shape` in [0, top], and out of range too unless `kind == "valid"`."""
  info = np.iinfo(dtype)
  choices = [st.integers(0, min(top, info.max))] if top >= 0 else []
  extra = [] if ignore_index is None or not _representable(ignore_index, dtype) else [
      ignore_index]
  if kind == "any":
    extra += [v for v in (-1, -2, -100, top + 1, top + 2, top + 1000, int(info.min),
                          int(info.max)) if _representable(v, dtype) and not 0 <= v <= top]
  if extra:
    choices.append(st.sampled_from(sorted(set(extra))))
  return draw(hnp.arrays(dtype, shape, elements=st.one_of(*choices)))


@st.composite
def label_arrays(draw, loss, shape, axes, num_classes, *, kind, ignore_index, dtype, pairs):
  """Labels of `dtype`; integer ids are valid and invalid unless `kind == "valid"`."""
  if np.issubdtype(dtype, np.integer):
    dense = loss.family == "sigmoid" and bool(shape) and draw(st.booleans())
    if dense:  # 0/1 targets of the logits' shape
      return draw(integer_labels(shape, 1, kind=kind, ignore_index=ignore_index, dtype=dtype))
    label_shape = tuple(d for i, d in enumerate(shape) if i not in axes)
    top = num_classes if loss.family == "sigmoid" else num_classes - 1  # sigmoid id C: background
    ids = draw(integer_labels(label_shape, top, kind=kind, ignore_index=ignore_index,
                              dtype=dtype))
    if pairs:
      scores = draw(hnp.arrays(np.float32, label_shape,
                               elements=st.sampled_from([0.0, 0.5, 1.0, 0.3])))
      return ids, scores
    return ids
  if dtype == np.bool_:
    return draw(hnp.arrays(np.bool_, shape))
  values = draw(hnp.arrays(np.float64, shape, elements=st.one_of(
      st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0))))
  return np.asarray(values).astype(dtype)


@st.composite
def hyper_parameters(draw, loss, num_classes):
  """The registry's parameters, each from its grid; numbers are traced arrays half the time."""
  params = loss.options(num_classes or 1)
  for name, values in loss.grid.items():
    value = draw(st.sampled_from(values))
    if callable(value):
      if num_classes is None:
        continue
      value = value(num_classes)
    if name in loss.traced and value is not None and np.ndim(value) == 0 and draw(st.booleans()):
      value = np.asarray(value, draw(st.sampled_from([np.float32, np.float64])))
    params[name] = value
  if num_classes is None:  # no class axis: per-class vectors do not fit
    params = {k: v for k, v in params.items() if np.ndim(v) == 0}
  return params


@st.composite
def normalizers(draw):
  return draw(st.one_of(
      st.just(None), st.just("num_positives"), st.sampled_from([1, 0.5, 7.0]),
      st.tuples(st.sampled_from([np.float32, np.float64, np.int32]), st.sampled_from([1, 3]))
      .map(lambda pair: np.asarray(pair[1], pair[0]))))


@st.composite
def cases(draw, *, names=NAMES, shapes=("nonempty",), logits="wide", labels="any",
          dtypes=FLOAT_DTYPES, masks=True, weights=True, reductions=REDUCTIONS,
          ignore=True, smoothing=True, z_loss=True, label_dtypes=None):
  """A `Case`; the keywords choose how wide each part is drawn."""
  name = draw(st.sampled_from(names))
  entry = registry.LOSSES[name]
  family = entry.family
  dtype = draw(st.sampled_from(dtypes))
  shape_pool = [entry for group in shapes for entry in SHAPES[family][group]]
  shape, axis = draw(st.sampled_from(shape_pool))
  options = {}
  if family == "softmax" and axis != -1:
    options["axis"] = axis
  axes = ((len(shape) - 1,) if shape else ()) if family == "sigmoid" else tuple(
      a % len(shape) for a in (axis if isinstance(axis, tuple) else (axis,)))
  num_classes = math.prod(shape[a] for a in axes) if shape else None
  pairs = "pairs" in entry.labels and draw(st.booleans())

  if label_dtypes is None:
    label_dtypes = []
    integer_possible = bool(shape) and not (
        family == "softmax" and labels == "valid" and num_classes == 0)
    if integer_possible:
      label_dtypes += list(INT_DTYPES)
    if not pairs:
      label_dtypes += list(FLOAT_LABEL_DTYPES) + [np.bool_]
  if not label_dtypes:
    label_dtypes, pairs = list(FLOAT_LABEL_DTYPES), False
  label_dtype = draw(st.sampled_from(label_dtypes))
  integer = np.issubdtype(label_dtype, np.integer)
  pairs = pairs and integer

  ignore_index = None
  if ignore and integer:
    ignore_index = draw(st.one_of(st.none(), st.sampled_from(IGNORE_INDICES + (num_classes,))))
  if ignore_index is not None:
    options["ignore_index"] = ignore_index

  bound = None
  if logits == "finite":
    bound = draw(st.sampled_from([BOUND, float(jnp.finfo(dtype).max)]))
  logit_values = draw(logit_arrays(dtype, shape, logits, bound))
  label_values = draw(label_arrays(entry, shape, axes, num_classes, kind=labels,
                                   ignore_index=ignore_index, dtype=label_dtype, pairs=pairs))
  if smoothing and entry.takes("label_smoothing"):
    eps = draw(st.sampled_from(SMOOTHINGS))
    if eps:
      options["label_smoothing"] = eps
  if z_loss and entry.takes("z_loss"):
    z = draw(st.sampled_from(Z_LOSSES))
    if z:
      options["z_loss"] = z

  out_shape = shape if family == "sigmoid" else tuple(
      d for i, d in enumerate(shape) if i not in axes)
  where = weight_values = None
  if masks and draw(st.booleans()):
    where = draw(hnp.arrays(np.bool_, draw(broadcast_shapes(out_shape))))
  if weights and draw(st.booleans()):
    weight_dtype = draw(st.sampled_from([np.float32, np.float64, np.int32]))
    elements = (st.integers(0, 3) if weight_dtype == np.int32 else
                st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]), st.floats(0.0, 3.0)))
    weight_values = draw(hnp.arrays(weight_dtype, draw(broadcast_shapes(out_shape)),
                                    elements=elements))
  reduction = draw(st.sampled_from(reductions))
  normalizer = draw(normalizers()) if reduction == "mean" else None
  return Case(name=name, logits=logit_values, labels=label_values, where=where,
              weights=weight_values, params=draw(hyper_parameters(entry, num_classes)),
              normalizer=normalizer, reduction=reduction,
              options=tuple(sorted(options.items())))


# ---------------------------------------------------------------------------
# What each entry of the unreduced loss depends on, computed on the host.

def _ids_int64(case):
  return np.asarray(case.ids).astype(np.int64)


def _per_entry(case, per_label):
  """A per-label array (one per anchor of class ids) broadcast to the unreduced loss."""
  if case.family == "sigmoid" and not case.dense_integer:
    per_label = per_label[..., None]
  return np.broadcast_to(per_label, case.out_shape)


def active_entries(case):
  """True where the unreduced loss is neither masked by `where` nor ignored."""
  active = np.ones(case.out_shape, bool)
  if case.where is not None:
    active &= np.broadcast_to(case.where, case.out_shape)
  ignore_index = case.option("ignore_index", None)
  if case.ids is not None and ignore_index is not None:
    active &= _per_entry(case, _ids_int64(case) != ignore_index)
  return active


def invalid_labels(case):
  """True where an integer label is out of range and not ignore_index (per loss entry)."""
  if case.ids is None:
    return np.zeros(case.out_shape, bool)
  ids = _ids_int64(case)
  top = 1 if case.dense_integer else (
      case.num_classes if case.family == "sigmoid" else case.num_classes - 1)
  invalid = (ids < 0) | (ids > top)
  ignore_index = case.option("ignore_index", None)
  if ignore_index is not None:
    invalid &= ids != ignore_index
  return _per_entry(case, invalid)


def logit_rows(case):
  """float64 logits with the class axes last and flattened (softmax), or as they are."""
  x = host(case.logits)
  if case.family == "sigmoid":
    return x
  batch = [d for d in range(x.ndim) if d not in case.axes]
  x = np.transpose(x, batch + list(case.axes))
  return x.reshape(x.shape[:len(batch)] + (-1,))


def _first(mask):
  return tuple(int(i) for i in np.argwhere(mask)[0])


def _describe(case, index, out):
  x = logit_rows(case)
  detail = f"{case.name}: loss[{index}] = {out[index]!r}; logits there: {x[index]!r}"
  if case.ids is not None:
    label_index = index[:-1] if case.family == "sigmoid" and not case.dense_integer else index
    detail += f"; label {np.asarray(case.ids)[label_index]!r}"
  elif case.family == "sigmoid":
    detail += f"; target {host(case.labels)[index]!r}"
  return detail + f"; params {case.params}"


def assert_output_type(case, out, reduction):
  out = jnp.asarray(out)
  if reduction == "none":
    assert out.shape == case.out_shape, f"unreduced shape {out.shape} != {case.out_shape}"
    assert out.dtype == case.logits.dtype, f"unreduced dtype {out.dtype} != {case.logits.dtype}"
  else:
    assert out.shape == (), f"{reduction} has shape {out.shape}"
    expected = compute_dtype(case.logits.dtype)
    assert out.dtype == expected, f"{reduction} dtype {out.dtype} != {np.dtype(expected)}"


def assert_grad_type(case, grad):
  assert grad.shape == case.logits.shape, f"gradient shape {grad.shape} != {case.logits.shape}"
  assert grad.dtype == case.logits.dtype, f"gradient dtype {grad.dtype} != {case.logits.dtype}"


# ---------------------------------------------------------------------------
# 1 and 2: never raises; shapes and dtypes.

@given(case=cases(shapes=("nonempty", "empty")))
def test_never_raises_and_returns_the_promised_shape_and_dtype(case):
  """Well-typed, well-shaped inputs never raise, whatever their values; the unreduced
  loss has the unreduced shape and the logits' dtype, reductions are float32 scalars
  (float64 for float64 logits)."""
  out = loss(case)
  assert_output_type(case, out, case.reduction)


# ---------------------------------------------------------------------------
# 3: NaN stays where its cause is.

@given(case=cases(reductions=("none",)))
def test_nan_only_where_the_entry_own_inputs_are_bad(case):
  """With reduction="none": masked or ignored entries are exactly 0 (whatever their
  logits); an out-of-range label makes its entry NaN (a sigmoid id outside [0, C]: the
  whole anchor row; a dense integer target other than 0 and 1: its element); an entry is
  NaN only if its own logits (sigmoid: the element, softmax: the row) hold NaN, its
  label is out of range, or (softmax) its row has no finite maximum (a +inf, or all
  -inf); finite logits (|x| <= 1e4, where every loss is representable) with a valid label
  give a finite loss."""
  out = host(loss(case))
  assert out.shape == case.out_shape
  active, invalid = active_entries(case), invalid_labels(case)
  x = logit_rows(case)
  if case.family == "sigmoid":
    nan_logits, bounded = np.isnan(x), np.isfinite(x) & (np.abs(x) <= BOUND)
    no_finite_max = np.zeros(case.out_shape, bool)
  else:
    nan_logits = np.isnan(x).any(-1)
    bounded = (np.isfinite(x) & (np.abs(x) <= BOUND)).all(-1)
    no_finite_max = np.isposinf(x).any(-1) | ((x.shape[-1] > 0) & np.isneginf(x).all(-1))

  bad = ~active & (out != 0)
  assert not bad.any(), "masked entry is not 0: " + _describe(case, _first(bad), out)
  bad = active & invalid & ~np.isnan(out)
  assert not bad.any(), "out-of-range label without NaN: " + _describe(case, _first(bad), out)
  bad = active & np.isnan(out) & ~(nan_logits | invalid | no_finite_max)
  assert not bad.any(), "NaN without a NaN logit or a bad label: " + _describe(
      case, _first(bad), out)
  representable = fits(case, out, loss(case, logits=as_float32(case)))
  bad = active & bounded & ~invalid & ~np.isfinite(out) & representable
  assert not bad.any(), "finite inputs, loss not finite: " + _describe(case, _first(bad), out)


# ---------------------------------------------------------------------------
# 4: finite inputs, finite loss and gradient.

@given(case=cases(logits="finite", labels="valid", reductions=("none",)))
def test_finite_inputs_give_finite_loss_and_gradient(case):
  """Finite logits and valid labels: the gradient of the "sum" reduction is finite, of
  the logits' shape and dtype, for every finite logit; the loss (unreduced and summed)
  is finite wherever |logits| <= 1e4 (beyond that a true loss may exceed the dtype's
  largest number, e.g. float16 at 65504, where the same loss from float32 logits does)."""
  grad = grad_of_sum(case)
  assert_grad_type(case, grad)
  g = host(grad)
  g_fits = fits(case, g, grad_of_sum(case, as_float32(case)))
  bad = ~np.isfinite(g) & g_fits
  assert not bad.any(), f"{case.name}: gradient not finite at {_first(bad)}: {g[bad][:3]}"
  if np.all(np.abs(host(case.logits)) <= BOUND):
    out = host(loss(case, "none"))
    representable = fits(case, out, loss(case, "none", logits=as_float32(case)))
    bad = ~np.isfinite(out) & representable
    assert not bad.any(), "loss not finite: " + _describe(case, _first(bad), out)
    if representable.all():
      total = host(loss(case, "sum"))
      assert np.isfinite(total), f"{case.name}: sum {total} not finite"


# ---------------------------------------------------------------------------
# 5: empty inputs.

@given(case=cases(shapes=("empty",), reductions=("mean",)))
def test_empty_inputs(case):
  """A 0-sized axis: the unreduced loss keeps it, sum and mean (any normaliser) are 0,
  never NaN, and the gradient is empty with the logits' shape and dtype."""
  unreduced = loss(case, "none")
  assert_output_type(case, unreduced, "none")
  assert 0 in unreduced.shape
  for reduction in ("sum", "mean"):
    value = loss(case, reduction)
    assert_output_type(case, value, reduction)
    assert host(value) == 0, f"{reduction} of an empty loss is {value}"
  assert_grad_type(case, grad_of_sum(case))


# ---------------------------------------------------------------------------
# 6: everything masked.

@st.composite
def all_masked_cases(draw):
  case = draw(cases(masks=False, ignore=False, reductions=("mean",)))
  modes = ["where"] + (["ignore", "mixed"] if case.ids is not None else [])
  mode = draw(st.sampled_from(modes))
  options = dict(case.options)
  if mode == "where":
    where = np.zeros(draw(broadcast_shapes(case.out_shape)), bool)
    return dataclasses.replace(case, where=where)
  ids = np.asarray(case.ids)
  ignore_index = draw(st.sampled_from(
      [v for v in IGNORE_INDICES + (case.num_classes,) if _representable(v, ids.dtype)]))
  options["ignore_index"] = ignore_index
  if mode == "ignore":
    ids, where = np.full_like(ids, ignore_index), None
  else:
    # Ignored where `ignored`, masked by `where` everywhere else.
    ignored = draw(hnp.arrays(np.bool_, ids.shape))
    ids = np.where(ignored, np.asarray(ignore_index, ids.dtype), ids)
    where = _per_entry(dataclasses.replace(case, labels=ids), ignored)
  labels = (ids, case.labels[1]) if isinstance(case.labels, tuple) else ids
  return dataclasses.replace(case, labels=labels, where=where,
                             options=tuple(sorted(options.items())))


@given(case=all_masked_cases())
def test_all_masked_or_ignored(case):
  """Every entry masked by `where`, ignored, or a mix of the two (logits and labels may be
  anything): the unreduced loss is all 0, sum and mean (any normaliser) are 0 and not
  NaN, and the gradient is all zeros."""
  assert not active_entries(case).any()
  unreduced = host(loss(case, "none"))
  assert (unreduced == 0).all(), f"unreduced loss {unreduced}"
  for reduction in ("sum", "mean"):
    value = host(loss(case, reduction))
    assert value == 0, f"{reduction} = {value}"
  g = host(grad_of_sum(case))
  assert (g == 0).all(), f"gradient not all zero at {_first(g != 0)}: {g}"


# ---------------------------------------------------------------------------
# 7: determinism, jit against eager.

def _bits(array):
  return np.asarray(array).tobytes()


@given(case=cases())
def test_jit_is_bitwise_deterministic(case):
  """The same compiled function called twice gives bitwise-identical results."""
  first, second = loss(case), loss(case)
  assert _bits(first) == _bits(second), f"{first} != {second}"


@given(case=cases(dtypes=(jnp.float32,)))
def test_jit_and_eager_agree_within_one_ulp_in_float32(case):
  """Eager and jit agree: NaN in the same places, everything else within 1 ulp.

  Every loss compiles its body also when called eagerly (`jfocal.engine.program`),
  so an eager call runs the program a caller's jit would."""
  jitted = np.asarray(loss(case))
  eager = np.asarray(loss(case, jit=False))
  assert jitted.dtype == eager.dtype == np.float32
  np.testing.assert_array_equal(np.isnan(jitted), np.isnan(eager), err_msg="NaN positions")
  keep = ~np.isnan(jitted)
  np.testing.assert_array_max_ulp(jitted[keep], eager[keep], maxulp=1)


# ---------------------------------------------------------------------------
# 8: +-inf logits.

def _sigmoid_targets(case):
  """float64 targets y of every element, before smoothing."""
  if case.ids is not None and not case.dense_integer:
    return registry.one_hot(_ids_int64(case), case.num_classes)
  return host(case.labels)


def _alpha(case):
  """alpha as the loss sees it, or None for no weighting."""
  alpha = case.params.get("alpha")
  return None if alpha is None else np.asarray(alpha, np.float64)


@given(case=cases(names=SIGMOID_LIMITS, logits="inf", labels="valid", masks=False,
                  weights=False, ignore=False, reductions=("none",)))
def test_infinite_logits_sigmoid(case):
  """+-inf logits with valid labels give the limit of the loss: 0 where the prediction is
  certain and right (y' = 1 at +inf, y' = 0 at -inf, y' the smoothed target) or the
  weight alpha_t is 0, +inf otherwise (wrong side, soft target); never NaN; finite logits
  give finite losses; the gradient of the sum is finite everywhere."""
  out = host(loss(case))
  x = host(case.logits)
  dtype = compute_dtype(case.logits.dtype)
  eps = case.option("label_smoothing", 0.0)
  y = (_sigmoid_targets(case).astype(dtype) * dtype(1 - eps) + dtype(eps / 2)).astype(dtype)
  y = np.broadcast_to(y, x.shape)
  # Subnormal target mass is flushed to 0 on the way (as on most CPUs and GPUs).
  tiny = np.finfo(dtype).tiny
  y = np.where(y < tiny, 0, np.where(1 - y < tiny, 1, y)).astype(dtype)
  alpha = _alpha(case)
  alpha_t = np.ones(x.shape, dtype) if alpha is None else (
      alpha.astype(dtype) * y + (1 - alpha.astype(dtype)) * (1 - y))
  certain_and_right = ((x == math.inf) & (y == 1)) | ((x == -math.inf) & (y == 0))
  expected = np.where(certain_and_right | (alpha_t == 0), 0.0, math.inf)

  bad = np.isnan(out)
  assert not bad.any(), "NaN: " + _describe(case, _first(bad), out)
  infinite = np.isinf(x)
  bad = np.isfinite(x) & ~np.isfinite(out)
  assert not bad.any(), "finite logit, loss not finite: " + _describe(case, _first(bad), out)
  bad = infinite & (out != expected)
  assert not bad.any(), (f"expected {expected[_first(bad)]}: "
                         + _describe(case, _first(bad), out))
  g = host(grad_of_sum(case))
  assert np.isfinite(g).all(), (f"gradient {g[_first(~np.isfinite(g))]} at "
                                + _describe(case, _first(~np.isfinite(g)), out))


@given(case=cases(names=SOFTMAX_LIMITS, logits="inf", labels="valid", masks=False,
                  weights=False, ignore=False, z_loss=False, reductions=("none",)))
def test_infinite_logits_softmax(case):
  """+-inf logits with valid labels, rows with one +inf at most and not all -inf: the
  limit of the loss. Class c with target weight w_c = alpha_c y'_c > 0 (y' the smoothed
  targets) adds +inf if p_c -> 0 (a -inf logit, or a finite one beside a +inf) and 0 if
  p_c -> 1 (the sole +inf); so -inf non-target logits leave the loss finite, a sole +inf
  target gives 0, a finite target beside a +inf or a -inf target gives +inf. Never NaN;
  the gradient of the sum is finite on those rows."""
  out = host(loss(case))
  x = logit_rows(case)
  c = x.shape[-1]
  eps = case.option("label_smoothing", 0.0)
  if case.ids is not None:
    y = registry.one_hot(_ids_int64(case), c)
  else:
    y = logit_rows(dataclasses.replace(case, logits=host(case.labels)))
  y = (1 - eps) * y + eps / c
  alpha = _alpha(case)
  w = y if alpha is None else y * alpha
  # A class weight alpha_c y'_c below float32's smallest normal number is flushed to
  # 0 on the way (as on most CPUs and GPUs): that class then carries no weight.
  w = np.where(w < np.finfo(np.float32).tiny, 0.0, w)
  positive = np.isposinf(x)
  sole_positive = positive.sum(-1) == 1
  defined = (positive.sum(-1) <= 1) & ~np.isneginf(x).all(-1)
  p_zero = np.where(sole_positive[..., None], ~positive, np.isneginf(x))
  infinite = ((w > 0) & p_zero).any(-1)
  expected_zero = sole_positive & ~infinite

  bad = defined & np.isnan(out)
  assert not bad.any(), "NaN: " + _describe(case, _first(bad), out)
  bad = defined & infinite & (out != math.inf)
  assert not bad.any(), "expected +inf: " + _describe(case, _first(bad), out)
  bad = defined & expected_zero & (out != 0)
  assert not bad.any(), "expected 0: " + _describe(case, _first(bad), out)
  bad = defined & ~infinite & ~np.isfinite(out)
  assert not bad.any(), "expected a finite loss: " + _describe(case, _first(bad), out)
  g = logit_rows(dataclasses.replace(case, logits=host(grad_of_sum(case))))
  bad = defined & ~np.isfinite(g).all(-1)
  assert not bad.any(), (f"gradient {g[_first(bad)]} not finite: "
                         + _describe(case, _first(bad), out))
