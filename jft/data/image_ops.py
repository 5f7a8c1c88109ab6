"""Batched numpy image preprocessing and augmentation, on float images [B, H, W, C].

A random op may be given only rows `rows` of a batch of `batch_size` (a host's part of a global batch): it draws
its random numbers for the whole batch and applies those of its rows, so that an example is augmented the same
however many hosts share its batch.
"""

import functools
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from jft.errors import UserError


class Augment(Protocol):
  """Augments `images`, rows `rows` of a batch of `batch_size` (None: the images are the whole batch)."""

  def __call__(self, images: np.ndarray, rng: np.random.Generator, rows: slice = ...,
               batch_size: int | None = ...) -> np.ndarray: ...


@functools.cache
def _bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
  """The [out, in] matrix of jax.image.resize's 'bilinear' (triangle kernel, antialiased)."""
  scale = out_size / in_size
  kernel_scale = max(1 / scale, 1.0)  # Widen the kernel when downsampling, as jax does (antialias).
  sample = (np.arange(out_size) + 0.5) / scale - 0.5  # Input coordinate of each output pixel centre.
  weights = np.maximum(0.0, 1 - np.abs(sample[:, None] - np.arange(in_size)[None, :]) / kernel_scale)
  # Renormalising drops the weight that falls outside the image: edges are extended, not darkened.
  return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_bilinear(images_BxHxWxC: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Resizes float images to `size` (height, width) as `jax.image.resize(..., method='bilinear')` does."""
  rows = _bilinear_weights(images_BxHxWxC.shape[1], size[0])
  cols = _bilinear_weights(images_BxHxWxC.shape[2], size[1])
  return np.einsum('oh,bhwc,pw->bopc', rows, images_BxHxWxC, cols, optimize=True)


def translate(images_BxHxWxC: np.ndarray, dy_B: np.ndarray, dx_B: np.ndarray) -> np.ndarray:
  """Moves image b down by dy_B[b] and right by dx_B[b] pixels (negative: up, left), filling with zeros."""
  _, height, width, _ = images_BxHxWxC.shape
  pad = int(max(np.abs(dy_B).max(initial=0), np.abs(dx_B).max(initial=0)))
  padded = np.pad(images_BxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows_BxH = pad - dy_B[:, None] + np.arange(height)
  cols_BxW = pad - dx_B[:, None] + np.arange(width)
  batch_B = np.arange(len(images_BxHxWxC))
  return padded[batch_B[:, None, None], rows_BxH[:, :, None], cols_BxW[:, None, :]]


def _draw_size(images: np.ndarray, batch_size: int | None) -> int:
  return len(images) if batch_size is None else batch_size


def random_crop(images: np.ndarray, rng: np.random.Generator, padding: int, rows: slice = slice(None),
                batch_size: int | None = None) -> np.ndarray:
  """Crops each image at a random place out of the image zero-padded by `padding` on every side."""
  # A crop of the padded image at offset o is the image moved by padding - o.
  dy, dx = rng.integers(-padding, padding, size=(2, _draw_size(images, batch_size)), endpoint=True)[:, rows]
  return translate(images, dy, dx)


def random_shift(images: np.ndarray, rng: np.random.Generator, max_shift: int, rows: slice = slice(None),
                 batch_size: int | None = None) -> np.ndarray:
  """Moves each image by a random whole number of pixels, at most `max_shift` in each direction."""
  dy, dx = rng.integers(-max_shift, max_shift, size=(2, _draw_size(images, batch_size)), endpoint=True)[:, rows]
  return translate(images, dy, dx)


def random_flip(images: np.ndarray, rng: np.random.Generator, rows: slice = slice(None),
                batch_size: int | None = None) -> np.ndarray:
  """Mirrors each image left to right with probability 1/2."""
  flip_B = (rng.random(_draw_size(images, batch_size)) < 0.5)[rows]
  return np.where(flip_B[:, None, None, None], images[:, :, ::-1], images)


def make_augment(names: Sequence[str], crop_padding: int, max_shift: int) -> Augment | None:
  """The augmentation that applies the named ops in order, or None when there are none."""
  if crop_padding < 0 or max_shift < 0:
    raise UserError(f'data.crop_padding ({crop_padding}) and data.max_shift ({max_shift}) must not '
                    'be negative: set them to 0 or more.')
  if isinstance(names, str):
    raise UserError(f'data.augment is the string {names!r}: make it a tuple of names, such as ({names!r},).')
  ops = {
      'crop': functools.partial(random_crop, padding=crop_padding),
      'flip': random_flip,
      'shift': functools.partial(random_shift, max_shift=max_shift),
  }
  unknown = [name for name in names if name not in ops]
  if unknown:
    raise UserError(f'Unknown augmentation {", ".join(map(repr, unknown))} in data.augment: '
                    f'use a tuple of {", ".join(map(repr, ops))} (or () for none).')
  if not names:
    return None

  def augment(images: np.ndarray, rng: np.random.Generator, rows: slice = slice(None),
              batch_size: int | None = None) -> np.ndarray:
    for name in names:
      images = ops[name](images, rng, rows=rows, batch_size=batch_size)
    return images

  return augment
