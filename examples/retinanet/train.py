"""Training in Flax NNX with optax: clipping, AdamW, warm-up and cosine decay, an `nnx.jit` step."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from examples.retinanet.data import DetectionSet
from examples.retinanet.detector import Detector
from examples.retinanet.losses import ClassificationLoss
from examples.retinanet.model import RetinaNet


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The demo's budget and optimiser; ``seed`` fixes the initialisation and the batch order."""

  steps: int = 500
  batch_size: int = 16
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  weight_decay: float = 1e-4
  clip_norm: float = 1.0
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainResult:
  model: RetinaNet  # the trained model
  history: dict[str, np.ndarray]  # "loss", "classification", "box": one value per step
  seconds: float  # wall time of the whole run, compilation included


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """RetinaNet's recipe in optax: linear warm-up (as Detectron's configs), clipped AdamW.

  The paper trains with SGD and momentum; AdamW reaches a usable detector in far
  fewer steps, which a CPU demo needs. Clipping guards the first steps, where
  cross-entropy without focusing can produce large gradients.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=max(config.steps, config.warmup_steps + 1), end_value=config.learning_rate / 100)
  return optax.chain(optax.clip_by_global_norm(config.clip_norm),
                     optax.adamw(schedule, weight_decay=config.weight_decay))


TrainStep = Callable[[RetinaNet, nnx.Optimizer, jax.Array, jax.Array, jax.Array],
                     dict[str, jax.Array]]


def make_train_step(detector: Detector, classification_loss: ClassificationLoss) -> TrainStep:
  """The compiled step ``(model, optimizer, images, gt_boxes, gt_classes) -> metrics``.

  ``optimizer`` is an `nnx.Optimizer` over the `nnx.Param` variables of
  ``model``; the step updates both in place (`nnx.jit` writes the new
  parameters and optimiser state back into the objects). Targets are assigned
  inside the step (matching is cheap next to the network), so a batch is just
  images and padded ground truth. ``metrics`` holds the loss before the update
  and its parts.
  """

  @nnx.jit
  def step(model: RetinaNet, optimizer: nnx.Optimizer, images: jax.Array, gt_boxes: jax.Array,
           gt_classes: jax.Array) -> dict[str, jax.Array]:
    def loss_fn(model: RetinaNet) -> tuple[jax.Array, dict[str, jax.Array]]:
      return detector.loss(model, images, gt_boxes, gt_classes, classification_loss)

    # Gradients with respect to the model's `nnx.Param`s, the variables the optimiser updates.
    (loss, parts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return {"loss": loss, **parts}

  return step


def train(detector: Detector, classification_loss: ClassificationLoss, data: DetectionSet,
          config: TrainConfig, *, description: str = "train", progress: bool = True
          ) -> TrainResult:
  """Trains from the seed's initialisation on random batches of ``data`` (the seed's order).

  The progress bar shows the step, the loss (every 10 steps, to keep the
  device busy) and the speed.
  """
  step = make_train_step(detector, classification_loss)
  start = time.perf_counter()
  model = detector.init(config.seed)
  optimizer = nnx.Optimizer(model, make_optimizer(config), wrt=nnx.Param)
  rng = np.random.default_rng(config.seed)
  history: dict[str, list[jax.Array]] = {"loss": [], "classification": [], "box": []}
  bar = tqdm(range(config.steps), desc=description, disable=not progress, unit="step",
             dynamic_ncols=True)
  for step_index in bar:
    batch = data.take(rng.choice(len(data), config.batch_size, replace=False))
    metrics = step(model, optimizer, batch.images, batch.boxes, batch.classes)
    for name, values in history.items():
      values.append(metrics[name])
    if step_index % 10 == 0 or step_index == config.steps - 1:
      bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
  history_arrays = {name: np.asarray(jax.device_get(values), np.float32)
                    for name, values in history.items()}
  return TrainResult(model, history_arrays, time.perf_counter() - start)
