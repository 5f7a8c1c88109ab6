"""Parameter paths: a leaf's place in a nested dict, its keys joined by '/' (e.g. `conv_0/kernel`); tree helpers."""

from typing import Any

import jax
import numpy as np
from flax import traverse_util

PyTree = Any


def path_str(key_path: tuple) -> str:
  """'/'-joined names of a jax key path (dict keys, attribute names and sequence indices)."""
  return jax.tree_util.keystr(key_path, simple=True, separator='/')


def flatten(tree: PyTree) -> dict[str, Any]:
  """{path: leaf} in the tree's order.

  Not `flax.traverse_util.flatten_dict`, which sees only dicts and keeps None leaves: optimizer states
  (NamedTuples, tuples; `optim.carry_over`) are flattened here too, and the None holes of masks must drop out
  (`pruning.sparsity_report`; tests/test_rules.py and tests/test_pruning.py fail with it).
  """
  return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shape_mismatches(expected: PyTree, found: PyTree) -> list[str]:
  """Human-readable lines for every path that is missing, unexpected, or of another shape."""
  want = {k: tuple(v.shape) for k, v in flatten(expected).items()}
  have = {k: tuple(v.shape) for k, v in flatten(found).items()}
  lines = [f'  missing   {k} {want[k]}' for k in want if k not in have]
  lines += [f'  unexpected {k} {have[k]}' for k in have if k not in want]
  lines += [f'  shape     {k}: expected {want[k]}, found {have[k]}'
            for k in want if k in have and want[k] != have[k]]
  return lines


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
  return traverse_util.unflatten_dict(flat, sep='/')


def tree_bytes(tree: PyTree) -> int:
  """The bytes of every leaf of `tree` (arrays or shape-dtype structs)."""
  return int(sum(np.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)))
