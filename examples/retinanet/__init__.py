"""A tiny RetinaNet in Flax NNX, trained with optax and jfocal on handwritten digits.

Modules: `data` (digit canvases with boxes), `boxes` (anchors, matching, box
coder, NMS), `model` (the `nnx.Module`s), `losses` (the vmapped per-image jfocal
loss), `detector` (architecture + anchors: targets, loss, detections), `train`
(`nnx.Optimizer` with optax), `evaluate` (pycocotools), `plots` and `demo` (`make demo`).
"""
