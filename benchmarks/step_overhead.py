"""What jft's train step costs over a bare `jax.jit` + optax step of the same model on the same batches.

python benchmarks/step_overhead.py [--config=configs/fashion_cnn.py] [--steps=200]
Both steps run interleaved in one process (rounds of each in turn), so machine noise hits both alike;
prints the median step times and their ratio (jft / bare).
"""

import itertools
import json
import statistics

import jax
import optax
from absl import app, flags
from ml_collections import config_flags
from timing import interleaved_times

from jft import data, host_memory, models, optim, sharding
from jft import step as step_lib
from jft.apply_fn import linen_apply_fn, split_variables
from jft.state import create_train_state

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/fashion_cnn.py', 'config whose model and optimizer to use')
_STEPS = flags.DEFINE_integer('steps', 200, 'timed steps of each kind')
_ROUND = flags.DEFINE_integer('round', 10, 'steps of one kind before switching to the other')


def make_bare_step(module, tx):
  """The textbook step: value_and_grad of the mean cross-entropy, tx.update, apply_updates."""

  def bare_step(params, opt_state, image, label):
    def loss_fn(p):
      logits = module.apply({'params': p}, image, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(bare_step, donate_argnums=(0, 1))


def main(_):
  host_memory.reexec()  # as python -m jft.main does: the same host memory setup
  host_memory.run_programs_inline()  # ... and CPU programs run inline, as there
  config = _CONFIG.value
  module = models.get_model(config.model, data.num_classes(config.data.name, config.data.data_dir))
  tx = optim.make_optimizer(config.optim, config.total_steps)
  train_batches = data.train_iterator(config.data, config.batch_size, config.seed)
  batches = [next(train_batches) for _ in range(_ROUND.value * 4)]
  params, model_state = split_variables(module.init(jax.random.PRNGKey(0), image=batches[0]['image'][:1]))
  if model_state:
    raise SystemExit('the bare baseline step has no model state: pick a config whose model has none')

  mesh = sharding.make_mesh()
  jft_step = step_lib.jit_train_step(step_lib.make_train_step(linen_apply_fn(module), tx), mesh)
  jft_state = sharding.put_replicated(create_train_state(params, model_state, tx, jax.random.PRNGKey(1)), mesh)
  bare_step = make_bare_step(module, tx)
  bare_params, bare_opt_state = jax.tree.map(lambda x: x.copy(), (params, tx.init(params)))

  def run_jft(batch):
    nonlocal jft_state
    jft_state, metrics = jft_step(jft_state, sharding.put_batch(batch, mesh))
    jax.block_until_ready(metrics)

  def run_bare(batch):
    nonlocal bare_params, bare_opt_state
    bare_params, bare_opt_state, loss = bare_step(bare_params, bare_opt_state, batch['image'], batch['label'])
    jax.block_until_ready(loss)

  for batch in batches[:3]:  # compile and warm up both
    run_jft(batch)
    run_bare(batch)
  # Each step takes the next of the same cycle of batches.
  cycles = {name: itertools.cycle(batches) for name in ('jft', 'bare')}
  runs = {'jft': lambda: run_jft(next(cycles['jft'])), 'bare': lambda: run_bare(next(cycles['bare']))}
  times = interleaved_times(runs, _STEPS.value, _ROUND.value)
  medians = {name: statistics.median(t) for name, t in times.items()}
  result = {
      'model': config.model.name, 'batch_size': config.batch_size, 'devices': jax.device_count(),
      'steps_each': len(times['bare']),
      'jft_median_ms': round(medians['jft'] * 1e3, 3), 'bare_median_ms': round(medians['bare'] * 1e3, 3),
      'ratio_jft_over_bare': round(medians['jft'] / medians['bare'], 4),
  }
  print(f"jft step {result['jft_median_ms']} ms, bare jit+optax step {result['bare_median_ms']} ms "
        f"(median of {result['steps_each']} each): ratio {result['ratio_jft_over_bare']}")
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
