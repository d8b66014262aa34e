"""Every loss of the registry against float64 autodiff of its reference formula.

- values and gradients with respect to the logits and dense labels, over
  hypothesis-drawn shapes, dtypes, label forms and hyper-parameters;
- label derivatives at targets of exactly 0 and 1, for every hyper-parameter
  value of the registry's grid;
- traced hyper-parameters (``gamma``, ``alpha``, ``beta``, ``epsilon``, ...):
  as ``jax.jit`` arguments they equal the static values, they vmap, and the
  derivative with respect to them is the reference's;
- loss, gradient and Hessian finite at logits up to +-1e4 in every float
  dtype, for static and traced hyper-parameters.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import references as ref
import registry
import strategies as S
from conftest import SUITE_USES_ITS_OPTIONS, SUITE_XLA_OPTIONS, XLA_DEFAULTS
from helpers import FLOAT_DTYPES, all_finite, assert_close, host, on_reference_device
from jfocal.engine import program

PARAMS = registry.PARAMS
# Parametrised over the losses, each gets half of the profile's examples
# (3 in CI, 250 in `make fuzz`).
PER_LOSS = settings(max_examples=max(settings.default.max_examples // 2, 1))

# Dense label forms: what a derivative with respect to the labels is taken of.
DENSE = ("hard", "soft", "sparse", "distribution")


@dataclasses.dataclass
class Case:
  dtype: Any
  logits: jax.Array
  x64: np.ndarray
  labels: Any
  y64: np.ndarray
  form: str
  params: dict


def forms(loss):
  if loss.family == "softmax":
    return ("ids", "hard", "distribution")
  return ("ids", "hard", "soft") + (("sparse", "pairs") if "pairs" in loss.labels else ())


@st.composite
def cases(draw, loss, bound=12.0, dtypes=FLOAT_DTYPES, label_forms=None):
  dtype = draw(st.sampled_from(dtypes))
  softmax = loss.family == "softmax"
  # One softmax class makes p = 1 exactly, where the textbook's pow has a NaN derivative.
  num_classes = draw(st.integers(2, 5) if softmax else st.integers(1, 4))
  batch = draw(st.sampled_from([(1,), (3,), (2, 3)] if softmax else [(), (3,), (2, 3)]))
  shape = batch + (num_classes,)
  form = draw(st.sampled_from(label_forms or forms(loss)))
  logits, x64 = S.cast(draw(S.logits(shape, bound)), dtype)
  if form in ("ids", "pairs") or (softmax and form == "hard"):
    top = num_classes - 1 if softmax else num_classes
    ids = np.asarray(draw(S.hnp.arrays(np.int32, batch, elements=st.integers(0, top))))
    labels, y64 = jnp.asarray(ids), registry.one_hot(ids, num_classes)
    if form == "pairs":
      scores, scores64 = S.cast(draw(S.probabilities(batch)), dtype)
      labels, y64 = (labels, scores), y64 * scores64[..., None]
    elif form == "hard":
      labels, y64 = S.cast(y64, dtype)
  else:
    if form == "hard":
      y = draw(S.hard_labels(shape))
    elif form == "soft":
      y = draw(S.probabilities(shape))
    elif form == "sparse":  # IoU-like targets, mostly exact zeros
      y = draw(S.hnp.arrays(np.float64, shape,
                            elements=st.one_of(st.just(0.0), st.floats(0.0, 1.0))))
    else:  # distribution
      y = np.asarray(draw(S.probabilities(shape))) + 1e-3
      y = y / y.sum(-1, keepdims=True)
    labels, y64 = S.cast(y, dtype)
  params = loss.options(num_classes, **{k: draw(st.sampled_from(v)) for k, v in loss.grid.items()})
  return Case(dtype, logits, x64, labels, y64, form, params)


def _skip_cusps(loss, case):
  """QFL's |y - sigma|**beta has a cusp (beta < 1) or a kink (beta = 1) at its minimum 0."""
  if loss.name != "quality_focal_loss" or case.params["beta"] > 1.0:
    return None
  return np.abs(1 / (1 + np.exp(-case.x64)) - case.y64) < 1e-6


