"""Trains the tiny RetinaNet with CE, α-balanced CE and focal loss on the same budget; COCO AP.

    python -m examples.retinanet --steps 500 --seed 0 --out examples/retinanet/results

Every run starts from the same initialisation and sees the same batches; only
the classification loss differs. Prints a Markdown table and writes it with
the training curves and validation detections to the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import jax
import numpy as np

from examples.retinanet import data as data_lib
from examples.retinanet import plots
from examples.retinanet.boxes import IGNORE_CLASS
from examples.retinanet.detector import Detector
from examples.retinanet.evaluate import evaluate
from examples.retinanet.losses import LOSS_KEYS, classification_losses
from examples.retinanet.train import TrainConfig, train

DEFAULT_OUT = pathlib.Path(__file__).parent / "results"
# The moving average over which "final loss" is reported.
FINAL_WINDOW = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=TrainConfig.steps,
                      help="training steps per loss")
  parser.add_argument("--seed", type=int, default=0, help="data split, canvases, init, batches")
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="output folder")
  parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
  parser.add_argument("--train-images", type=int, default=4000)
  parser.add_argument("--val-images", type=int, default=500)
  parser.add_argument("--balanced-alpha", type=float, default=0.25,
                      help="α of balanced CE (the paper's best without focusing is 0.75)")
  parser.add_argument("--losses", default="ce,balanced,focal",
                      help="comma-separated subset of ce, balanced, focal")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)
  unknown = set(args.losses.split(",")) - set(LOSS_KEYS)
  if unknown:
    parser.error(f"--losses: unknown {sorted(unknown)}; choose from {', '.join(LOSS_KEYS)}")
  return args


def imbalance_summary(detector: Detector, dataset: data_lib.DetectionSet) -> str:
  """How many anchors and (anchor, class) logits are positive, on up to 500 images."""
  class_targets, _ = detector.targets(dataset.boxes[:500], dataset.classes[:500])
  class_targets = np.asarray(class_targets)
  positive = np.mean((class_targets >= 0) & (class_targets < detector.num_classes))
  ignored = np.mean(class_targets == IGNORE_CLASS)
  digits = np.mean(dataset.classes >= 0) * dataset.classes.shape[1]
  return (f"{len(dataset)} canvases of {detector.image_size}x{detector.image_size}, "
          f"{digits:.1f} digits per image; {len(detector.anchors)} anchors x "
          f"{detector.num_classes} classes per image; {positive:.2%} of anchors positive, "
          f"{ignored:.2%} ignored: 1 positive logit in {detector.num_classes / positive:.0f}")


def markdown_table(rows: list[dict]) -> str:
  """The results table; wall time covers training (with compilation) and evaluation."""
  lines = ["| loss | AP | AP50 | AP75 | final loss | wall time (s) |", "|---|---|---|---|---|---|"]
  lines += [f"| {r['loss']} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['AP75']:.3f} | "
            f"{r['final_loss']:.4f} | {r['seconds']:.0f} |" for r in rows]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
  args = parse_args(argv)
  start = time.perf_counter()
  train_set, val_set = data_lib.train_validation_sets(args.train_images, args.val_images,
                                                      seed=args.seed)
  detector = Detector()
  print(f"training: {imbalance_summary(detector, train_set)}\n"
        f"validation: {len(val_set)} canvases of unseen handwriting")
  config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
  rows, histories, detections = [], {}, {}
  losses = classification_losses(balanced_alpha=args.balanced_alpha)
  for name, loss in (losses[key] for key in args.losses.split(",")):
    run_start = time.perf_counter()
    result = train(detector, loss, train_set, config, description=name,
                   progress=not args.no_progress)
    found = detector.detect(result.model, val_set.images)
    metrics = evaluate(val_set, found)
    histories[name], detections[name] = result.history, found
    rows.append({"loss": name, **metrics, "seconds": time.perf_counter() - run_start,
                 "final_loss": float(np.mean(result.history["loss"][-FINAL_WINDOW:]))})

  args.out.mkdir(parents=True, exist_ok=True)
  table = markdown_table(rows)
  machine = (f"{jax.devices()[0].platform} ({jax.device_count()} device(s)), "
             f"{platform.machine()} host with {os.cpu_count()} cores, jax {jax.__version__}")
  summary = (f"{args.steps} steps of batch {args.batch_size}, seed {args.seed}, {machine}; "
             f"total wall time {time.perf_counter() - start:.0f} s")
  print(f"\n{table}\n\n{summary}")
  (args.out / "results.md").write_text(f"{table}\n\n{summary}\n")
  (args.out / "results.json").write_text(json.dumps(
      {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
       "machine": machine, "rows": rows}, indent=1) + "\n")
  plots.training_curves(histories).savefig(args.out / "training_curves.png", dpi=110)
  plots.detections_grid(val_set, detections).savefig(args.out / "detections.png", dpi=110)
  print(f"wrote {args.out}/training_curves.png, detections.png, results.md, results.json")
  return rows


if __name__ == "__main__":
  main()
