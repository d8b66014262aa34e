"""Figures of the demo: training curves and validation images with their detections.

Both return `matplotlib.figure.Figure` objects built without pyplot, so they
work headless (the demo saves them) and in notebooks (which display them).
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from examples.retinanet.data import DetectionSet
from examples.retinanet.detector import Detections

COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
  return np.convolve(values, np.ones(window) / window, mode="valid")


def training_curves(histories: dict[str, dict[str, np.ndarray]], *, window: int = 20) -> Figure:
  """Classification and box loss per positive anchor against the step, one line per run.

  The classification losses are different functions, so their levels are not
  comparable across runs, only their shapes; the box loss is the same function
  in every run.
  """
  steps = min(len(h["loss"]) for h in histories.values())
  window = max(1, min(window, steps // 10))
  figure = Figure(figsize=(11, 3.8), layout="constrained")
  axes = figure.subplots(1, 2)
  for (name, history), colour in zip(histories.items(), COLOURS):
    for ax, part in zip(axes, ("classification", "box")):
      smoothed = _smooth(history[part], window)
      ax.plot(np.arange(len(smoothed)) + window // 2, smoothed, color=colour, label=name)
  axes[0].set(title="classification loss / #positive anchors", xlabel="step", yscale="log")
  axes[1].set(title="smooth-L1 box loss / #positive anchors", xlabel="step", yscale="log")
  axes[0].legend()
  figure.suptitle(f"training curves (moving average over {window} steps)")
  return figure


def detections_grid(dataset: DetectionSet, detections: dict[str, Detections], *,
                    images: int = 6) -> Figure:
  """The first ``images`` validation images, one row per run: ground truth dashed, detections solid.

  Each image shows its k highest-scoring detections, k being its number of
  digits: what the ranking (all that AP measures) puts first, whatever the
  calibration of the scores. A fixed score threshold would favour the
  confident scores of cross-entropy over the lower ones of focal loss.
  """
  figure = Figure(figsize=(2.1 * images, 2.3 * len(detections)), layout="constrained")
  axes = figure.subplots(len(detections), images, squeeze=False)
  for row, ((name, found), colour) in enumerate(zip(detections.items(), COLOURS)):
    for column in range(images):
      ax = axes[row, column]
      ax.imshow(dataset.images[column, ..., 0], cmap="gray", vmin=0, vmax=1)
      ax.set(xticks=[], yticks=[])
      real = dataset.classes[column] >= 0
      for box in dataset.boxes[column][real]:
        ax.add_patch(Rectangle(box[:2], *(box[2:] - box[:2]), fill=False, ec="white",
                               ls="--", lw=0.8))
      boxes, scores, classes = (a[:np.sum(real)] for a in found.of_image(column))
      for box, score, digit in zip(boxes, scores, classes):
        ax.add_patch(Rectangle(box[:2], *(box[2:] - box[:2]), fill=False, ec=colour, lw=1.5))
        ax.text(box[0], box[1] - 1, f"{digit} {score:.2f}", color="white", fontsize=7,
                bbox={"facecolor": colour, "pad": 0.5, "lw": 0})
      if column == 0:
        ax.set_ylabel(name, fontsize=9)
  figure.suptitle("validation images: ground truth dashed; each image's k best detections, "
                  "k = its number of digits (label: class, score)")
  return figure