@pytest.mark.parametrize("loss", PARAMS)
@PER_LOSS
@given(data=st.data())
def test_value_and_gradients_match_float64_autodiff_of_the_reference(loss, data):
  case = data.draw(cases(loss))
  dtype, params = case.dtype, case.params
  argnums = (0, 1) if case.form in DENSE else (0,)
  textbook = lambda x, y: loss.reference(x, y, **params)
  reference = on_reference_device(
      lambda x, y: (textbook(x, y), jax.grad(lambda x, y: jnp.sum(textbook(x, y)), argnums)(x, y)))
  expected_value, expected_grads = reference(case.x64, case.y64)

  @jax.jit
  def evaluate(x, y):  # one program for the loss and its gradients
    def total(x, y):
      value = loss(x, y, **params)
      return jnp.sum(value.astype(jnp.float32)), value
    (_, value), grads = jax.value_and_grad(total, argnums, has_aux=True)(x, y)
    # A loss that sums itself may take another derivative (one that reads its value).
    summed = jax.grad(lambda x, y: loss(x, y, reduction="sum", **params), argnums)(x, y)
    return value, (grads, summed)

  value, (grads, summed) = evaluate(case.logits, case.labels)
  assert value.dtype == dtype
  assert_close(value, expected_value, dtype, what="loss")
  skip = _skip_cusps(loss, case)
  # d/dy of alpha_t(y) CE(x, y) is (2 alpha - 1) CE - alpha_t x at a hard target: two terms
  # of size |x| that may cancel, each rounded once.
  scales = (1.0, 1.0 + float(np.max(np.abs(case.x64), initial=0.0)))
  for how, derivatives in (("", grads), (' of reduction="sum"', summed)):
    for name, got, want, scale in zip(("d/dlogits", "d/dlabels"), derivatives, expected_grads,
                                      scales):
      name += how
      assert got.dtype == dtype
      all_finite(**{name: got})
      if skip is not None:
        got = np.where(skip, 0.0, np.asarray(got.astype(jnp.float64)))
        want = np.where(skip, 0, want)
      assert_close(got, want, dtype, what=name, scale=scale)


def _one_at_a_time(loss):
  """The registry's parameters, and each grid value of each hyper-parameter on its own."""
  settings = [{}]
  for name, values in loss.grid.items():
    settings += [{name: value} for value in values]
  return settings


