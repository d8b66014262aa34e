# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A tiny RetinaNet on handwritten digits
#
# `examples/retinanet` is a small but complete dense detector in Flax NNX: a compact conv
# backbone, a two-level FPN (strides 4 and 8), shared classification and box subnets whose
# classification bias starts at `jfocal.prior_bias_init(0.01)`, 9 anchors per position, IoU
# matching (foreground ≥ 0.5, background < 0.4, ignored in between), the (dx, dy, dw, dh) box
# coder, a jfocal loss vmapped over the images and normalised by the positive anchors,
# class-wise NMS and COCO evaluation with pycocotools. `make demo` trains it three times;
# here we train it briefly with cross-entropy and with focal loss and look at what it finds.
#
# The network is an `nnx.Module` that owns its parameters: `detector.init(seed)` builds one,
# `model(images)` returns the class logits and box deltas, and training updates it in place
# (`nnx.Optimizer` with optax, an `nnx.jit` step); `detector.detect(model, images)` runs it
# and the post-processing.
#
# Set `JFOCAL_NOTEBOOK_BUDGET=small` for the test suite's quick run (the numbers are then
# those of a barely trained detector).

# %%
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

# The example lives in the repository, not in the installed package.
ROOT = next(p for p in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents)
            if (p / "examples" / "retinanet").is_dir())
sys.path.insert(0, str(ROOT))

from examples.retinanet import data, demo, plots  # noqa: E402
from examples.retinanet.detector import Detector  # noqa: E402
from examples.retinanet.evaluate import evaluate  # noqa: E402
from examples.retinanet.losses import classification_losses  # noqa: E402
from examples.retinanet.train import TrainConfig, train  # noqa: E402

SMALL = os.environ.get("JFOCAL_NOTEBOOK_BUDGET") == "small"
STEPS = 25 if SMALL else 300
train_set, val_set = data.train_validation_sets(300 if SMALL else 4000, 50 if SMALL else 300,
                                                seed=0)
detector = Detector()
print(demo.imbalance_summary(detector, train_set))

# %% [markdown]
# ## The data and the anchors that learn from it
#
# Real 8×8 digits from scikit-learn, cropped to their ink, scaled to 12–30 pixels and pasted
# onto 64×64 canvases. Dashed: the ground truth. Coloured: the anchors matched to it (IoU ≥ 0.5,
# or the best anchor of an object). Every other anchor of the 2880 is background or ignored:
# about 1.5% of the anchors, and 0.15% of the (anchor, class) logits, are positive.

# %%
class_targets, _ = detector.targets(train_set.boxes[:4], train_set.classes[:4])
fig, axes = plt.subplots(1, 4, figsize=(12, 3.2))
for ax, image, boxes, classes, targets in zip(axes, train_set.images, train_set.boxes,
                                              train_set.classes, np.asarray(class_targets)):
  ax.imshow(image[..., 0], cmap="gray")
  for anchor, target in zip(detector.anchors, targets):
    if 0 <= target < detector.num_classes:
      ax.add_patch(Rectangle(anchor[:2], *(anchor[2:] - anchor[:2]), fill=False, lw=0.6,
                             ec=plt.cm.tab10(target)))
  for box in boxes[classes >= 0]:
    ax.add_patch(Rectangle(box[:2], *(box[2:] - box[:2]), fill=False, ec="white", ls="--"))
  positives = int(np.sum((targets >= 0) & (targets < detector.num_classes)))
  ax.set(xticks=[], yticks=[], title=f"{positives} positive anchors")
plt.show()

# %% [markdown]
# ## Train with cross-entropy and with focal loss
#
# Same initialisation, same batches, same optimiser (an `nnx.Optimizer` of
# `optax.chain(clip_by_global_norm, adamw)` with warm-up and cosine decay); only the
# classification loss differs. `train` returns the trained model and the loss history.

# %%
losses = classification_losses()
config = TrainConfig(steps=STEPS, batch_size=8 if SMALL else 16)
results, detections, rows = {}, {}, []
for key in ("ce", "focal"):
  name, loss = losses[key]
  results[name] = train(detector, loss, train_set, config, progress=False)
  detections[name] = detector.detect(results[name].model, val_set.images)
  metrics = evaluate(val_set, detections[name])
  rows.append({"loss": name, **metrics, "seconds": results[name].seconds,
               "final_loss": float(np.mean(results[name].history["loss"][-20:]))})
print(demo.markdown_table(rows))

# %%
plots.training_curves({name: r.history for name, r in results.items()})

# %%
plots.detections_grid(val_set, detections, images=5)

# %% [markdown]
# ## Where each loss puts its weight
#
# On a batch of validation images, split each network's own classification loss into its
# parts: positive logits, *easy* negatives (background logits scored below 0.1) and hard
# negatives, at the initialisation (every logit at the prior, p = 0.01) and after training.
# Cross-entropy starts with most of its loss, and so of its gradient, on the thousands of easy
# negatives that the detector already gets right, and keeps a larger share on them after
# training; focal loss spends nothing on them at the start and little later.

# %%
batch = val_set.take(slice(0, 32))
targets, _ = detector.targets(batch.boxes, batch.classes)
positive_logit = jax.nn.one_hot(targets, detector.num_classes) > 0
considered = (targets >= 0)[..., None]  # ignored anchors have no loss
for key in ("ce", "focal"):
  name, loss = losses[key]
  for when, model in (("at init", detector.init(config.seed)),
                      ("trained", results[name].model)):
    logits, _ = model(jnp.asarray(batch.images))
    per_logit = loss.func(logits, targets, **{**loss.keywords, "reduction": "none"})
    easy = ~positive_logit & considered & (jax.nn.sigmoid(logits) < 0.1)
    hard = ~positive_logit & considered & ~easy
    total = jnp.sum(per_logit)
    print(f"{name:<20} {when}: share of the loss from positives "
          f"{float(jnp.sum(per_logit * positive_logit) / total):6.1%}, easy negatives "
          f"{float(jnp.sum(per_logit * easy) / total):6.1%}, hard negatives "
          f"{float(jnp.sum(per_logit * hard) / total):6.1%}   "
          f"(easy negatives: {float(jnp.mean(easy)):.1%} of the logits)")
