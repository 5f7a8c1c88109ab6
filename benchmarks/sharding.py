"""What FSDP saves: a BERT-base-shaped encoder (12 layers, hidden 768, random init) + AdamW on 8 host devices,
its state replicated (mesh data=8) against split over fsdp=8, in one run.

python benchmarks/sharding.py [--layers=12] [--hidden=768] [--batch_size=16] [--length=64] [--steps=4]
Prints, for each layout, the bytes of params + AdamW state that one device holds (measured on the live arrays
and planned from the partition specs), the compiled step's per-device memory (`memory_analysis`), and the median
step time, the two steps timed in interleaved rounds; then the ratios fsdp=8 / replicated. On host-platform CPU
devices the 8 "devices" share the machine's cores and memory, so the step-time ratio says what the collectives
cost here, not what a TPU or GPU pod would see.
"""

import json
import os
import statistics

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import jax  # noqa: E402  (the device count is set before jax starts)
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from timing import interleaved_times  # noqa: E402

from jft import optim, sharding, tree_paths  # noqa: E402
from jft import step as step_lib  # noqa: E402
from jft.apply_fn import linen_apply_fn, split_variables  # noqa: E402
from jft.models import BertClassifier, BertConfig  # noqa: E402
from jft.state import create_train_state  # noqa: E402

_LAYERS = flags.DEFINE_integer('layers', 12, 'encoder layers')
_HIDDEN = flags.DEFINE_integer('hidden', 768, 'hidden size (heads of 64, MLP 4x)')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'examples per step (a multiple of 8)')
_LENGTH = flags.DEFINE_integer('length', 64, 'tokens per example')
_STEPS = flags.DEFINE_integer('steps', 4, 'timed steps of each layout')
OPTIM = dict(name='adamw', lr=1e-4, weight_decay=0.01, warmup_steps=10, schedule='linear', clip_norm=1.0,
             accumulate_steps=1)


def device0_bytes(tree) -> int:
  """The bytes of `tree`'s arrays that live on the first device."""
  device = jax.devices()[0]
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree) for shard in leaf.addressable_shards
             if shard.device == device)


def main(_):
  config = BertConfig(hidden_size=_HIDDEN.value, num_hidden_layers=_LAYERS.value,
                      num_attention_heads=_HIDDEN.value // 64, intermediate_size=4 * _HIDDEN.value)
  module = BertClassifier(config, num_classes=8, pooling='mean')
  rng = np.random.default_rng(0)
  batch = {'input_ids': rng.integers(1000, config.vocab_size, (_BATCH.value, _LENGTH.value)).astype(np.int32),
           'attention_mask': np.ones((_BATCH.value, _LENGTH.value), np.int32),
           'label': rng.integers(0, 8, _BATCH.value).astype(np.int32)}
  example = {k: v[:1] for k, v in step_lib.model_inputs(batch).items()}
  init = lambda key: split_variables(module.init(key, **example))
  tx = optim.make_optimizer(ml_collections.ConfigDict(OPTIM), 1000)
  make_state = lambda key: create_train_state(*init(key), tx, jax.random.PRNGKey(1))
  abstract_state = jax.eval_shape(make_state, jax.random.PRNGKey(0))
  state_bytes = tree_paths.tree_bytes((abstract_state.params, abstract_state.opt_state))
  param_bytes = tree_paths.tree_bytes(abstract_state.params)
  print(f'BERT {config.num_hidden_layers} x {config.hidden_size}: {param_bytes / 2**20:.0f} MiB of params, '
        f'params + AdamW state {state_bytes / 2**20:.0f} MiB; {jax.device_count()} devices')

  rows, steps = {}, {}
  for name, shape in (('replicated', dict(data=8)), ('fsdp=8', dict(data=1, fsdp=8))):
    mesh = sharding.make_mesh(shape=shape)
    specs = sharding.param_specs(abstract_state.params, mesh.shape)
    state_sharding = sharding.state_sharding(mesh, abstract_state, specs)
    state = jax.jit(make_state, out_shardings=state_sharding)(jax.random.PRNGKey(0))
    train_step = step_lib.jit_train_step(step_lib.make_train_step(linen_apply_fn(module), tx), mesh, state_sharding)
    device_batch = sharding.put_batch(batch, mesh)
    compiled = train_step.lower(state, device_batch).compile()
    memory = compiled.memory_analysis()
    planned = sharding.bytes_per_device((abstract_state.params, abstract_state.opt_state),
                                        sharding.tree_specs((abstract_state.params, abstract_state.opt_state),
                                                            abstract_state.params, specs), mesh.shape)
    rows[name] = {'state_bytes_per_device': device0_bytes((state.params, state.opt_state)),
                  'planned_bytes_per_device': planned,
                  'compiled_temp_bytes': memory.temp_size_in_bytes,
                  'compiled_argument_bytes': memory.argument_size_in_bytes}
    holder = {'state': state}

    def run(holder=holder, train_step=train_step, device_batch=device_batch):
      holder['state'], metrics = train_step(holder['state'], device_batch)
      jax.block_until_ready(metrics)

    run()  # compiles (cached) and warms up
    steps[name] = run
  times = interleaved_times(steps, _STEPS.value, round_size=1)
  print(f'{"layout":<12} {"state/device MiB":>17} {"planned MiB":>12} {"step temp MiB":>14} {"step s":>8}')
  for name, row in rows.items():
    row['median_step_s'] = statistics.median(times[name])
    print(f"{name:<12} {row['state_bytes_per_device'] / 2**20:>17.1f} {row['planned_bytes_per_device'] / 2**20:>12.1f}"
          f" {row['compiled_temp_bytes'] / 2**20:>14.1f} {row['median_step_s']:>8.2f}")
  ratios = {key: rows['fsdp=8'][key] / rows['replicated'][key]
            for key in ('state_bytes_per_device', 'compiled_temp_bytes', 'median_step_s')}
  print(f"fsdp=8 / replicated: state per device {ratios['state_bytes_per_device']:.3f}, step temporaries "
        f"{ratios['compiled_temp_bytes']:.3f}, step time {ratios['median_step_s']:.2f}")
  print(json.dumps({'layers': config.num_hidden_layers, 'hidden': config.hidden_size, 'batch': _BATCH.value,
                    'length': _LENGTH.value, 'rows': rows, 'ratios_fsdp8_over_replicated': ratios}))


if __name__ == '__main__':
  app.run(main)