@pytest.mark.parametrize("loss", PARAMS)
def test_label_derivatives_are_exact_at_targets_zero_and_one(loss):
  """d loss / d y at one-hot (softmax) and 0/1 (sigmoid) targets, for every grid value."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 3)) * 3
  if loss.family == "softmax":
    y = registry.one_hot(np.array([0, 2, 1, 2]), 3)
  else:
    y = np.array([[1.0, 0, 0], [0, 0, 0], [0, 1, 1], [1, 0, 1]])
  settings = [loss.options(3, **setting) for setting in _one_at_a_time(loss)]
  # One program for every setting: a label derivative per setting.
  got = jax.jit(lambda x, y: [jax.grad(lambda y: jnp.sum(loss(x, y, **params)))(y)
                              for params in settings])(jnp.asarray(x), jnp.asarray(y))
  expected = on_reference_device(lambda x, y: [
      jax.grad(lambda y: jnp.sum(loss.reference(x, y, **params)))(y) for params in settings])(x, y)
  for setting, g, e in zip(_one_at_a_time(loss), got, expected):
    assert_close(g, e, jnp.float64, what=f"d/dlabels with {setting}")


def _traced_cases():
  return [pytest.param(entry, name, id=f"{entry.name}-{name}")
          for entry in registry.LOSSES.values() for name in entry.traced]


@pytest.mark.parametrize("loss, name", _traced_cases())
def test_traced_hyper_parameters_jit_vmap_and_differentiate(loss, name):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(5, 3)) * 3)
  ids = jnp.array([0, 1, 2, 1, 0])
  y = registry.one_hot(np.asarray(ids), 3)
  values = [loss.options(3)[name]] + [loss.resolve({name: v}, 3)[name]
                                      for v in loss.grid.get(name, ()) if v is not None]
  values = [v for v in values if np.shape(v) == np.shape(values[0])]
  options = {k: v for k, v in loss.options(3).items() if k != name}
  with_value = lambda x, p: loss(x, ids, **options, **{name: p})
  # Python numbers (static, each its own program) and arrays (traced, one program).
  statics = jax.jit(lambda x: [with_value(x, value) for value in values])(x)
  traced = jax.jit(with_value)
  for value, static in zip(values, statics):
    assert_close(traced(x, jnp.asarray(value, jnp.float64)), static, jnp.float64,
                 what=f"traced {name}={value}")
  assert traced._cache_size() == 1, f"{name} is traced: one compilation for every value"
  stacked = jnp.asarray(np.stack([np.asarray(v, np.float64) for v in values]))
  mapped = jax.vmap(lambda p: with_value(x, p))(stacked)
  for row, static, value in zip(mapped, statics, values):
    assert_close(row, static, jnp.float64, what=f"vmap at {name}={value}")
  # d loss / d parameter at every value: one program, and one for the reference.
  points = [jnp.asarray(value, jnp.float64) for value in values]
  got = jax.jit(lambda ps: [jax.grad(lambda p: jnp.sum(with_value(x, p)))(p) for p in ps])(points)
  expected = on_reference_device(lambda x, y, *ps: [jax.grad(lambda p: jnp.sum(
      loss.reference(x, y, **options, **{name: p})))(p) for p in ps])(x, y, *points)
  for value, g, e in zip(values, got, expected):
    assert_close(g, e, jnp.float64, what=f"d/d{name} at {value}")


EXTREME_LOGITS = np.array([-1e4, -1e3, -100.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 100.0, 1e3, 1e4])
TARGETS = np.array([0.0, 1.0, 0.3, 0.5, 1e-6, 1 - 1e-6])
SATURATED_ROWS = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [100.0, 0.0, 0.0],
                           [30.0, 0.0, -30.0], [0.0, 0.0, 0.0], [-1e3, -1e3, 1e3]])


def _extreme_inputs(loss, dtype):
  big = float(jnp.finfo(dtype).max)
  if loss.family == "softmax":
    x = jnp.asarray(np.clip(SATURATED_ROWS, -big, big)).astype(dtype)
    return x, [jnp.array([0, 0, 0, 2, 1, 0]), jnp.full(x.shape, 1 / 3, dtype)]
  x = jnp.asarray(np.clip(EXTREME_LOGITS, -big, big)).astype(dtype)
  x, y = jnp.broadcast_arrays(x, jnp.asarray(TARGETS)[:, None].astype(dtype))
  return x, [y]


def _derivatives(loss, x, y, summed=False, **params):
  """Loss, d/dx, d/dy (dense labels) and the Hessian's diagonal in x, by name; with
  ``summed``, also d/dx and the Hessian's diagonal of ``reduction="sum"``."""
  total = lambda x, y: jnp.sum(loss(x, y, **params).astype(jnp.float32))
  hessian = lambda total: jax.jvp(lambda x: jax.grad(total)(x, y), (x,), (jnp.ones_like(x),))[1]
  results = {"loss": loss(x, y, **params).astype(jnp.float32), "d/dx": jax.grad(total)(x, y),
             "d2/dx2": hessian(total)}
  if jnp.issubdtype(y.dtype, jnp.floating):
    results["d/dy"] = jax.grad(total, 1)(x, y)
  if summed:
    total = lambda x, y: loss(x, y, reduction="sum", **params)
    results["d/dx of reduction=sum"] = jax.grad(total)(x, y)
    results["d2/dx2 of reduction=sum"] = hessian(total)
  return results


def _assert_finite_where_representable(results, whats, widen, dtype):
  """Every dict of ``results`` finite; in float16 where its float32 computation fits the range.

  ``widen()`` computes the float32 results, only when some float16 result is not finite.
  GHM-C's weights reach N / bins, so at |x| = 1e4 a float16 loss or derivative
  may exceed 65504: a property of float16, not of the loss.
  """
  results = [{name: host(value) for name, value in r.items()} for r in results]
  wides = [None] * len(results)
  if dtype == jnp.float16 and not all(np.isfinite(v).all() for r in results for v in r.values()):
    wides = widen()
  for r, wide, what in zip(results, wides, whats):
    for name, value in r.items():
      if wide is not None:
        value = np.where(np.abs(host(wide[name])) <= float(jnp.finfo(dtype).max), value, 0)
      all_finite(**{f"{name} with {what}": value})


def _code_paths(loss):
  """Static settings that reach every code path: each grid value of an option that is static
  or structural (None, a bool, a per-class vector, a bin count) and, of a hyper-parameter
  whose Python numbers specialise the program (gamma), 0, an integer, a k + 1/2 above 1
  (a square root) and another fraction."""
  specialising = program.REGISTRY[loss.fn].specialising
  settings = [{}]
  for name, values in loss.grid.items():
    representatives = {}
    for value in values:
      if value is None or isinstance(value, bool) or callable(value) or name not in loss.traced:
        settings.append({name: value})
      elif name in specialising:
        value = float(value)
        path = ("zero" if value == 0 else "integer" if value.is_integer()
                else "half" if (2 * value).is_integer() and value > 1 else "fraction")
        representatives.setdefault(path, value)
    settings += [{name: value} for value in representatives.values()]
  # A setting that repeats the registry's own value (its default gamma, bins, ...) adds no path.
  repeats = lambda name, value: name in loss.params and (
      loss.params[name] is value or (not callable(value) and loss.params[name] == value))
  return [setting for setting in settings
          if not setting or not all(repeats(k, v) for k, v in setting.items())]


