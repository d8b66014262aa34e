"""Trace-time problems raise ValueError or TypeError naming the argument, eagerly and under jit.

The common cases run for every loss of the registry that takes the keyword;
the specific ones name one loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfocal
import registry

X3 = np.zeros((4, 3), np.float32)
IDS = np.zeros((4,), np.int32)
NEGATIVE = jnp.float32(-2.0)  # a concrete array: checked also when a jitted function closes over it


def _labels_name(loss):
  return {"quality_focal_loss": "scores", "varifocal_loss": "targets"}.get(loss.name, "labels")


# name -> (applies to the loss?, call(loss), exception, words the message must contain)
COMMON = {
    "int logits": (lambda loss: True, lambda loss: loss(IDS[:, None] + X3.astype(np.int32), IDS),
                   TypeError, lambda loss: ["logits", "int32", "floating"]),
    "dense labels of another shape": (
        lambda loss: True, lambda loss: loss(X3, np.zeros((4, 1), np.float32)),
        ValueError, lambda loss: [_labels_name(loss), "(4, 3)", "(4, 1)"]),
    "class ids of the wrong shape": (
        lambda loss: True, lambda loss: loss(X3, np.zeros((3,), np.int32)),
        ValueError, lambda loss: [_labels_name(loss), "(4,)", "(3,)"]),
    "complex labels": (lambda loss: True, lambda loss: loss(X3, np.zeros((4, 3), np.complex64)),
                       TypeError, lambda loss: [_labels_name(loss), "complex64"]),
    "unknown reduction": (lambda loss: True, lambda loss: loss(X3, IDS, reduction="avg"),
                          ValueError, lambda loss: ["reduction", "'avg'", "'mean'"]),
    "normalizer without mean": (
        lambda loss: True, lambda loss: loss(X3, IDS, reduction="sum", normalizer=3.0),
        ValueError, lambda loss: ["normalizer", "reduction='mean'", "'sum'"]),
    "unknown normalizer string": (
        lambda loss: True, lambda loss: loss(X3, IDS, reduction="mean", normalizer="positives"),
        ValueError, lambda loss: ["normalizer", "'positives'", "num_positives"]),
    "non-scalar normalizer": (
        lambda loss: True, lambda loss: loss(X3, IDS, reduction="mean", normalizer=np.ones(2)),
        ValueError, lambda loss: ["normalizer", "scalar", "(2,)"]),
    "float mask": (lambda loss: True, lambda loss: loss(X3, IDS, where=np.ones(4, np.float32)),
                   TypeError, lambda loss: ["where", "bool", "float32"]),
    "mask of the wrong shape": (
        lambda loss: True, lambda loss: loss(X3, IDS, where=np.ones(5, bool)),
        ValueError, lambda loss: ["where", "(5,)", "broadcast"]),
    "weights of the wrong shape": (
        lambda loss: True, lambda loss: loss(X3, IDS, weights=np.ones(5, np.float32)),
        ValueError, lambda loss: ["weights", "(5,)", "broadcast"]),
    "ignore_index with float labels": (
        lambda loss: True, lambda loss: loss(X3, X3, ignore_index=-1),
        TypeError, lambda loss: ["ignore_index", "integer", "float32"]),
    "ignore_index not an int": (
        lambda loss: True, lambda loss: loss(X3, IDS, ignore_index=1.5),
        TypeError, lambda loss: ["ignore_index", "int", "1.5"]),
    "label_smoothing above 1": (
        lambda loss: loss.takes("label_smoothing"), lambda loss: loss(X3, IDS, label_smoothing=1.5),
        ValueError, lambda loss: ["label_smoothing", "1.5"]),
    "negative gamma": (lambda loss: loss.takes("gamma"), lambda loss: loss(X3, IDS, gamma=-1.0),
                       ValueError, lambda loss: ["gamma", "-1.0"]),
    "nan gamma": (lambda loss: loss.takes("gamma"), lambda loss: loss(X3, IDS, gamma=float("nan")),
                  ValueError, lambda loss: ["gamma", "nan"]),
    "negative gamma array": (
        lambda loss: loss.takes("gamma"), lambda loss: loss(X3, IDS, gamma=NEGATIVE),
        ValueError, lambda loss: ["gamma", "-2.0"]),
    "gamma vector": (lambda loss: loss.takes("gamma"),
                     lambda loss: loss(X3, IDS, gamma=jnp.ones(2)),
                     ValueError, lambda loss: ["gamma", "scalar", "(2,)"]),
    "alpha vector of the wrong length": (
        lambda loss: loss.takes("alpha"), lambda loss: loss(X3, IDS, alpha=np.array([0.2, 0.3])),
        ValueError, lambda loss: ["alpha", "(3,)", "(2,)"]),
    "negative entry in an alpha vector": (
        lambda loss: loss.takes("alpha"),
        lambda loss: loss(X3, IDS, alpha=np.array([0.2, -0.3, 0.1])),
        ValueError, lambda loss: ["alpha", "-0.3", "(1,)"]),
    "pos_weight negative": (
        lambda loss: loss.takes("pos_weight"), lambda loss: loss(X3, IDS, pos_weight=-1.0),
        ValueError, lambda loss: ["pos_weight", "-1.0", "> 0"]),
    "pos_weight of the wrong length": (
        lambda loss: loss.takes("pos_weight"),
        lambda loss: loss(X3, IDS, pos_weight=np.ones(2)),
        ValueError, lambda loss: ["pos_weight", "(3,)", "(2,)"]),
    "negative z_loss": (lambda loss: loss.takes("z_loss"),
                        lambda loss: loss(X3, IDS, z_loss=-1e-4),
                        ValueError, lambda loss: ["z_loss", "-0.0001", ">= 0"]),
    "z_loss vector": (lambda loss: loss.takes("z_loss"),
                      lambda loss: loss(X3, IDS, z_loss=jnp.ones(3)),
                      ValueError, lambda loss: ["z_loss", "scalar", "(3,)"]),
    "a string for an array": (
        lambda loss: loss.takes("weights"), lambda loss: loss(X3, IDS, weights="1"),
        TypeError, lambda loss: ["weights", "'1'"]),
}


def _common_cases():
  return [pytest.param(loss, name, id=f"{loss.name}-{name}")
          for loss in registry.LOSSES.values() for name, (applies, *_) in COMMON.items()
          if applies(loss)]


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("loss, name", _common_cases())
def test_common_trace_time_errors_are_explained(loss, name, mode):
  _, call, error, words = COMMON[name]
  run = (lambda: call(loss)) if mode == "eager" else jax.jit(lambda: call(loss))
  _assert_explained(run, error, words(loss))


def _assert_explained(run, error, words):
  with pytest.raises(error) as info:
    run()
  assert type(info.value) is error  # not an AssertionError wrapped or re-raised
  for word in words:
    assert word in str(info.value), f"{word!r} missing from: {info.value}"


# name -> (call, exception, words the message must contain)
SPECIFIC = {
    "sigmoid alpha above 1": (lambda: jfocal.sigmoid_focal_loss(X3, IDS, alpha=1.5),
                              ValueError, ["alpha", "[0, 1]", "1.5"]),
    "infinite entry in a softmax alpha vector": (
        lambda: jfocal.softmax_focal_loss(X3, IDS, alpha=np.array([0.2, 3.0, np.inf])),
        ValueError, ["alpha", "finite and >= 0", "inf", "(2,)"]),
    "scalar alpha for softmax": (lambda: jfocal.softmax_focal_loss(X3, IDS, alpha=0.25),
                                 ValueError, ["alpha", "per-class", "background_alpha"]),
    "axis out of range": (lambda: jfocal.softmax_cross_entropy(X3, IDS, axis=2),
                          ValueError, ["axis", "2", "rank 2"]),
    "softmax without classes": (lambda: jfocal.softmax_focal_loss(np.zeros((3, 0), np.float32),
                                                                   np.zeros((3,), np.int32)),
                                ValueError, ["at least one class", "(3, 0)"]),
    "scalar logits for softmax": (lambda: jfocal.softmax_cross_entropy(np.float32(1.0), 0),
                                  ValueError, ["class axis"]),
    "a per-logit mask of the wrong shape": (
        lambda: jfocal.softmax_cross_entropy(X3, IDS, where=np.ones((4, 2), bool)),
        ValueError, ["where", "(4, 2)", "logits' shape", "(4, 3)"]),
    "integer labels of scalar logits with a shape": (
        lambda: jfocal.sigmoid_focal_loss(np.float32(1.0), np.zeros((2,), np.int32)),
        ValueError, ["labels", "scalar 0/1 target", "(2,)"]),

    "FL* gamma zero": (lambda: jfocal.sigmoid_focal_loss_star(X3, IDS, gamma=0.0),
                       ValueError, ["gamma", "0.0", "> 0"]),
    "FL* beta infinite": (lambda: jfocal.sigmoid_focal_loss_star(X3, IDS, beta=float("inf")),
                          ValueError, ["beta", "inf"]),
    "FL* beta vector": (lambda: jfocal.sigmoid_focal_loss_star(X3, IDS, beta=np.ones(2)),
                        ValueError, ["beta", "scalar", "(2,)"]),
    "poly epsilon below -1": (lambda: jfocal.poly1_focal_loss(X3, IDS, epsilon=-1.5),
                              ValueError, ["epsilon", "-1.5", ">= -1"]),
    "poly CE epsilon nan": (lambda: jfocal.poly1_cross_entropy(X3, IDS, epsilon=float("nan")),
                            ValueError, ["epsilon", "nan"]),
    "poly CE epsilon string": (lambda: jfocal.poly1_cross_entropy(X3, IDS, epsilon="1"),
                               TypeError, ["epsilon", "'1'"]),
    "QFL negative beta": (lambda: jfocal.quality_focal_loss(X3, IDS, beta=-1.0),
                          ValueError, ["beta", "-1.0", ">= 0"]),
    "QFL scores of the wrong shape": (
        lambda: jfocal.quality_focal_loss(X3, (IDS, np.ones((3,), np.float32))),
        ValueError, ["scores", "(4,)", "(3,)"]),
    "QFL integer scores": (lambda: jfocal.quality_focal_loss(X3, (IDS, IDS)),
                           TypeError, ["scores", "int32", "float"]),
    "QFL pair with float ids": (
        lambda: jfocal.quality_focal_loss(X3, (IDS.astype(np.float32), np.ones(4, np.float32))),
        TypeError, ["class ids", "float32"]),
    "QFL pair of three": (lambda: jfocal.quality_focal_loss(X3, (IDS, IDS, IDS)),
                          ValueError, ["(class_ids, scores)", "3"]),
    "VFL alpha above 1": (lambda: jfocal.varifocal_loss(X3, X3, alpha=1.5),
                          ValueError, ["alpha", "[0, 1]", "1.5"]),
    "VFL negative gamma": (lambda: jfocal.varifocal_loss(X3, X3, gamma=-0.5),
                           ValueError, ["gamma", "-0.5"]),
    "VFL iou_weighted not bool": (lambda: jfocal.varifocal_loss(X3, X3, iou_weighted=1),
                                  TypeError, ["iou_weighted", "bool", "1"]),
    "GHM zero bins": (lambda: jfocal.ghmc_loss(X3, IDS, bins=0), ValueError,
                      ["bins", "0", ">= 1"]),
    "GHM float bins": (lambda: jfocal.ghmc_loss(X3, IDS, bins=2.5), TypeError,
                       ["bins", "2.5", "int"]),
    "GHM momentum 1": (lambda: jfocal.ghmc_loss(X3, IDS, momentum=1.0), ValueError,
                       ["momentum", "1.0", "[0, 1)"]),
    "GHM state of the wrong shape": (
        lambda: jfocal.ghmc_loss(X3, IDS, bins=10, state=jnp.zeros((5,))),
        ValueError, ["state", "(5,)", "(10,)", "ghmc_init"]),
    "GHM integer state": (lambda: jfocal.ghmc_loss(X3, IDS, bins=3, state=np.zeros(3, np.int32)),
                          TypeError, ["state", "int32", "float"]),
    "ASL clip above 1": (lambda: jfocal.asymmetric_loss(X3, IDS, clip=1.5),
                         ValueError, ["clip", "1.5", "[0, 1]"]),
    "ASL negative gamma_neg": (lambda: jfocal.asymmetric_loss(X3, IDS, gamma_neg=-1.0),
                               ValueError, ["gamma_neg", "-1.0", ">= 0"]),
    "ASL gamma_pos vector": (lambda: jfocal.asymmetric_loss(X3, IDS, gamma_pos=jnp.ones(3)),
                             ValueError, ["gamma_pos", "scalar", "(3,)"]),
    "ASL detach_focusing array": (
        lambda: jfocal.asymmetric_loss(X3, IDS, detach_focusing=np.ones(2, bool)),
        TypeError, ["detach_focusing", "static"]),
    "logit adjustment priors of the wrong length": (
        lambda: jfocal.logit_adjusted_cross_entropy(X3, IDS, class_priors=np.ones(2)),
        ValueError, ["class_priors", "(3,)", "(2,)"]),
    "logit adjustment zero prior": (
        lambda: jfocal.logit_adjusted_cross_entropy(X3, IDS, class_priors=np.array([0.5, 0, 0.5])),
        ValueError, ["class_priors", "> 0", "(1,)"]),
    "logit adjustment scalar prior": (
        lambda: jfocal.logit_adjusted_cross_entropy(X3, IDS, class_priors=0.5),
        ValueError, ["class_priors", "(3,)"]),
    "logit adjustment tau vector": (
        lambda: jfocal.logit_adjusted_cross_entropy(X3, IDS, class_priors=np.ones(3),
                                                    tau=np.ones(2)),
        ValueError, ["tau", "scalar", "(2,)"]),
    "class_priors_from_counts zero count": (
        lambda: jfocal.class_priors_from_counts(np.array([3, 0, 2])),
        ValueError, ["counts", "> 0", "index 1", "counts + 1"]),
    "class_priors_from_counts matrix": (
        lambda: jfocal.class_priors_from_counts(np.ones((2, 3))),
        ValueError, ["counts", "(C,)", "(2, 3)"]),
    "ghmc_init bins": (lambda: jfocal.ghmc_init(-2), ValueError, ["bins", "-2"]),
    "class_balanced_alpha beta 1": (lambda: jfocal.class_balanced_alpha(np.ones(3), beta=1.0),
                                    ValueError, ["beta", "[0, 1)", "1.0"]),
    "class_balanced_alpha matrix": (lambda: jfocal.class_balanced_alpha(np.ones((2, 3))),
                                    ValueError, ["counts", "(C,)", "(2, 3)"]),
    "class_balanced_alpha negative count": (
        lambda: jfocal.class_balanced_alpha(np.array([3, -1])), ValueError, ["counts", "-1"]),
}




@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("name", sorted(SPECIFIC))
def test_specific_trace_time_errors_are_explained(name, mode):
  call, error, words = SPECIFIC[name]
  _assert_explained(call if mode == "eager" else jax.jit(call), error, words)


def test_traced_alpha_and_weights_are_accepted_without_value_checks():
  step = jax.jit(lambda x, alpha, w: jfocal.sigmoid_focal_loss(x, IDS, alpha=alpha, weights=w))
  assert step(X3, jnp.float32(1.5), jnp.ones((4, 1))).shape == (4, 3)
