"""Convolutional image classifiers: a small CNN and a ResNet-style CNN with BatchNorm.

`dtype` ('float32' or 'bfloat16') is the compute dtype of the convolutions and hidden layers; parameters stay
float32, BatchNorm statistics are float32 reductions and the head computes the logits in float32.
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jft.models.dropout import Dropout
from jft.models.precision import compute_dtype


class SmallCNN(nn.Module):
  """Two conv + pool stages and a hidden dense layer; `image` is [batch, height, width, channels]."""

  num_classes: int
  features: Sequence[int] = (32, 64)
  hidden: int = 128
  dropout: float = 0.0
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> jax.Array:
    dtype = compute_dtype(self.dtype)
    x = image.astype(dtype)
    for i, width in enumerate(self.features):
      x = nn.Conv(width, (3, 3), dtype=dtype, name=f'conv_{i}')(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, dtype=dtype, name='hidden')(x))
    x = Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name='head')(x.astype(jnp.float32))


class ResidualBlock(nn.Module):
  """Two 3x3 convs with BatchNorm and an identity (or 1x1 projection) shortcut."""

  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, dtype=self.dtype)
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    y = conv(self.features, (3, 3), strides=self.strides, name='conv_0')(x)
    y = nn.relu(norm(name='norm_0')(y))
    y = conv(self.features, (3, 3), name='conv_1')(y)
    # Zero-initialised last scale: each block starts as the identity, which trains faster.
    y = norm(scale_init=nn.initializers.zeros, name='norm_1')(y)
    if x.shape != y.shape:
      x = conv(self.features, (1, 1), strides=self.strides, name='proj')(x)
      x = norm(name='proj_norm')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A stem conv and stages of residual blocks (the first block of each later stage halves the size); `remat`
  recomputes each block's activations in the backward pass (`nn.remat`, the parameter paths unchanged)."""

  num_classes: int
  stage_features: Sequence[int] = (32, 64, 128)
  blocks_per_stage: int = 2
  dtype: str = 'float32'
  remat: bool = False

  @nn.compact
  def __call__(self, image: jax.Array, train: bool = False) -> jax.Array:
    dtype = compute_dtype(self.dtype)
    x = nn.Conv(self.stage_features[0], (3, 3), use_bias=False, dtype=dtype, name='stem')(image.astype(dtype))
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=dtype, name='stem_norm')(x))
    residual_block = nn.remat(ResidualBlock, static_argnums=(2,)) if self.remat else ResidualBlock  # 2: `train`
    for stage, features in enumerate(self.stage_features):
      for block in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = residual_block(features, strides, dtype, name=f'stage_{stage}_block_{block}')(x, train)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, name='head')(x)