@pytest.mark.parametrize("loss", PARAMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_loss_gradient_and_hessian_are_finite_at_extreme_logits(loss, dtype):
  """Every code path in float32; half precision computes in float32 too, so there (and in
  float64) the registry's setting; in every dtype each traced value.

  The registry's setting is compiled as users get it (`conftest.XLA_DEFAULTS`), whose
  results are the ones checked for finiteness, and with the suite's faster CPU settings
  (`conftest.SUITE_XLA_OPTIONS`, used by every other program of the suite), which must
  agree with it: in every dtype and label form, the loss, both gradients and the Hessian's
  diagonal are finite at the same entries and equal within the dtype's tolerance, so no
  other test can pass or fail because of the suite's settings. (They were bitwise equal on
  the CPUs of earlier sessions; on an AVX-512 Xeon, 3 of the 56 cases differ by 1 ulp in
  d/dy (`asymmetric_loss` in float32 and float64, `quality_focal_loss` in float32), where
  XLA's two emitters round a fused multi-output program differently. LLVM at -O0, tried
  this way, changes 11 of the 12 losses' derivatives by more.) If they ever disagree
  beyond that, drop the settings or run the suite with XLA's defaults
  (`JFOCAL_TEST_DEFAULT_COMPILER=1`), which takes about three times as long. On another
  backend, or a jaxlib the settings were not measured on, it is compiled once, as users get it.
  """
  x, label_sets = _extreme_inputs(loss, dtype)
  num_classes = x.shape[-1]
  defaults = loss.options(num_classes)
  wide_x = x.astype(jnp.float32)
  wide_labels = [y.astype(jnp.float32) if y.dtype == dtype else y for y in label_sets]
  registry_setting = jax.jit(lambda x, labels: [_derivatives(loss, x, y, summed=True, **defaults)
                                                for y in labels])
  lowered = registry_setting.lower(x, label_sets)
  on_cpu = jax.default_backend() == "cpu"  # the settings are the CPU compiler's
  users = lowered.compile(XLA_DEFAULTS if on_cpu else None)(x, label_sets)
  if on_cpu and SUITE_USES_ITS_OPTIONS:
    suites = lowered.compile(SUITE_XLA_OPTIONS)(x, label_sets)
    for label_set, (want, got) in enumerate(zip(users, suites)):
      for name in want:
        what = f"{name} (label set {label_set}) with the suite's compiler settings"
        suite, user = host(got[name]), host(want[name])
        finite = np.isfinite(user)
        np.testing.assert_array_equal(np.isfinite(suite), finite,
                                      err_msg=f"{what}: finite elsewhere")
        assert_close(suite[finite], user[finite], dtype, what=what)
  _assert_finite_where_representable(
      users, ["the registry's setting"] * len(label_sets),
      lambda: registry_setting(wide_x, wide_labels), dtype)

  settings = [setting for setting in _code_paths(loss) if setting] if dtype == jnp.float32 else []
  traced_values = {name: [v for v in (loss.resolve({name: v}, num_classes)[name]
                                      for v in loss.grid.get(name, ()))
                          if v is not None and np.ndim(v) == 0]
                   for name in loss.traced}
  traced_values = {name: values for name, values in traced_values.items() if values}
  static = {k: v for k, v in defaults.items() if k not in traced_values}
  options = [loss.options(num_classes, **setting) for setting in settings]
  # One program for the other static settings and label forms, one for the traced values.
  if settings:
    evaluate = jax.jit(lambda x, labels: [
        [_derivatives(loss, x, y, **params) for params in options] for y in labels])
    flat = lambda nested: [r for per_setting in nested for r in per_setting]
    _assert_finite_where_representable(
        flat(evaluate(x, label_sets)), settings * len(label_sets),
        lambda: flat(evaluate(wide_x, wide_labels)), dtype)
  traced = jax.jit(lambda x, labels, p: [_derivatives(loss, x, y, **static, **p) for y in labels])
  for name, values in traced_values.items():
    for value in values:
      p = {k: jnp.asarray(defaults[k], jnp.float32) for k in traced_values}
      p[name] = jnp.asarray(value, jnp.float32)
      _assert_finite_where_representable(
          traced(x, label_sets, p), [f"traced {name}={value}"] * len(label_sets),
          lambda: traced(wide_x, wide_labels, p), dtype)


# Larger than PaLM's 1e-4, so that the term stands well above the float32 tolerance.
Z_LOSS = 0.01


@pytest.mark.parametrize("loss", [p for p in PARAMS if p.values[0].family == "softmax"])
def test_z_loss_adds_the_squared_log_normalizer(loss):
  """``z_loss`` adds ``z lse(x)**2`` per example to every softmax loss: the value and the
  gradients in the logits, in dense labels and in a traced ``z`` equal float64 autodiff of
  the reference plus that term; ``z = 0`` (static or traced) is the loss without it; at
  saturated logits (+-1e4) the loss, gradient and Hessian stay finite in every dtype."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(5, 3)) * 3
  ids = np.array([0, 2, 1, 2, 0])
  y = rng.dirichlet(np.ones(3), size=5)
  params = loss.options(3)
  # The z-loss is of the logits the softmax sees: logit adjustment shifts them.
  seen = lambda x: x + params["tau"] * jnp.log(params["class_priors"]) if (
      "class_priors" in params) else x
  textbook = lambda x, y, z: loss.reference(x, y, **params) + z * ref.log_sum_exp(seen(x)) ** 2
  total = lambda fn: (lambda *args: jnp.sum(fn(*args)))

  def evaluate(x, ids, y, z, extreme, extreme_ids):  # one program for every check
    with_z = lambda x, y, z: loss(x, y, **params, z_loss=z)
    results = {}
    for name, labels in (("ids", ids), ("dense", y)):
      results[name] = (with_z(x, labels, Z_LOSS),
                       jax.grad(total(with_z), (0, 2))(x, labels, z),
                       jax.grad(total(with_z), 1)(x, y, Z_LOSS) if name == "dense" else None)
    results["zero"] = (with_z(x, ids, 0.0), with_z(x, ids, 0.0 * z), loss(x, ids, **params))
    # PaLM's z_loss at saturated logits, whose z lse**2 (1e4) fits float16 too.
    grad = jax.grad(total(lambda x: with_z(x, extreme_ids, 1e-4).astype(jnp.float32)))
    results["extreme"] = [(with_z(e, extreme_ids, 1e-4), grad(e),
                           jax.jvp(grad, (e,), (jnp.ones_like(e),))[1]) for e in extreme]
    return results

  extreme = [_extreme_inputs(loss, dtype)[0] for dtype in FLOAT_DTYPES]
  got = jax.jit(evaluate)(jnp.asarray(x, jnp.float32), jnp.asarray(ids),
                          jnp.asarray(y, jnp.float32), jnp.float32(Z_LOSS), extreme,
                          _extreme_inputs(loss, jnp.float32)[1][0])
  want = on_reference_device(lambda x, y: [
      textbook(x, y, Z_LOSS), jax.grad(total(textbook), (0, 2))(x, y, Z_LOSS),
      jax.grad(total(textbook), 1)(x, y, Z_LOSS)])
  for name, labels in (("ids", registry.one_hot(ids, 3)), ("dense", y)):
    value, (d_dx, d_dz), d_dy = got[name]
    expected_value, (expected_dx, expected_dz), expected_dy = want(x, labels)
    assert_close(value, expected_value, jnp.float32, what=f"loss with z_loss ({name})")
    assert_close(d_dx, expected_dx, jnp.float32, what=f"d/dlogits with z_loss ({name})")
    assert_close(d_dz, expected_dz, jnp.float32, what=f"d/dz_loss ({name})")
    if d_dy is not None:
      assert_close(d_dy, expected_dy, jnp.float32, what="d/dlabels with z_loss")
  static_zero, traced_zero, without = got["zero"]
  np.testing.assert_array_equal(host(static_zero), host(without))
  assert_close(traced_zero, without, jnp.float32, what="traced z_loss = 0")
  for dtype, (value, d_dx, d2_dx2) in zip(FLOAT_DTYPES, got["extreme"]):
    name = np.dtype(dtype).name
    all_finite(**{f"{name} loss at +-1e4": value, f"{name} d/dx at +-1e4": d_dx,
                  f"{name} d2/dx2 at +-1e4": d2_dx2})
