"""Initial parameters from elsewhere (`config.init`), merged into a freshly initialised parameter tree.

A source is a registered pretrained model ('minilm'), a directory in Hugging Face layout, or an earlier
jft run: its work directory (the latest checkpoint), its `checkpoints/` root, or one `checkpoints/STEP`.
Every parameter is taken from the source except those matching an `init_skip` regex (e.g. a new head),
which keep their fresh initialisation. Anything else that does not fit is an error listing each path.
"""

import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from jft import model_files, pretrained, tree_paths
from jft.errors import UserError

PyTree = Any


def _jft_state_dir(source: str) -> str | None:
  """The `.../checkpoints/STEP/state` directory that `source` names, or None if it is no jft run."""
  source = os.path.abspath(source)  # orbax reads no metadata on relative paths
  if os.path.isdir(os.path.join(source, 'checkpoints')):
    source = os.path.join(source, 'checkpoints')
  steps = [int(d) for d in os.listdir(source) if d.isdigit()] if os.path.isdir(source) else []
  if steps:
    source = os.path.join(source, str(max(steps)))
  if os.path.isdir(os.path.join(source, 'state')):
    return os.path.join(source, 'state')
  return None


def read_checkpoint_params(state_dir: str) -> PyTree:
  """Only the `params` of a saved train state, as host numpy arrays (any device topology)."""
  return read_checkpoint_variables(state_dir)[0]


def read_checkpoint_variables(state_dir: str) -> tuple[PyTree, PyTree]:
  """(`params`, `model_state`) of a saved train state, as host numpy arrays (any device topology)."""
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    saved = checkpointer.metadata(state_dir).item_metadata.tree
    if 'params' not in saved:
      raise KeyError('params')
    # An empty model_state (no BatchNorm) is stored as nothing to restore.
    target = {key: saved[key] for key in ('params', 'model_state') if saved.get(key)}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
  except (ValueError, FileNotFoundError, KeyError) as e:
    raise UserError(f'cannot read parameters from the jft checkpoint {state_dir} ({type(e).__name__}: {e}); '
                    'give a complete checkpoint') from None
  return restored['params'], restored.get('model_state', {})


def jft_run(source: str) -> tuple[str, dict] | None:
  """(the state directory, the config) of the jft run or checkpoint `source` names, or None if it is none."""
  state_dir = _jft_state_dir(source) if os.path.isdir(source) else None
  if state_dir is None:
    return None
  config_dir = os.path.join(os.path.dirname(state_dir), 'config')
  return state_dir, ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(config_dir)


def load_params(source: str) -> tuple[PyTree, str]:
  """(the parameter tree of `source`, a description of where it came from)."""
  state_dir = _jft_state_dir(source) if os.path.isdir(source) else None
  if state_dir is not None:
    return read_checkpoint_params(state_dir), f'jft checkpoint {state_dir}'
  if model_files.is_registered(source) or os.path.isfile(os.path.join(source, 'config.json')):
    return pretrained.load(source).variables['params'], f'pretrained {source}'
  registered = ', '.join(model_files.REGISTERED)
  raise UserError(f'config.init {source!r} is neither a registered pretrained model ({registered}), nor a '
                  'directory with config.json + model.safetensors, nor a jft work directory or checkpoint')


def merge_params(params: PyTree, loaded: PyTree, skip: Sequence[str], source: str = 'init') -> PyTree:
  """`params` with every leaf not matching a `skip` regex replaced by the same path of `loaded`."""
  fresh = tree_paths.flatten(params)
  found = {path: np.asarray(leaf) for path, leaf in tree_paths.flatten(loaded).items()}
  for pattern in skip:
    if not any(re.fullmatch(pattern, path) for path in fresh):
      raise UserError(f'config.init_skip pattern {pattern!r} matches no parameter of the model; '
                      f'parameter paths look like {", ".join(list(fresh)[:3])}')
  skipped = {path for path in fresh if any(re.fullmatch(p, path) for p in skip)}
  mismatches = [f'  missing   {path} {tuple(leaf.shape)}' for path, leaf in fresh.items()
                if path not in skipped and path not in found]
  mismatches += [f'  shape     {path}: model {tuple(leaf.shape)}, {source} {found[path].shape}'
                 for path, leaf in fresh.items()
                 if path not in skipped and path in found and tuple(leaf.shape) != found[path].shape]
  if mismatches:
    raise UserError(f'{source} does not fit the model:\n' + '\n'.join(mismatches)
                    + '\nadd regexes of the parameters not to take to config.init_skip, or configure the model '
                    'the source was trained with')
  unused = [path for path in found if path not in fresh]
  if unused:
    logging.info('parameters of %s the model does not have: %s', source, ', '.join(unused))
  merged = {path: leaf if path in skipped else found[path].astype(leaf.dtype) for path, leaf in fresh.items()}
  return tree_paths.unflatten(merged)
