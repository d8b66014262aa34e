"""A small RetinaNet in Flax NNX: compact conv backbone, two-level FPN, shared subnets."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

import jfocal

# The paper's initialisation of the last layer of both subnets.
HEAD_KERNEL_INIT = nnx.initializers.normal(stddev=0.01)
# The other convolutions keep Flax's defaults, written out because the example used to be a
# linen model: linen's `nn.Conv` and `nnx.Conv` share them (LeCun normal, zero biases).
KERNEL_INIT = nnx.initializers.lecun_normal()
BIAS_INIT = nnx.initializers.zeros_init()

Initializer = Callable[..., jax.Array]


def conv(in_features: int, out_features: int, kernel_size: int, *, strides: int = 1,
         kernel_init: Initializer = KERNEL_INIT, bias_init: Initializer = BIAS_INIT,
         rngs: nnx.Rngs) -> nnx.Conv:
  """A square, 'SAME'-padded convolution with a bias."""
  return nnx.Conv(in_features, out_features, (kernel_size, kernel_size), strides=strides,
                  padding="SAME", kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)


class Backbone(nnx.Module):
  """Stride-2 stages of two 3x3 convolutions each; returns the feature map of every stage."""

  def __init__(self, widths: Sequence[int], *, in_features: int = 1, rngs: nnx.Rngs):
    stages = []
    for width in widths:
      stages.append(nnx.List([conv(in_features, width, 3, strides=2, rngs=rngs),
                              conv(width, width, 3, rngs=rngs)]))
      in_features = width
    self.stages = nnx.List(stages)

  def __call__(self, images: jax.Array) -> list[jax.Array]:
    features, x = [], images
    for downsample, refine in self.stages:
      x = nnx.relu(refine(nnx.relu(downsample(x))))
      features.append(x)
    return features


class FeaturePyramid(nnx.Module):
  """Lateral 1x1 convolutions, nearest-neighbour top-down pathway, 3x3 output convolutions."""

  def __init__(self, in_features: Sequence[int], width: int, *, rngs: nnx.Rngs):
    self.laterals = nnx.List([conv(f, width, 1, rngs=rngs) for f in in_features])
    self.outputs = nnx.List([conv(width, width, 3, rngs=rngs) for _ in in_features])

  def __call__(self, features: list[jax.Array]) -> list[jax.Array]:
    laterals = [lateral(f) for lateral, f in zip(self.laterals, features, strict=True)]
    merged = [laterals[-1]]
    for lateral in reversed(laterals[:-1]):
      coarser = merged[0]
      upsampled = jnp.repeat(jnp.repeat(coarser, 2, axis=1), 2, axis=2)
      merged.insert(0, lateral + upsampled[:, :lateral.shape[1], :lateral.shape[2]])
    return [output(m) for output, m in zip(self.outputs, merged, strict=True)]


class Subnet(nnx.Module):
  """The classification or box subnet; one instance is applied to every pyramid level."""

  def __init__(self, width: int, depth: int, outputs: int, *, bias_init: Initializer = BIAS_INIT,
               rngs: nnx.Rngs):
    self.hidden = nnx.List([conv(width, width, 3, rngs=rngs) for _ in range(depth)])
    self.head = conv(width, outputs, 3, kernel_init=HEAD_KERNEL_INIT, bias_init=bias_init,
                     rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.hidden:
      x = nnx.relu(layer(x))
    return self.head(x)


@dataclasses.dataclass(frozen=True)
class RetinaNetConfig:
  """The architecture of a `RetinaNet`, hashable so that a `Detector` can be a static argument.

  ``backbone_widths`` has one entry per stride-2 stage; the last
  ``pyramid_levels`` stages feed the FPN (with the defaults, strides 4 and 8,
  matching `boxes.AnchorConfig`).
  """

  num_classes: int = 10
  anchors_per_position: int = 9
  backbone_widths: tuple[int, ...] = (32, 64, 96)
  pyramid_levels: int = 2
  width: int = 64
  head_depth: int = 2
  prior: float = 0.01
  in_features: int = 1  # channels of the images: the canvases are grey


class RetinaNet(nnx.Module):
  """RetinaNet (Lin et al. 2017) sized for 64x64 canvases.

  The classification subnet's last bias starts at
  ``jfocal.prior_bias_init(config.prior)``: every anchor begins with foreground
  probability ``prior`` so that the background flood does not dominate the
  first steps.
  """

  def __init__(self, config: RetinaNetConfig = RetinaNetConfig(), *, rngs: nnx.Rngs):
    self.config = config
    self.backbone = Backbone(config.backbone_widths, in_features=config.in_features, rngs=rngs)
    self.feature_pyramid = FeaturePyramid(config.backbone_widths[-config.pyramid_levels:],
                                          config.width, rngs=rngs)
    self.classification_subnet = Subnet(
        config.width, config.head_depth, config.anchors_per_position * config.num_classes,
        bias_init=jfocal.prior_bias_init(config.prior), rngs=rngs)
    self.box_subnet = Subnet(config.width, config.head_depth, config.anchors_per_position * 4,
                             rngs=rngs)

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images ``(B, H, W, 1)`` to class logits ``(B, A, C)`` and box deltas ``(B, A, 4)``.

    Anchors are flattened level by level, then row, column and anchor shape,
    the order of `boxes.generate_anchors`.
    """
    features = self.backbone(images)[-self.config.pyramid_levels:]
    pyramid = self.feature_pyramid(features)
    batch, num_classes = images.shape[0], self.config.num_classes
    logits = jnp.concatenate([self.classification_subnet(level).reshape(batch, -1, num_classes)
                              for level in pyramid], axis=1)
    deltas = jnp.concatenate([self.box_subnet(level).reshape(batch, -1, 4) for level in pyramid],
                             axis=1)
    return logits, deltas
