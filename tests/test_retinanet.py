"""The tiny RetinaNet of examples/retinanet: anchors, matching, box coder, NMS, loss, training."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from examples.retinanet import boxes as box_ops
from examples.retinanet import data as data_lib
from examples.retinanet import demo
from examples.retinanet.detector import Detections, Detector
from examples.retinanet.evaluate import coco_results, evaluate
from examples.retinanet.losses import LOSS_KEYS, classification_losses, detection_loss, image_loss
from examples.retinanet.train import TrainConfig, make_optimizer, make_train_step


@pytest.fixture(autouse=True)
def float32_defaults():
  # The example is written for JAX's defaults (float32, standard promotion, which
  # optax's update rules need), not the suite's x64 strict mode.
  with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
    yield


@pytest.fixture(scope="module")
def small_sets() -> tuple[data_lib.DetectionSet, data_lib.DetectionSet]:
  return data_lib.train_validation_sets(600, 100, seed=0)


def iou(a, b) -> np.ndarray:
  return np.asarray(box_ops.pairwise_iou(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))


# ----------------------------------------------------------------- anchors and IoU


def test_anchors_tile_each_level_row_by_row_centred_on_cells():
  config = box_ops.AnchorConfig(strides=(8, 16), sizes=(8.0, 16.0), scales=(1.0,),
                                aspect_ratios=(1.0,))
  anchors = box_ops.generate_anchors(16, config)
  np.testing.assert_array_equal(anchors, [
      [0, 0, 8, 8], [8, 0, 16, 8], [0, 8, 8, 16], [8, 8, 16, 16],  # stride 8: 2x2 cells
      [0, 0, 16, 16]])  # stride 16: one cell


def test_anchor_shapes_follow_scales_and_aspect_ratios():
  config = box_ops.AnchorConfig(strides=(8,), sizes=(10.0,), scales=(1.0, 2.0),
                                aspect_ratios=(0.5, 1.0, 2.0))
  anchors = box_ops.generate_anchors(8, config)  # one cell centred at (4, 4)
  assert anchors.shape == (config.anchors_per_position, 4) == (6, 4)
  width, height = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
  np.testing.assert_allclose(width * height, [100] * 3 + [400] * 3, rtol=1e-5)
  np.testing.assert_allclose(height / width, [0.5, 1, 2] * 2, rtol=1e-5)
  np.testing.assert_allclose((anchors[:, :2] + anchors[:, 2:]) / 2, 4.0, rtol=1e-6)


def test_model_outputs_one_prediction_per_anchor():
  detector = Detector()
  model = detector.init(0)
  logits, deltas = model(jnp.zeros((2, 64, 64, 1)))
  assert logits.shape == (2, len(detector.anchors), 10)
  assert deltas.shape == (2, len(detector.anchors), 4)


def test_detector_rejects_anchors_that_do_not_fit_the_pyramid():
  with pytest.raises(ValueError, match="strides"):
    Detector(anchor_config=box_ops.AnchorConfig(strides=(8, 16)))


def test_classification_bias_starts_at_the_prior():
  detector = Detector()
  logits, deltas = detector.init(0)(jnp.zeros((1, 64, 64, 1)))
  # A blank image leaves only the biases: every anchor says "foreground with probability 0.01".
  np.testing.assert_allclose(jax.nn.sigmoid(logits), 0.01, rtol=1e-5)
  np.testing.assert_array_equal(deltas, 0)


def test_pairwise_iou_on_hand_made_boxes():
  np.testing.assert_allclose(
      iou([[0, 0, 2, 2]], [[0, 0, 2, 2], [1, 0, 3, 2], [2, 0, 4, 2], [5, 5, 6, 6], [0, 0, 4, 4]]),
      [[1.0, 1 / 3, 0.0, 0.0, 0.25]], rtol=1e-6)


# ----------------------------------------------------------------- matching


GT = [[0, 0, 10, 10]]
ANCHORS = [
    [0, 0, 10, 12],  # IoU 100/120 = 0.83: foreground
    [0, 0, 10, 20],  # IoU 0.5 exactly: foreground (>= 0.5)
    [0, 0, 10, 24],  # IoU 0.417: ignored (between 0.4 and 0.5)
    [0, 0, 10, 25],  # IoU 0.4 exactly: ignored (not < 0.4)
    [5, 5, 15, 15],  # IoU 25/175 = 0.14: background
    [50, 50, 60, 60],  # no overlap: background
]


def match(anchors, gt, valid=None, **kwargs) -> list[int]:
  valid = np.ones(len(gt), bool) if valid is None else np.asarray(valid)
  return np.asarray(box_ops.match_anchors(jnp.asarray(anchors, jnp.float32),
                                          jnp.asarray(gt, jnp.float32), valid, **kwargs)).tolist()


def test_matching_uses_the_papers_thresholds():
  fg, bg, ignored = 0, box_ops.BACKGROUND, box_ops.IGNORED
  assert match(ANCHORS, GT) == [fg, fg, ignored, ignored, bg, bg]


def test_each_anchor_takes_its_best_ground_truth():
  gt = [[0, 0, 10, 10], [0, 0, 10, 11]]
  assert match([[0, 0, 10, 12], [0, 0, 10, 9]], gt) == [1, 0]


def test_low_quality_matches_give_every_object_its_best_anchors():
  # A small object whose best IoU (0.09) is far below 0.5, ties included.
  gt = [[30, 30, 33, 33]]
  anchors = [[30, 30, 40, 40], [23, 23, 33, 33], [30, 30, 50, 50], [0, 0, 10, 10]]
  assert match(anchors, gt) == [0, 0, box_ops.BACKGROUND, box_ops.BACKGROUND]
  assert match(anchors, gt, allow_low_quality_matches=False) == [box_ops.BACKGROUND] * 4


def test_an_object_overlapping_no_anchor_makes_no_anchor_foreground():
  assert match(ANCHORS, [[100, 100, 110, 110]]) == [box_ops.BACKGROUND] * len(ANCHORS)


def test_padded_ground_truth_matches_nothing():
  gt = GT + [[0, 0, 10, 12]]  # padding that happens to equal an anchor
  assert match(ANCHORS, gt, valid=[True, False])[0] == 0
  assert match(ANCHORS, gt, valid=[False, False]) == [box_ops.BACKGROUND] * len(ANCHORS)


def test_assigned_targets_are_classes_background_and_ignored():
  class_targets, box_targets = box_ops.assign_targets(
      jnp.asarray(ANCHORS, jnp.float32), jnp.asarray(GT + [[0, 0, 0, 0]], jnp.float32),
      jnp.asarray([7, -1]), num_classes=10)
  assert np.asarray(class_targets).tolist() == [7, 7, -1, -1, 10, 10]
  np.testing.assert_allclose(box_targets[0], [0, -1 / 12, 0, np.log(10 / 12)], rtol=1e-5)
  assert np.all(np.isfinite(box_targets))


# ----------------------------------------------------------------- box coder and NMS


def test_encoding_follows_the_rcnn_parametrisation():
  anchor, box = jnp.asarray([[0.0, 0, 10, 10]]), jnp.asarray([[5.0, 0, 15, 20]])
  np.testing.assert_allclose(box_ops.BoxCoder().encode(box, anchor), [[0.5, 0.5, 0, np.log(2)]],
                             rtol=1e-6)
  np.testing.assert_allclose(box_ops.BoxCoder((10, 10, 5, 5)).encode(box, anchor),
                             [[5, 5, 0, 5 * np.log(2)]], rtol=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_decode_inverts_encode(weights):
  rng = np.random.default_rng(0)
  corner = rng.uniform(0, 50, (200, 2))
  anchors = np.concatenate([corner, corner + rng.uniform(2, 40, (200, 2))], -1)
  corner = corner + rng.uniform(-10, 10, (200, 2))
  boxes = np.concatenate([corner, corner + rng.uniform(1, 60, (200, 2))], -1)
  coder = box_ops.BoxCoder(weights)
  deltas = coder.encode(jnp.asarray(boxes, jnp.float32), jnp.asarray(anchors, jnp.float32))
  np.testing.assert_allclose(coder.decode(deltas, jnp.asarray(anchors, jnp.float32)), boxes,
                             rtol=1e-5, atol=1e-4)


def test_decode_clamps_huge_scales():
  decoded = box_ops.BoxCoder().decode(jnp.asarray([[0.0, 0, 100, 100]]),
                                      jnp.asarray([[0.0, 0, 1, 1]]))
  np.testing.assert_allclose(decoded[0, 2] - decoded[0, 0], 1000 / 16, rtol=1e-5)


def test_nms_is_greedy_class_wise_and_respects_validity():
  boxes = jnp.asarray([[0, 0, 10, 10], [1, 0, 11, 10], [1, 0, 11, 10], [2, 0, 12, 10],
                       [6, 0, 16, 10], [20, 20, 30, 30]], jnp.float32)
  classes = jnp.asarray([0, 0, 1, 0, 0, 0])
  valid = jnp.asarray([True, True, True, True, True, False])
  keep = box_ops.class_wise_nms(boxes, classes, valid, iou_threshold=0.5)
  # 1 and 3 overlap 0 (IoU 0.82, 0.67); 2 is another class; 4 overlaps only
  # the suppressed 3 by more than 0.5 (0.67 against 3, 0.25 against 0); 5 is invalid.
  assert np.asarray(keep).tolist() == [True, False, True, False, True, False]


# ----------------------------------------------------------------- the loss


def random_outputs(seed: int, batch: int = 3, anchors: int = 50, classes: int = 4):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(0, 3, (batch, anchors, classes)), jnp.float32)
  deltas = jnp.asarray(rng.normal(0, 1, (batch, anchors, 4)), jnp.float32)
  # Mostly background (id C), a few positives, some ignored (-1); image 0 has no positives.
  targets = rng.choice([classes, -1, 0, 1, 2, 3], (batch, anchors), p=[0.8, 0.1, 0.025, 0.025,
                                                                          0.025, 0.025])
  targets[0] = np.where(targets[0] >= 0, classes, targets[0])
  box_targets = jnp.asarray(rng.normal(0, 1, (batch, anchors, 4)), jnp.float32)
  return logits, deltas, jnp.asarray(targets, jnp.int32), box_targets


@pytest.mark.parametrize("key", LOSS_KEYS)
def test_vmapped_per_image_loss_equals_the_batched_loss(key):
  _, loss = classification_losses()[key]
  logits, deltas, targets, box_targets = random_outputs(1)
  total, parts = jax.jit(functools.partial(detection_loss, classification_loss=loss))(
      logits, deltas, targets, box_targets)
  # The same loss on the whole batch at once, jfocal normalising by its positives.
  batched = loss.func(logits, targets, **{**loss.keywords, "reduction": "mean",
                                          "normalizer": "num_positives"})
  np.testing.assert_allclose(parts["classification"], batched, rtol=2e-6)
  # And anchor by anchor: a per-anchor loss vmapped over anchors, then over images.
  per_anchor = jax.vmap(jax.vmap(loss))(logits, targets)
  positives = np.sum((np.asarray(targets) >= 0) & (np.asarray(targets) < 4))
  assert parts["positives"] == positives > 0
  np.testing.assert_allclose(parts["classification"], np.sum(per_anchor) / positives, rtol=2e-6)
  np.testing.assert_allclose(total, parts["classification"] + parts["box"], rtol=1e-6)


def test_box_loss_counts_positive_anchors_only():
  logits, deltas, targets, box_targets = random_outputs(2)
  _, loss = classification_losses()["focal"]
  _, box_loss, _ = image_loss(logits[1], deltas[1], targets[1], box_targets[1], loss)
  moved = deltas.at[1].add(jnp.where((targets[1] >= 0) & (targets[1] < 4), 0.0, 5.0)[:, None])
  _, box_loss_moved, _ = image_loss(logits[1], moved[1], targets[1], box_targets[1], loss)
  np.testing.assert_allclose(box_loss, box_loss_moved, rtol=1e-6)
  # Smooth L1: quadratic below beta = 0.1, linear above.
  _, exact, _ = image_loss(logits[1], box_targets[1], targets[1], box_targets[1], loss)
  assert exact == 0


def test_a_batch_without_positives_is_normalised_by_one():
  logits, deltas, targets, box_targets = random_outputs(3)
  background_only = jnp.where(targets >= 0, 4, targets)
  _, loss = classification_losses()["ce"]
  _, parts = detection_loss(logits, deltas, background_only, box_targets, loss)
  assert parts["positives"] == 0 and parts["box"] == 0
  per_image = jax.vmap(loss)(logits, background_only)
  np.testing.assert_allclose(parts["classification"], np.sum(per_image), rtol=1e-6)


# ----------------------------------------------------------------- data and evaluation


def test_canvases_hold_one_to_five_separate_digits_inside_the_image(small_sets):
  train, validation = small_sets
  for dataset in small_sets:
    counts = np.sum(dataset.classes >= 0, axis=1)
    assert counts.min() >= 1 and counts.max() <= 5
    assert set(np.unique(dataset.classes[dataset.classes >= 0])) == set(range(10))
    real = dataset.boxes[dataset.classes >= 0]
    assert real.min() >= 0 and real.max() <= 64 and np.all(real[:, 2:] > real[:, :2])
    # All ink lies inside the boxes, and every box holds ink.
    for image, image_boxes, classes in zip(dataset.images[:50], dataset.boxes, dataset.classes):
      outside = np.ones(image.shape[:2], bool)
      for x1, y1, x2, y2 in image_boxes[classes >= 0].astype(int):
        assert image[y1:y2, x1:x2].max() > 0.5
        outside[y1:y2, x1:x2] = False
      assert image[outside].max(initial=0) == 0
  again, _ = data_lib.train_validation_sets(600, 100, seed=0)
  np.testing.assert_array_equal(again.images, train.images)
  assert not np.array_equal(validation.images[:10], train.images[:10])


def test_training_and_validation_use_disjoint_handwriting():
  (train_x, _), (val_x, _) = data_lib.split_digits(seed=0)
  train_rows = {x.tobytes() for x in train_x}
  assert len(train_x) + len(val_x) == 1797
  assert sum(x.tobytes() in train_rows for x in val_x) <= 5  # the data set has a few duplicates


def oracle_outputs(detector: Detector, dataset: data_lib.DetectionSet):
  """What a perfect network would output: its own targets as logits and deltas."""
  class_targets, box_targets = detector.targets(dataset.boxes, dataset.classes)
  logits = jnp.where(jax.nn.one_hot(class_targets, detector.num_classes) > 0, 8.0, -8.0)
  return logits, box_targets


def test_a_perfect_detector_scores_ap_one_through_the_whole_pipeline(small_sets):
  _, validation = small_sets
  detector = Detector()
  detections = Detections(*map(np.asarray, detector.postprocess(*oracle_outputs(detector,
                                                                                validation))))
  # NMS leaves exactly one detection per object, equal to its box.
  assert detections.keep.sum() == np.sum(validation.classes >= 0)
  assert evaluate(validation, detections) == {"AP": 1.0, "AP50": 1.0, "AP75": 1.0}
  first = coco_results(detections)[0]
  box = validation.boxes[0, np.flatnonzero(validation.classes[0] == first["category_id"] - 1)[0]]
  np.testing.assert_allclose(first["bbox"], [*box[:2], *(box[2:] - box[:2])], atol=1e-3)


def test_coco_ap75_sees_localisation_errors(small_sets):
  _, validation = small_sets
  detector = Detector()
  logits, box_targets = oracle_outputs(detector, validation)
  # Every box 1.35x too wide and tall, same centre: IoU 0.55, a hit at 0.5, a miss at 0.75.
  widened = box_targets.at[..., 2:].add(np.log(1.35))
  detections = Detections(*map(np.asarray, detector.postprocess(logits, widened)))
  metrics = evaluate(validation, detections)
  assert metrics["AP50"] == 1.0 and metrics["AP75"] == 0.0


def test_no_detections_score_zero(small_sets):
  _, validation = small_sets
  nothing = Detections(np.zeros((100, 1, 4)), np.zeros((100, 1)), np.zeros((100, 1), int),
                       np.zeros((100, 1), bool))
  assert evaluate(validation, nothing) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}


# ----------------------------------------------------------------- training


def test_one_train_step_lowers_the_loss(small_sets):
  train_set, _ = small_sets
  detector = Detector()
  batch = train_set.take(slice(0, 8))
  _, loss = classification_losses()["focal"]
  # No warm-up: the schedule's first learning rate would be 0.
  step = make_train_step(detector, loss)
  model = detector.init(0)
  optimizer = nnx.Optimizer(model, make_optimizer(TrainConfig(warmup_steps=0, learning_rate=1e-3)),
                            wrt=nnx.Param)
  before = step(model, optimizer, batch.images, batch.boxes, batch.classes)  # updates both
  after = step(model, optimizer, batch.images, batch.boxes, batch.classes)
  assert float(after["loss"]) < float(before["loss"])
  assert float(after["classification"]) < float(before["classification"])


def test_a_short_run_of_the_demo_detects_digits_far_above_chance(small_sets, tmp_path, capsys):
  # Chance: every anchor of every image a detection with a random class and score.
  _, validation = small_sets
  detector = Detector()
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(0, 1, (len(validation), len(detector.anchors), 10)), jnp.float32)
  chance = evaluate(validation, Detections(*map(np.asarray, detector.postprocess(
      logits, jnp.zeros((*logits.shape[:2], 4))))))
  rows = demo.main(["--steps", "80", "--losses", "focal", "--train-images", "600",
                    "--val-images", "100", "--out", str(tmp_path), "--no-progress"])
  printed = capsys.readouterr().out
  assert "| loss | AP | AP50 | AP75 | final loss | wall time (s) |" in printed
  assert {p.name for p in tmp_path.iterdir()} == {
      "training_curves.png", "detections.png", "results.md", "results.json"}
  (row,) = rows
  assert chance["AP50"] < 0.05
  assert row["AP50"] > max(0.1, 20 * chance["AP50"]), (row, chance)


def test_almost_every_digit_has_an_anchor_at_iou_one_half(small_sets):
  train_set, _ = small_sets
  anchors = jnp.asarray(Detector().anchors)
  best = jax.vmap(lambda gt: jnp.max(box_ops.pairwise_iou(gt, anchors), axis=1))(train_set.boxes)
  assert np.mean(np.asarray(best)[train_set.classes >= 0] >= 0.5) > 0.98
