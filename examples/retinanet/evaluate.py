"""COCO evaluation with pycocotools: AP, AP50 and AP75 of the detections on a data set."""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from examples.retinanet.data import NUM_CLASSES, DetectionSet
from examples.retinanet.detector import Detections


def category_id(digit: int) -> int:
  """COCO categories count from 1; digit d is category d + 1 (named "d")."""
  return int(digit) + 1


def coco_ground_truth(dataset: DetectionSet) -> COCO:
  """The data set as an in-memory COCO object: xywh boxes, areas, iscrowd 0, ids from 1.

  Image ids are the data set's indices + 1 (pycocotools treats id 0 as "no match").
  """
  height, width = dataset.images.shape[1:3]
  annotations = []
  for index in range(len(dataset)):
    for box, digit in zip(dataset.boxes[index], dataset.classes[index], strict=True):
      if digit < 0:
        continue
      x1, y1, x2, y2 = (float(v) for v in box)
      annotations.append({
          "id": len(annotations) + 1, "image_id": index + 1, "category_id": category_id(digit),
          "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
  coco = COCO()
  coco.dataset = {
      "images": [{"id": i + 1, "width": int(width), "height": int(height)}
                 for i in range(len(dataset))],
      "annotations": annotations,
      "categories": [{"id": category_id(d), "name": str(d)} for d in range(NUM_CLASSES)],
  }
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def coco_results(detections: Detections) -> list[dict]:
  """Kept detections in COCO's result format (xywh boxes, image and category ids, scores)."""
  results = []
  for index in range(len(detections.keep)):
    for (x1, y1, x2, y2), score, digit in zip(*detections.of_image(index), strict=True):
      results.append({"image_id": index + 1, "category_id": category_id(digit),
                      "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                      "score": float(score)})
  return results


def evaluate(dataset: DetectionSet, detections: Detections) -> dict[str, float]:
  """COCO AP (IoU 0.5:0.95), AP50 and AP75 at 100 detections per image, all areas.

  A detector without a single detection scores 0 (pycocotools would report -1,
  "undefined").
  """
  results = coco_results(detections)
  if not results:
    return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
  ground_truth = coco_ground_truth(dataset)
  with contextlib.redirect_stdout(io.StringIO()):
    evaluator = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  ap, ap50, ap75 = (float(np.maximum(s, 0.0)) for s in evaluator.stats[:3])
  return {"AP": ap, "AP50": ap50, "AP75": ap75}
