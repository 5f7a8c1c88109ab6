"""The same jitted step over a mesh of 8 (host-platform) devices gives the 1-device result."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import jax, numpy as np, optax
    from jft import sharding, step as step_lib
    from jft.apply_fn import linen_apply_fn, split_variables
    from jft.models import ResNet
    from jft.state import create_train_state

    assert jax.device_count() == 8, jax.devices()
    module = ResNet(num_classes=3, stage_features=(4, 8), blocks_per_stage=1)
    tx = optax.adamw(1e-2)
    rng = np.random.default_rng(0)
    batches = [{'image': rng.normal(size=(16, 8, 8, 1)).astype(np.float32),
                'label': rng.integers(0, 3, 16).astype(np.int32)} for _ in range(5)]

    def run(devices):
      mesh = sharding.make_mesh(devices)
      params, model_state = split_variables(module.init(jax.random.PRNGKey(0), image=batches[0]['image'][:1]))
      state = sharding.put_replicated(create_train_state(params, model_state, tx, jax.random.PRNGKey(1)), mesh)
      train_step = step_lib.jit_train_step(step_lib.make_train_step(linen_apply_fn(module), tx), mesh)
      for batch in batches:
        state, metrics = train_step(state, sharding.put_batch(batch, mesh))
      assert state.params['head']['kernel'].sharding.is_fully_replicated
      eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(linen_apply_fn(module), 3), mesh)
      evaluation = step_lib.evaluate(eval_step, state, [{**batches[0], 'mask': np.ones(16, bool)}], mesh)
      return jax.device_get(state), evaluation

    (one, eval_one), (eight, eval_eight) = run(jax.devices()[:1]), run(jax.devices())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), one, eight)
    np.testing.assert_allclose(eval_one['loss'], eval_eight['loss'], rtol=1e-4)
    assert eval_one['count'] == eval_eight['count'] == 16

    # Freezing and pruning masks in the optimizer state, sharded like everything else.
    from jft import optim, pruning, rules
    import ml_collections
    optim_config = ml_collections.ConfigDict(dict(name='adamw', lr=1e-2, weight_decay=0.1, warmup_steps=0,
                                                  schedule='constant', clip_norm=1.0, accumulate_steps=1))

    def run_pruned(devices):
      mesh = sharding.make_mesh(devices)
      params, model_state = split_variables(module.init(jax.random.PRNGKey(0), image=batches[0]['image'][:1]))
      labels = rules.resolve(params, freeze=('stem/.*',))
      prunable = pruning.prunable(params)
      tx = optim.make_optimizer(optim_config, 10, labels, prunable)
      state = sharding.put_replicated(create_train_state(params, model_state, tx, jax.random.PRNGKey(1)), mesh)
      masks = pruning.compute_masks(state.params, prunable, 0.5, 'global', 'unstructured')
      state = state.replace(params=pruning.apply_masks(state.params, masks),
                            opt_state=pruning.with_new_masks(state.opt_state, masks))
      train_step = step_lib.jit_train_step(step_lib.make_train_step(linen_apply_fn(module), tx, labels.trainable), mesh)
      for batch in batches:
        state, _ = train_step(state, sharding.put_batch(batch, mesh))
      return jax.device_get(state)

    one, eight = run_pruned(jax.devices()[:1]), run_pruned(jax.devices())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), one.params, eight.params)
    np.testing.assert_array_equal(one.params['stem']['kernel'], eight.params['stem']['kernel'])
    report = pruning.sparsity_report(eight.params, pruning.masks_of(eight.opt_state))
    assert abs(report['sparsity/prunable'] - 0.5) < 1e-3, report
    print('OK')
''')


def test_eight_devices_match_one():
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8', 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith('OK')
