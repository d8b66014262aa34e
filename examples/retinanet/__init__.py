"""A tiny RetinaNet in Flax, trained with optax and jfocal on handwritten digits.

Modules: `data` (digit canvases with boxes), `boxes` (anchors, matching, box
coder, NMS), `model` (the Flax network), `losses` (the vmapped per-image jfocal
loss), `detector` (model + anchors: targets, loss, detections), `train`
(optax), `evaluate` (pycocotools), `plots` and `demo` (`make demo`).
"""
