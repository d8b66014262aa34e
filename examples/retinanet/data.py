"""A detection data set made of real handwritten digits: scikit-learn's 8x8 digits on canvases.

The 1797 digits bundled with scikit-learn (no download) are split once, by a
seed, into digits that may appear in training images and digits that may
appear in validation images, so validation measures unseen handwriting. Each
canvas gets 1 to `max_objects` digits, cropped to their ink, scaled to a
random height and pasted at a random place without overlapping another digit;
the box is the pasted rectangle. Most of every canvas is empty: the flood of
easy background anchors that focal loss was designed for.
"""

from __future__ import annotations

import dataclasses

import numpy as np

NUM_CLASSES = 10
# A source pixel with at least this much ink (of 1) belongs to the digit's box.
INK_THRESHOLD = 0.2


@dataclasses.dataclass(frozen=True)
class DetectionSet:
  """Images with padded ground truth: ``G`` slots per image, class -1 on unused slots."""

  images: np.ndarray  # (N, H, W, 1) float32 in [0, 1]
  boxes: np.ndarray  # (N, G, 4) float32, (x1, y1, x2, y2) pixels, zeros on padding
  classes: np.ndarray  # (N, G) int32, digit 0..9 or -1 on padding

  def __len__(self) -> int:
    return len(self.images)

  def take(self, indices: np.ndarray | slice) -> DetectionSet:
    return DetectionSet(self.images[indices], self.boxes[indices], self.classes[indices])


@dataclasses.dataclass(frozen=True)
class CanvasConfig:
  image_size: int = 64
  max_objects: int = 5
  min_height: int = 12
  max_height: int = 30


def split_digits(seed: int, validation_fraction: float = 0.3
                 ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """Stratified split of the bundled digits: ((train images, labels), (validation ...)).

  Images are ``(n, 8, 8)`` float32 in [0, 1].
  """
  # Imported here: scikit-learn takes seconds to import, and only this function needs it.
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)
  labels = digits.target.astype(np.int32)
  train_x, val_x, train_y, val_y = train_test_split(
      images, labels, test_size=validation_fraction, stratify=labels, random_state=seed)
  return (train_x, train_y), (val_x, val_y)


def _resize_matrix(size_in: int, size_out: int) -> np.ndarray:
  """``(size_out, size_in)`` matrix of bilinear interpolation with half-pixel centres."""
  positions = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
  return np.stack([np.interp(positions, np.arange(size_in), np.eye(size_in)[k])
                   for k in range(size_in)], axis=1)


def _crop_to_ink(digit: np.ndarray) -> np.ndarray:
  rows = np.flatnonzero(digit.max(axis=1) >= INK_THRESHOLD)
  cols = np.flatnonzero(digit.max(axis=0) >= INK_THRESHOLD)
  return digit[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _overlaps(box: np.ndarray, others: list[np.ndarray]) -> bool:
  return any(box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3] for o in others)


def make_canvases(digits: np.ndarray, labels: np.ndarray, num_images: int, *, seed: int,
                  config: CanvasConfig = CanvasConfig()) -> DetectionSet:
  """``num_images`` canvases of randomly placed, randomly scaled digits from ``digits``."""
  rng = np.random.default_rng(seed)
  size = config.image_size
  images = np.zeros((num_images, size, size, 1), np.float32)
  boxes = np.zeros((num_images, config.max_objects, 4), np.float32)
  classes = np.full((num_images, config.max_objects), -1, np.int32)
  for n in range(num_images):
    placed: list[np.ndarray] = []
    for _ in range(rng.integers(1, config.max_objects + 1)):
      index = rng.integers(len(digits))
      crop = _crop_to_ink(digits[index])
      height = int(rng.integers(config.min_height, config.max_height + 1))
      width = max(2, round(height * crop.shape[1] / crop.shape[0]))
      # A few tries at a free spot; a digit that finds none is left out.
      for _ in range(20):
        x, y = rng.integers(0, size - width + 1), rng.integers(0, size - height + 1)
        box = np.array([x, y, x + width, y + height], np.float32)
        if not _overlaps(box, placed):
          break
      else:
        continue
      patch = _resize_matrix(crop.shape[0], height) @ crop @ _resize_matrix(crop.shape[1], width).T
      region = images[n, y:y + height, x:x + width, 0]
      np.maximum(region, patch, out=region)
      boxes[n, len(placed)] = box
      classes[n, len(placed)] = labels[index]
      placed.append(box)
  return DetectionSet(images, boxes, classes)


def train_validation_sets(num_train: int, num_validation: int, *, seed: int,
                          config: CanvasConfig = CanvasConfig()
                          ) -> tuple[DetectionSet, DetectionSet]:
  """The fixed split: training canvases from training digits, validation from the rest."""
  (train_x, train_y), (val_x, val_y) = split_digits(seed)
  train = make_canvases(train_x, train_y, num_train, seed=seed, config=config)
  validation = make_canvases(val_x, val_y, num_validation, seed=seed + 1, config=config)
  return train, validation
