"""A small RetinaNet in Flax: compact conv backbone, two-level FPN, shared subnets."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import jfocal

# The paper's initialisation of the last layer of both subnets.
HEAD_KERNEL_INIT = nn.initializers.normal(stddev=0.01)


class Backbone(nn.Module):
  """Stride-2 stages of two 3x3 convolutions each; returns the feature map of every stage."""

  widths: tuple[int, ...]

  @nn.compact
  def __call__(self, images: jax.Array) -> list[jax.Array]:
    features, x = [], images
    for width in self.widths:
      x = nn.relu(nn.Conv(width, (3, 3), strides=2)(x))
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      features.append(x)
    return features


class FeaturePyramid(nn.Module):
  """Lateral 1x1 convolutions, nearest-neighbour top-down pathway, 3x3 output convolutions."""

  width: int

  @nn.compact
  def __call__(self, features: list[jax.Array]) -> list[jax.Array]:
    laterals = [nn.Conv(self.width, (1, 1))(f) for f in features]
    merged = [laterals[-1]]
    for lateral in reversed(laterals[:-1]):
      coarser = merged[0]
      upsampled = jnp.repeat(jnp.repeat(coarser, 2, axis=1), 2, axis=2)
      merged.insert(0, lateral + upsampled[:, :lateral.shape[1], :lateral.shape[2]])
    return [nn.Conv(self.width, (3, 3))(m) for m in merged]


class Subnet(nn.Module):
  """The classification or box subnet; one instance is applied to every pyramid level."""

  width: int
  depth: int
  outputs: int
  bias_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for _ in range(self.depth):
      x = nn.relu(nn.Conv(self.width, (3, 3))(x))
    return nn.Conv(self.outputs, (3, 3), kernel_init=HEAD_KERNEL_INIT, bias_init=self.bias_init)(x)


class RetinaNet(nn.Module):
  """RetinaNet (Lin et al. 2017) sized for 64x64 canvases.

  ``backbone_widths`` has one entry per stride-2 stage; the last
  ``pyramid_levels`` stages feed the FPN (with the defaults, strides 4 and 8,
  matching `boxes.AnchorConfig`). The classification subnet's last bias starts
  at ``jfocal.prior_bias_init(prior)``: every anchor begins with foreground
  probability ``prior`` so that the background flood does not dominate the
  first steps.
  """

  num_classes: int = 10
  anchors_per_position: int = 9
  backbone_widths: tuple[int, ...] = (32, 64, 96)
  pyramid_levels: int = 2
  width: int = 64
  head_depth: int = 2
  prior: float = 0.01

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images ``(B, H, W, 1)`` to class logits ``(B, A, C)`` and box deltas ``(B, A, 4)``.

    Anchors are flattened level by level, then row, column and anchor shape,
    the order of `boxes.generate_anchors`.
    """
    features = Backbone(self.backbone_widths)(images)[-self.pyramid_levels:]
    pyramid = FeaturePyramid(self.width)(features)
    classify = Subnet(self.width, self.head_depth, self.anchors_per_position * self.num_classes,
                      bias_init=jfocal.prior_bias_init(self.prior), name="classification_subnet")
    regress = Subnet(self.width, self.head_depth, self.anchors_per_position * 4, name="box_subnet")
    batch = images.shape[0]
    logits = jnp.concatenate(
        [classify(level).reshape(batch, -1, self.num_classes) for level in pyramid], axis=1)
    deltas = jnp.concatenate([regress(level).reshape(batch, -1, 4) for level in pyramid], axis=1)
    return logits, deltas
