"""Initial parameters from elsewhere (`config.init`), merged into a freshly initialised parameter tree.

A source is a registered pretrained model ('minilm'), a directory in Hugging Face layout, or an earlier
jft run: its work directory (the latest checkpoint), its `checkpoints/` root, or one `checkpoints/STEP`.
Every parameter is taken from the source except those matching an `init_skip` regex (e.g. a new head),
which keep their fresh initialisation. Anything else that does not fit is an error listing each path.

`read_run` reads a step of an earlier run for `init`, the teacher and `jft.export`, with plain orbax: paths go
through `etils.epath`, so a `gs://` run reads as a local one does, and arrays come back as host numpy arrays,
whatever mesh or process count the run was saved with.
"""

import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util

from jft import lora, model_files, pretrained, rules, tree_paths
from jft.errors import UserError

PyTree = Any
ITEMS = ('params', 'model_state', 'masks')
_PATHS = {'params': 'params', 'model_state': 'model_state', 'masks': 'opt_state/masks'}  # in the train state


def _subtree(tree: Any, path: str) -> Any:
  for key in path.split('/'):
    tree = tree.get(key) if isinstance(tree, dict) else None
  return tree


@dataclasses.dataclass(frozen=True)
class Run:
  """A step of a run: its `state` directory, the step, the run's config, and the parts read (None: not asked
  for, or `masks` of a run that did not prune; an empty `model_state` is {})."""

  state_dir: epath.Path
  step: int
  config: dict
  params: PyTree = None
  model_state: PyTree = None
  masks: PyTree = None


def find_run(source: str | os.PathLike, step: int | None = None) -> tuple[epath.Path, int] | None:
  """(the checkpoint root, the step) that `source` names, or None if it is no jft run; `step` None: the latest
  (or the one step a step directory holds)."""
  path = epath.Path(source)
  path = path if path.is_absolute() else path.absolute()  # orbax finds no tree metadata under a relative path
  only = None
  if (path / 'checkpoints').is_dir():
    path = path / 'checkpoints'
  elif (path / 'state').is_dir() and path.name.isdigit():
    path, only = path.parent, int(path.name)
  steps = sorted(ocp.path.step.checkpoint_steps(path)) if path.is_dir() else []
  if only is not None:
    steps = [s for s in steps if s == only]
  if not steps:
    return None
  if step is not None and step not in steps:
    raise UserError(f'{source} has no checkpoint at step {step} (steps: {", ".join(map(str, steps))}); '
                    'give one of those steps')
  return path, (steps[-1] if step is None else step)


def read_run(source: str | os.PathLike, items: Sequence[str] = ITEMS, step: int | None = None) -> Run | None:
  """The config and the `items` (of `ITEMS`) of a step of the jft run `source` names; None if it is no run."""
  unknown = set(items) - set(ITEMS)
  if unknown:
    raise ValueError(f'unknown items {sorted(unknown)}; read any of {ITEMS}')
  found = find_run(source, step)
  if found is None:
    return None
  root, step = found
  state_dir = root / str(step) / 'state'
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  handlers = dict(state=ocp.PyTreeCheckpointHandler(), data=ocp.JsonCheckpointHandler(),
                  config=ocp.JsonCheckpointHandler(), fingerprint=ocp.JsonCheckpointHandler(),
                  progress=ocp.JsonCheckpointHandler())  # every item named, or orbax warns about the others
  manager = ocp.CheckpointManager(root, options=options, item_handlers=handlers)
  try:
    saved = manager.item_metadata(step)['state'].tree
    if 'params' not in saved:
      raise KeyError('params')
    # An empty part (a model without BatchNorm, an optimizer without masks) is stored as nothing to restore.
    present = {item: tree for item in items if (tree := _subtree(saved, _PATHS[item]))}
    target = traverse_util.unflatten_dict({_PATHS[item]: tree for item, tree in present.items()}, sep='/')
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
        config=ocp.args.JsonRestore()))
  except (ValueError, FileNotFoundError, KeyError) as e:
    raise UserError(f'cannot read the jft checkpoint {state_dir} ({type(e).__name__}: {e}); give a complete '
                    'checkpoint') from None
  finally:
    manager.close()
  parts = {item: _subtree(restored['state'], _PATHS[item]) for item in present}
  if 'model_state' in items:
    parts.setdefault('model_state', {})
  return Run(state_dir=state_dir, step=step, config=restored['config'], **parts)


def load_params(source: str) -> tuple[PyTree, str]:
  """(the parameter tree of `source`, a description of where it came from)."""
  model_files.refuse_pickle(source, 'config.init')
  run = read_run(source, items=('params',))
  if run is not None:
    return lora.merged_for_run(run.params, run.config), f'jft checkpoint {run.state_dir}'
  if model_files.is_registered(source) or os.path.isfile(os.path.join(source, 'config.json')):
    return pretrained.load(source).variables['params'], f'pretrained {source}'
  registered = ', '.join(model_files.REGISTERED)
  raise UserError(f'config.init {source!r} is neither a registered pretrained model ({registered}), nor a '
                  'directory with config.json + model.safetensors, nor a jft work directory or checkpoint')


def skipped_paths(paths: Iterable[str], skip: Sequence[str]) -> set[str]:
  """The parameter paths a `config.init_skip` regex matches in full: the model initialises those itself."""
  return {path for path in paths if rules.matches_any(path, skip)}


def merge_params(params: PyTree, loaded: PyTree, skip: Sequence[str], source: str = 'init') -> PyTree:
  """`params` with every leaf not matching a `skip` regex replaced by the same path of `loaded` (the replaced
  leaves need only a shape and dtype: `jax.ShapeDtypeStruct` will do)."""
  fresh = tree_paths.flatten(params)
  found = {path: np.asarray(leaf) for path, leaf in tree_paths.flatten(loaded).items()}
  for pattern in skip:
    if not any(re.fullmatch(pattern, path) for path in fresh):
      raise UserError(f'config.init_skip pattern {pattern!r} matches no parameter of the model; '
                      f'parameter paths look like {", ".join(list(fresh)[:3])}')
  skipped = skipped_paths(fresh, skip)
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
  merged = {path: leaf if path in skipped else found[path].astype(leaf.dtype, copy=False)
            for path, leaf in fresh.items()}
  return tree_paths.unflatten(merged)
