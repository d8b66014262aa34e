"""The detector as one object: the architecture, its anchors, targets, loss and post-processing."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from examples.retinanet import boxes as box_ops
from examples.retinanet.losses import ClassificationLoss, detection_loss
from examples.retinanet.model import RetinaNet, RetinaNetConfig


@dataclasses.dataclass(frozen=True)
class Detections:
  """Fixed-size detections per image; ``keep`` marks the real ones (after threshold and NMS)."""

  boxes: np.ndarray  # (N, K, 4) x1 y1 x2 y2
  scores: np.ndarray  # (N, K)
  classes: np.ndarray  # (N, K) int
  keep: np.ndarray  # (N, K) bool

  def of_image(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes, scores and classes of the kept detections of image ``index``, best first."""
    kept = self.keep[index]
    return self.boxes[index][kept], self.scores[index][kept], self.classes[index][kept]


@dataclasses.dataclass(frozen=True)
class PostprocessConfig:
  """The paper's inference settings (section 5), with fewer candidates for small images."""

  candidates: int = 300
  score_threshold: float = 0.05
  nms_iou: float = 0.5
  max_detections: int = 100


@dataclasses.dataclass(frozen=True)
class Detector:
  """The architecture of a `RetinaNet` together with the anchors its outputs refer to.

  The detector holds no weights: `init` builds a `RetinaNet` (an `nnx.Module`,
  which owns its parameters), and the other methods take that model. So a
  detector stays a hashable value, a static argument of the jitted functions.
  The model's pyramid levels must have the anchors' strides: a backbone of
  ``n`` stride-2 stages whose last ``k`` feed the FPN has strides
  ``2**(n-k+1) .. 2**n``.
  """

  model_config: RetinaNetConfig = RetinaNetConfig()
  anchor_config: box_ops.AnchorConfig = box_ops.AnchorConfig()
  image_size: int = 64
  box_coder: box_ops.BoxCoder = box_ops.BoxCoder()

  def __post_init__(self) -> None:
    stages = len(self.model_config.backbone_widths)
    strides = tuple(2**s for s in range(stages - self.model_config.pyramid_levels + 1, stages + 1))
    if strides != self.anchor_config.strides:
      raise ValueError(f"the model's pyramid has strides {strides}, the anchors "
                       f"{self.anchor_config.strides}")
    if self.model_config.anchors_per_position != self.anchor_config.anchors_per_position:
      raise ValueError("model_config.anchors_per_position must equal the anchor shapes per "
                       "position")

  @functools.cached_property
  def anchors(self) -> np.ndarray:
    """``(A, 4)``; a NumPy array, so that every trace embeds it as a constant."""
    return box_ops.generate_anchors(self.image_size, self.anchor_config)

  @property
  def num_classes(self) -> int:
    return self.model_config.num_classes

  def init(self, seed: int) -> RetinaNet:
    """A new `RetinaNet` with the seed's initial parameters."""
    def build(key: jax.Array) -> nnx.State:
      return nnx.state(RetinaNet(self.model_config, rngs=nnx.Rngs(params=key)))

    # The structure comes from an abstract model (shapes only, nothing computed), the
    # parameters from one program compiled without LLVM's optimisations: it runs once, and
    # on 2 CPU cores it takes 1.4 s here against 3.9 s with XLA's default optimisations or
    # for an eager construction, which compiles the initialisers one by one.
    graphdef = nnx.graphdef(nnx.eval_shape(
        lambda: RetinaNet(self.model_config, rngs=nnx.Rngs(params=0))))
    key = jax.random.key(seed)
    state = jax.jit(build).lower(key).compile({"xla_backend_optimization_level": 0})(key)
    return nnx.merge(graphdef, state)

  def targets(self, gt_boxes: jax.Array, gt_classes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`boxes.assign_targets` vmapped over a batch: ``(B, A)`` classes, ``(B, A, 4)`` boxes."""
    assign = functools.partial(box_ops.assign_targets, num_classes=self.num_classes,
                               box_coder=self.box_coder)
    return jax.vmap(assign, in_axes=(None, 0, 0))(self.anchors, gt_boxes, gt_classes)

  def loss(self, model: RetinaNet, images: jax.Array, gt_boxes: jax.Array,
           gt_classes: jax.Array, classification_loss: ClassificationLoss
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`losses.detection_loss` of ``model`` on a batch of images and padded ground truth."""
    class_targets, box_targets = self.targets(gt_boxes, gt_classes)
    class_logits, box_deltas = model(images)
    return detection_loss(class_logits, box_deltas, class_targets, box_targets,
                          classification_loss)

  @functools.partial(jax.jit, static_argnames=("self", "config"))
  def postprocess(self, class_logits: jax.Array, box_deltas: jax.Array,
                  config: PostprocessConfig = PostprocessConfig()) -> tuple[jax.Array, ...]:
    """Raw outputs ``(B, A, C)``, ``(B, A, 4)`` to fixed-size detections, vmapped over images.

    Per image: the ``config.candidates`` top-scoring (anchor, class) pairs,
    decoded and clipped to the image, those above the score threshold, class-wise
    NMS, at most ``config.max_detections``. Returns boxes ``(B, K, 4)``, scores,
    classes and the keep mask ``(B, K)``.
    """
    return jax.vmap(functools.partial(self._postprocess_image, config=config))(
        class_logits, box_deltas)

  def _postprocess_image(self, class_logits: jax.Array, box_deltas: jax.Array,
                         config: PostprocessConfig) -> tuple[jax.Array, ...]:
    scores, pairs = jax.lax.top_k(jax.nn.sigmoid(class_logits).reshape(-1), config.candidates)
    anchor_index, classes = pairs // self.num_classes, pairs % self.num_classes
    anchors = jnp.asarray(self.anchors)[anchor_index]
    decoded = self.box_coder.decode(box_deltas[anchor_index], anchors)
    decoded = jnp.clip(decoded, 0, self.image_size)
    valid = (scores > config.score_threshold) & (box_ops.box_area(decoded) > 0)
    keep = box_ops.class_wise_nms(decoded, classes, valid, config.nms_iou)
    keep = keep & (jnp.cumsum(keep) <= config.max_detections)
    return decoded, scores, classes, keep

  @functools.partial(nnx.jit, static_argnames=("self", "config"))
  def _detect_batch(self, model: RetinaNet, images: jax.Array, config: PostprocessConfig
                    ) -> tuple[jax.Array, ...]:
    return self.postprocess(*model(images), config)

  def detect(self, model: RetinaNet, images: np.ndarray, *, batch_size: int = 100,
             config: PostprocessConfig = PostprocessConfig()) -> Detections:
    """Detections of ``model`` for ``(N, H, W, 1)`` images, computed in batches."""
    chunks = [self._detect_batch(model, jnp.asarray(images[i:i + batch_size]), config)
              for i in range(0, len(images), batch_size)]
    return Detections(*(np.concatenate([np.asarray(c[k]) for c in chunks]) for k in range(4)))
