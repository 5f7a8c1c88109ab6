"""Convolutional image classifiers: a small CNN and a ResNet-style CNN with BatchNorm."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class SmallCNN(nn.Module):
  """Two conv + pool stages and a hidden dense layer; `image` is [batch, height, width, channels]."""

  num_classes: int
  features: Sequence[int] = (32, 64)
  hidden: int = 128
  dropout: float = 0.0

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> jax.Array:
    x = image
    for i, width in enumerate(self.features):
      x = nn.Conv(width, (3, 3), name=f'conv_{i}')(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, name='hidden')(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name='head')(x)


class ResidualBlock(nn.Module):
  """Two 3x3 convs with BatchNorm and an identity (or 1x1 projection) shortcut."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
    y = nn.Conv(self.features, (3, 3), strides=self.strides, use_bias=False, name='conv_0')(x)
    y = nn.relu(norm('norm_0')(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False, name='conv_1')(y)
    # Zero-initialised last scale: each block starts as the identity, which trains faster.
    y = nn.BatchNorm(use_running_average=not train, momentum=0.9, scale_init=nn.initializers.zeros,
                     name='norm_1')(y)
    if x.shape != y.shape:
      x = nn.Conv(self.features, (1, 1), strides=self.strides, use_bias=False, name='proj')(x)
      x = norm('proj_norm')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A stem conv and stages of residual blocks (the first block of each later stage halves the size)."""

  num_classes: int
  stage_features: Sequence[int] = (32, 64, 128)
  blocks_per_stage: int = 2

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Conv(self.stage_features[0], (3, 3), use_bias=False, name='stem')(image)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name='stem_norm')(x))
    for stage, features in enumerate(self.stage_features):
      for block in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = ResidualBlock(features, strides, name=f'stage_{stage}_block_{block}')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='head')(x)
