"""jfocal.checked: run-time value checks, eagerly and under jit, vmap and grad."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfocal
import registry

def _jit(fn):
  """jax.jit with array options traced and the rest (strings, ints) static."""
  def call(x, y, **options):
    arrays = {k: v for k, v in options.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in options.items() if k not in arrays}
    return jax.jit(lambda x, y, arrays: fn(x, y, **arrays, **static))(x, y, arrays)
  return call


TRANSFORMS = {
    "eager": lambda fn: fn,
    "jit": _jit,
    "vmap": lambda fn: lambda x, y, **kw: jax.vmap(lambda x, y: fn(x, y, **kw))(
        x[None], jax.tree.map(lambda a: a[None], y))[0],
    "grad": lambda fn: lambda x, y, **kw: jax.grad(lambda x: jnp.sum(fn(x, y, **kw)))(x),
}

X = jnp.zeros((3, 4), jnp.float32)

# (loss, labels, options, argument named, offending index, offending value)
BAD = {
    "softmax id too large": (jfocal.softmax_focal_loss, jnp.array([0, 4, 1]), {}, "labels", "[1]", "4"),
    "sigmoid id above background": (jfocal.sigmoid_focal_loss, jnp.array([0, 5, 4]), {}, "labels",
                                    "[1]", "5"),
    "negative id": (jfocal.softmax_cross_entropy, jnp.array([0, 1, -3]), {}, "labels", "[2]", "-3"),
    "float label above 1": (jfocal.sigmoid_cross_entropy, X.at[2, 1].set(1.5), {}, "labels",
                            "[2 1]", "1.5"),
    "nan float label": (jfocal.softmax_cross_entropy, X.at[0, 3].set(jnp.nan), {}, "labels", "[0 3]",
                        "nan"),
    "negative weight": (jfocal.sigmoid_focal_loss, jnp.array([0, 1, 4]),
                        {"weights": jnp.array([[1.0], [-2.0], [1.0]])}, "weights", "[1 0]", "-2"),
    "infinite weight": (jfocal.softmax_focal_loss, jnp.array([0, 1, 2]),
                        {"weights": jnp.array([1.0, 1.0, jnp.inf])}, "weights", "[2]", "inf"),
    "sigmoid alpha above 1": (jfocal.sigmoid_focal_loss, jnp.array([0, 1, 4]),
                              {"alpha": jnp.array([0.5, 1.2, 0.5, 0.5])}, "alpha", "[1]", "1.2"),
    "negative softmax alpha": (jfocal.softmax_balanced_cross_entropy, jnp.array([0, 1, 2]),
                               {"alpha": jnp.array([0.5, 2.0, -0.5, 0.5])}, "alpha", "[2]",
                               "-0.5"),
    "zero normalizer": (jfocal.sigmoid_focal_loss, jnp.array([0, 1, 4]),
                        {"reduction": "mean", "normalizer": jnp.array(0.0)}, "normalizer", "[]",
                        "0"),
    "traced negative gamma": (jfocal.softmax_focal_loss, jnp.array([0, 1, 2]),
                              {"gamma": jnp.array(-0.5)}, "gamma", "[]", "-0.5"),
    "dense integer target 2": (jfocal.sigmoid_focal_loss, jnp.zeros((3, 4), jnp.int32).at[1, 2].set(2),
                               {}, "labels", "[1 2]", "2"),
    "negative pos_weight": (jfocal.sigmoid_cross_entropy, jnp.array([0, 1, 4]),
                            {"pos_weight": jnp.array([1.0, -1.0, 1.0, 1.0])}, "pos_weight", "[1]",
                            "-1"),
    "quality score above 1": (jfocal.quality_focal_loss, (jnp.array([0, 1, 4]),
                                                          jnp.array([0.5, 1.5, 0.2])), {},
                              "scores", "[1]", "1.5"),
    "traced negative z_loss": (jfocal.poly1_cross_entropy, jnp.array([0, 1, 2]),
                               {"z_loss": jnp.array(-1e-4)}, "z_loss", "[]", "-0.0001"),
    "traced ASL clip above 1": (jfocal.asymmetric_loss, jnp.array([0, 1, 4]),
                                {"clip": jnp.array(1.5)}, "clip", "[]", "1.5"),
    "traced zero class prior": (jfocal.logit_adjusted_cross_entropy, jnp.array([0, 1, 2]),
                                {"class_priors": jnp.array([0.5, 0.0, 0.3, 0.2])},
                                "class_priors", "[1]", "0"),
    "per-logit mask keeps a bad id's row": (
        jfocal.softmax_cross_entropy, jnp.array([0, 7, 1]),
        {"where": jnp.ones((3, 4), bool).at[0].set(False)}, "labels", "[1]", "7"),
}


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_values_raise_naming_argument_index_and_value(case, transform):
  loss, labels, options, name, index, value = BAD[case]
  if transform == "vmap" and options.get("reduction") == "mean":
    pytest.skip("a reduced loss has no batch axis to map over here")
  if name not in ("labels", "scores", "weights", "normalizer") and transform != "jit":
    pytest.skip("a concrete hyper-parameter is rejected at trace time already (test_validation)")
  fn = TRANSFORMS[transform](jfocal.checked(loss))
  with pytest.raises(Exception) as info:
    jax.block_until_ready(fn(X, labels, **options))
  message = str(info.value)
  assert re.search(rf"{name}: .*first offending index {re.escape(index)} holds {value}", message), \
      message[:500]


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_valid_values_give_the_unchecked_result(transform):
  labels = jnp.array([0, 3, 1])
  options = dict(alpha=jnp.array([0.2, 0.4, 0.6, 0.8]), weights=jnp.array([1.0, 0.5, 2.0]),
                 ignore_index=-1)
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)
  checked = TRANSFORMS[transform](jfocal.checked(jfocal.softmax_focal_loss))
  plain = TRANSFORMS[transform](jfocal.softmax_focal_loss)
  np.testing.assert_array_equal(checked(logits, labels, **options), plain(logits, labels, **options))


def test_masked_and_ignored_entries_are_not_checked():
  loss = jfocal.checked(jfocal.sigmoid_focal_loss)
  ids = jnp.array([0, 99, -1])  # 99 is padding under the mask, -1 is ignored
  keep = jnp.array([[True], [False], [True]])
  assert np.all(np.isfinite(loss(X, ids, where=keep, ignore_index=-1)))


def test_finite_logits_is_opt_in():
  logits = X.at[1, 2].set(jnp.inf)
  assert jfocal.checked(jfocal.softmax_cross_entropy)(logits, jnp.array([0, 1, 2])).shape == (3,)
  with pytest.raises(Exception, match=re.escape("logits: logits must be finite; first offending "
                                                "index [1 2] holds inf")):
    jfocal.checked(jfocal.softmax_cross_entropy, finite_logits=True)(logits, jnp.array([0, 1, 2]))


def test_only_jfocal_losses_can_be_wrapped():
  with pytest.raises(TypeError, match="checked"):
    jfocal.checked(jnp.sum)


@pytest.mark.parametrize("loss", registry.PARAMS)
def test_every_loss_can_be_checked(loss):
  """checked() wraps every loss: valid values give the plain result, an out-of-range id raises."""
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)), jnp.float32)
  ids = jnp.array([0, 2, 3])
  checked = jfocal.checked(loss.fn)
  options = loss.options(4)
  for got, expected in zip(jax.tree.leaves(checked(logits, ids, **options)),
                           jax.tree.leaves(loss.fn(logits, ids, **options))):
    np.testing.assert_array_equal(got, expected)
  bad = ids.at[1].set(9)
  with pytest.raises(Exception, match=re.escape("first offending index [1] holds 9")):
    jax.block_until_ready(jax.jit(lambda x, y: checked(x, y, **options))(logits, bad))
