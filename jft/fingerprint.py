"""Fingerprints of a train state's arrays, saved with each checkpoint, so a restore notices corrupted files.

orbax and tensorstore store array bytes without checksums: a flipped or overwritten byte in an array file reads
back as wrong numbers, silently. Each checkpoint therefore carries, per array, a 32-bit fingerprint computed on
the device (one jitted pass, no copy to the host): the sum over elements of the element's bits times an odd
weight that depends on its position, modulo 2^32. Any change to one element changes it (an odd weight is
invertible modulo 2^32); a change to several elements goes unnoticed with probability about 2^-32.
"""

import functools
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jft import executable_cache, tree_paths

_GOLDEN = np.uint32(0x9E3779B1)  # odd: position i gets the odd weight 2 * (i * _GOLDEN) + 1


def _bits(x: jax.Array) -> jax.Array:
  """The elements' bits as uint32 (floats and ints of 32 bits bit for bit; narrower types widened)."""
  x = jnp.asarray(x).reshape(-1)
  if x.dtype == jnp.bool_ or x.dtype.itemsize not in (2, 4):
    return x.astype(jnp.uint32)
  unsigned = jnp.uint32 if x.dtype.itemsize == 4 else jnp.uint16
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  bits = _bits(x)
  weights = jnp.arange(bits.size, dtype=jnp.uint32) * _GOLDEN * np.uint32(2) + np.uint32(1)
  return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def _fingerprints(tree: Any) -> Any:
  return jax.tree.map(_leaf_fingerprint, tree)


@functools.cache
def _program(cache_directory: pathlib.Path | None) -> Callable[[Any], Any]:
  """`_fingerprints`, its programs kept in jft/executable_cache.py where that is on: a repeated run's first
  checkpoint and a resumed run's check load it rather than trace and lower a sum for each of the state's arrays
  (about 600 for the MiniLM train state)."""
  del cache_directory  # the key of the memo: `cached` reads the directory itself
  return executable_cache.cached(_fingerprints, 'fingerprints')


def of(tree: Any) -> dict[str, int]:
  """{array path: fingerprint} of every array in `tree` (device arrays, sharded or not, or numpy)."""
  # Each process holds the whole (replicated) scalar: read its own copy, also in a multi-host run.
  fingerprints = tree_paths.flatten(_program(executable_cache.directory())(tree))
  return {path: int(np.asarray(value.addressable_data(0))) for path, value in fingerprints.items()}


def mismatches(saved: dict[str, int], tree: Any) -> list[str]:
  """The paths whose array in `tree` does not match the fingerprint `saved` for it."""
  now = of(tree)
  return [path for path, value in saved.items() if now.get(path) != value]
