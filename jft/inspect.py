"""What the rules of a config do to each parameter: `python -m jft.inspect --config=configs/NAME.py[:ARG]`.

Prints every parameter path with its shape and size and, for each stage, whether it trains, its learning-rate
multiplier and whether it decays, the target sparsity of the pruned ones and the partition spec (`config.mesh`,
`config.sharding`; `--devices=N` lays it out for N devices); then the totals: trainable and frozen parameters, the
bytes of optimizer state (pruning masks included), the bytes per device of params + optimizer state, sharded vs
replicated, and what pruning will zero.
Nothing is trained or written; a bad rule fails here exactly as it would in `jft.main`.
"""

import sys

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from jft import components, optim, pruning, sharding, tree_paths
from jft import stages as stages_lib
from jft.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/NAME.py[:ARG]', lock_config=True)
_DEVICES = flags.DEFINE_integer('devices', None, 'lay the state out for this many devices (default: this machine\'s)')


def describe(config: ml_collections.ConfigDict, device_count: int | None = None) -> str:
  """The report: one table of parameters (a column group per stage, the partition spec), then totals per stage,
  with the bytes per device of the configured mesh over `device_count` devices (default: this machine's)."""
  model = components.build_model(config)
  params = jax.eval_shape(model.init_variables, jax.random.PRNGKey(0))[0]
  stages = stages_lib.plan(config, params)
  axis_sizes = sharding.mesh_shape(config.get('mesh'), device_count or jax.device_count())
  settings = config.get('sharding') or {}
  specs = sharding.param_specs(params, axis_sizes, tuple(settings.get('rules') or ()),
                               settings.get('min_bytes', sharding.DEFAULT_MIN_BYTES))
  flat_specs = tree_paths.flatten(specs)
  prune = config.get('prune')
  pruned = {}
  if prune and prune.sparsity > 0:
    pruned = tree_paths.flatten(pruning.prunable(params, prune.get('include'), prune.get('exclude')))
  shapes = tree_paths.flatten(params)
  width = max(len(path) for path in shapes)
  header = f'{"path":<{width}}  {"shape":<16} {"size":>10}'
  for stage in stages:
    header += f' | {"stage " + str(stage.index):<8} {"lr x":>7} {"decay":<5}'
  if pruned:
    header += f' | {"pruned":<8}'
  header += ' | partition spec'
  lines = [', '.join(f'stage {s.index}: steps {s.first_step}-{s.last_step}' for s in stages), header, '-' * len(header)]
  flat = [{name: tree_paths.flatten(getattr(stage.labels, name)) for name in ('trainable', 'lr_mult', 'decay')}
          for stage in stages]
  for path, leaf in shapes.items():
    line = f'{path:<{width}}  {str(tuple(leaf.shape)):<16} {int(np.prod(leaf.shape)):>10,}'
    for labels in flat:
      trainable = labels['trainable'][path]
      rule = 'train' if trainable else 'frozen'
      mult = f'{labels["lr_mult"][path]:.4g}' if trainable else '-'
      decay = ('yes' if labels['decay'][path] else 'no') if trainable else '-'
      line += f' | {rule:<8} {mult:>7} {decay:<5}'
    if pruned:
      line += f' | {prune.sparsity if pruned[path] else "-"!s:<8}'
    lines.append(f'{line} | {flat_specs[path]}')
  total = sum(int(np.prod(leaf.shape)) for leaf in shapes.values())
  lines.append('')
  for stage, labels in zip(stages, flat, strict=True):
    trainable = sum(int(np.prod(shapes[p].shape)) for p, t in labels['trainable'].items() if t)
    pruning_options = dict(prunable=pruning.prunable(params, prune.get('include'), prune.get('exclude')),
                           prune_criterion=prune.get('criterion', 'magnitude')) if pruned else {}
    tx = optim.make_optimizer(stage.optim, stage.steps, stage.labels, **pruning_options)
    opt_state = jax.eval_shape(tx.init, params)
    opt_bytes = tree_paths.tree_bytes(opt_state)
    param_bytes = tree_paths.tree_bytes(params)
    state_specs = sharding.tree_specs((params, opt_state), params, specs)
    per_device = sharding.bytes_per_device((params, opt_state), state_specs, axis_sizes)
    lines.append(f'stage {stage.index} (steps {stage.first_step}-{stage.last_step}): trainable {trainable:,} '
                 f'({trainable / total:.1%}), frozen {total - trainable:,}, optimizer state {opt_bytes:,} bytes '
                 f'({opt_bytes / 2**20:.1f} MiB); parameters {total:,} ({param_bytes / 2**20:.1f} MiB); '
                 f'params + optimizer state per device on the mesh {axis_sizes}: {per_device / 2**20:.1f} MiB '
                 f'sharded vs {(param_bytes + opt_bytes) / 2**20:.1f} MiB replicated '
                 f'({per_device / (param_bytes + opt_bytes):.3f})')
  if pruned:
    count = sum(int(np.prod(shapes[p].shape)) for p, chosen in pruned.items() if chosen)
    lines.append(f'pruning: {count:,} prunable parameters ({count / total:.1%}) to sparsity {prune.sparsity} '
                 f'({prune.schedule}, scope {prune.scope}, {prune.structure}, criterion '
                 f'{prune.get("criterion", "magnitude")}): {int(count * prune.sparsity):,} '
                 f'zeros at the end, {prune.sparsity * count / total:.1%} of all parameters')
  return '\n'.join(lines)


def main() -> None:
  try:
    flags.FLAGS(sys.argv)
  except (flags.Error, ValueError, OSError, AttributeError, KeyError, TypeError) as e:
    print(f'jft: error: {e}\nusage: python -m jft.inspect --config=configs/NAME.py[:ARG] [--config.FIELD=VALUE]',
          file=sys.stderr)
    sys.exit(2)
  if _CONFIG.value is None:
    print('jft: error: --config=configs/NAME.py[:ARG] is required', file=sys.stderr)
    sys.exit(2)
  try:
    print(describe(_CONFIG.value, _DEVICES.value))
  except UserError as e:
    print(f'jft: error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  main()
