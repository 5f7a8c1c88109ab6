"""Scale-out on 8 host-platform devices: the same steps on meshes 1, data=8, (data=2, fsdp=4), fsdp=8 and
(data=2, fsdp=2, model=2) (and under pmap) give the same parameters; FSDP really splits each shard; checkpoints
restore bit-exactly onto other meshes and process counts, and the resumed run continues as an uninterrupted
one; kill and resume stays bit-identical on an FSDP mesh; 2 processes train as 1."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
from contract import ROOT, TOOLS, sigterm_after_step

MESHES_SCRIPT = textwrap.dedent('''
    import jax, ml_collections, numpy as np
    from jft import optim, pmap_backend, pruning, rules, sharding, step as step_lib, tree_paths
    from jft.apply_fn import linen_apply_fn, split_variables
    from jft.models import ResNet, SmallCNN
    from jft.state import create_train_state

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    batches = [{'image': rng.normal(size=(16, 8, 8, 1)).astype(np.float32),
                'label': rng.integers(0, 3, 16).astype(np.int32)} for _ in range(4)]
    optim_config = ml_collections.ConfigDict(dict(name='adamw', lr=1e-2, weight_decay=0.1, warmup_steps=0,
                                                  schedule='constant', clip_norm=1.0, accumulate_steps=1))

    def run(module, devices, shape, backend='jit', freeze='stem/.*', sharding_rules=()):
      """Steps with `freeze` frozen, 50% pruning masks in the optimizer state, on `shape` over `devices`."""
      mesh = sharding.make_mesh(devices, shape)
      init = lambda rng: split_variables(module.init(rng, image=batches[0]['image'][:1]))
      abstract_params = jax.eval_shape(init, jax.random.PRNGKey(0))[0]
      labels = rules.resolve(abstract_params, freeze=(freeze,))
      prunable = pruning.prunable(abstract_params)
      tx = optim.make_optimizer(optim_config, 10, labels, prunable)
      make_state = lambda rng: create_train_state(*init(rng), tx, jax.random.PRNGKey(1))
      abstract_state = jax.eval_shape(make_state, jax.random.PRNGKey(0))
      specs = sharding.param_specs(abstract_params, mesh.shape, sharding_rules, min_bytes=0)
      state_sharding = sharding.state_sharding(mesh, abstract_state, specs)
      state = jax.jit(make_state, out_shardings=state_sharding)(jax.random.PRNGKey(0))  # created sharded
      masks = pruning.compute_masks(state.params, prunable, 0.5, 'global', 'unstructured')
      state = jax.jit(lambda s, m: s.replace(params=pruning.apply_masks(s.params, m),
                                             opt_state=pruning.with_new_masks(s.opt_state, m)),
                      out_shardings=state_sharding)(state, masks)
      if backend == 'pmap':
        train_step = pmap_backend.pmap_train_step(step_lib.make_train_step(
            linen_apply_fn(module), tx, labels.trainable, axis_name=pmap_backend.AXIS), mesh)
      else:
        train_step = step_lib.jit_train_step(step_lib.make_train_step(linen_apply_fn(module), tx, labels.trainable),
                                             mesh, state_sharding)
      for batch in batches:
        state, _ = train_step(state, sharding.put_batch(batch, mesh))
      eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(linen_apply_fn(module), 3), mesh, state_sharding)
      evaluation = step_lib.evaluate(eval_step, state, [{**batches[0], 'mask': np.ones(16, bool)}], mesh)
      return state, evaluation

    resnet = ResNet(num_classes=3, stage_features=(8, 16), blocks_per_stage=1)
    one, one_eval = run(resnet, jax.devices()[:1], None)
    one = jax.device_get(one)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    for shape in (dict(data=8), dict(data=2, fsdp=4), dict(fsdp=8, data=1)):
      state, evaluation = run(resnet, jax.devices(), shape)
      np.testing.assert_allclose(evaluation['loss'], one_eval['loss'], rtol=1e-4)  # the eval step on the mesh too
      assert evaluation['count'] == one_eval['count'] == 16
      fsdp = shape.get('fsdp', 1)
      leaves = tree_paths.flatten(state)
      kernel = leaves['params/stage_1_block_0/conv_1/kernel']  # 3 x 3 x 16 x 16: split along a 16
      (moment,) = [leaf for path, leaf in leaves.items() if path.endswith('/mu/stage_1_block_0/conv_1/kernel')]
      mask = leaves['opt_state/masks/stage_1_block_0/conv_1/kernel']
      for leaf in (kernel, moment, mask):
        assert leaf.addressable_shards[0].data.size * fsdp == leaf.size, (shape, leaf.sharding)
        assert leaf.sharding.spec == kernel.sharding.spec, (leaf.sharding, kernel.sharding)
      if fsdp > 1:
        assert 'fsdp' in kernel.sharding.spec
      host = jax.device_get(state)
      jax.tree.map(close, one.params, host.params)
      jax.tree.map(close, one.model_state, host.model_state)
      np.testing.assert_array_equal(one.params['stem']['kernel'], host.params['stem']['kernel'])
    # A model axis by rule: this kernel split over its input channels (model) and output channels (fsdp).
    rule = ('stage_1_block_0/conv_1/kernel', (None, None, 'model', 'fsdp'))
    state, _ = run(resnet, jax.devices(), dict(data=2, fsdp=2, model=2), sharding_rules=(rule,))
    kernel = state.params['stage_1_block_0']['conv_1']['kernel']
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, 'model', 'fsdp')
    assert kernel.addressable_shards[0].data.shape == (3, 3, 8, 8)
    jax.tree.map(close, one.params, jax.device_get(state.params))
    report = pruning.sparsity_report(one.params, pruning.masks_of(one.opt_state))
    assert abs(report['sparsity/prunable'] - 0.5) < 1e-3, report

    # pmap: the same pure step, gradients averaged over devices; without BatchNorm it matches jit.
    cnn = SmallCNN(num_classes=3, features=(8, 16), hidden=32, dropout=0.0)
    jit_state = jax.device_get(run(cnn, jax.devices(), dict(data=8), freeze='conv_0/.*')[0])
    pmap_state = jax.device_get(run(cnn, jax.devices(), dict(data=8), backend='pmap', freeze='conv_0/.*')[0])
    jax.tree.map(close, jit_state.params, pmap_state.params)
    print('OK')
''')


def eight_devices(count: int = 8) -> dict[str, str]:
  return {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={count}', 'JAX_PLATFORMS': 'cpu'}


def test_meshes_and_pmap_give_the_one_device_params_and_fsdp_splits_each_shard():
  result = subprocess.run([sys.executable, '-c', MESHES_SCRIPT], cwd=ROOT, env=eight_devices(), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith('OK')


def run_main(workdir, *args, devices: int, data_dir: str) -> subprocess.CompletedProcess:
  command = [sys.executable, '-m', 'jft.main', '--config=configs/digits_cnn.py:quick', f'--workdir={workdir}',
             f'--config.data.data_dir={data_dir}', '--config.checkpoint_every=10', '--config.checkpoint.keep_latest=5',
             '--config.prune.sparsity=0.5', '--config.prune.every=5', *args]
  result = subprocess.run(command, cwd=ROOT, env=eight_devices(devices), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def read_state(workdir, step: int) -> dict:
  """The saved train state of `step` as host numpy arrays, with plain orbax."""
  path = os.path.join(os.path.abspath(workdir), 'checkpoints', str(step), 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=tree, restore_args=restore_args))


def drop_steps_after(workdir, step: int) -> None:
  """Makes `step` the run's latest checkpoint (as if it had stopped there)."""
  root = os.path.join(workdir, 'checkpoints')
  for name in os.listdir(root):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(os.path.join(root, name))


RESTORE_SCRIPT = textwrap.dedent('''
    import json, sys, jax, numpy as np, orbax.checkpoint as ocp
    from jft import sharding
    from jft.checkpoint import Checkpoints
    workdir, step, shape = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    mesh = sharding.make_mesh(shape=shape)
    path = f'{workdir}/checkpoints/{step}/state'
    saved = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
    host = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=saved, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host)
    specs = sharding.param_specs(abstract['params'], mesh.shape, min_bytes=0)
    shardings = sharding.named(mesh, sharding.tree_specs(abstract, abstract['params'], specs))
    restored = Checkpoints(f'{workdir}/checkpoints').manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(sharding.abstract(abstract, shardings))))['state']
    jax.tree.map(lambda r, h: np.testing.assert_array_equal(np.asarray(r), h), restored, host)
    wrong = [(r.sharding, s) for r, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)) if r.sharding != s]
    assert not wrong, wrong[:3]
    print('bit-exact on', dict(mesh.shape), len(jax.tree.leaves(host['opt_state'].get('masks', {}))), 'masks')
''')


def test_resharding_restore_8_fsdp_to_1_to_4_devices_is_exact_and_continues(tmp_path, data_dir):
  fsdp = ('--config.mesh.fsdp=8', '--config.mesh.data=1', '--config.sharding.min_bytes=0')
  run_main(tmp_path / 'fsdp8', *fsdp, devices=8, data_dir=data_dir)  # saves steps 10, 20, 30
  # Step 10, saved FSDP-split over 8 devices, restores bit-exactly onto 1 device and onto 4 data-parallel ones.
  for devices, shape in ((1, {}), (4, {'data': 4})):
    result = subprocess.run([sys.executable, '-c', RESTORE_SCRIPT, str(tmp_path / 'fsdp8'), '10', json.dumps(shape)],
                            cwd=ROOT, env=eight_devices(devices), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and 'bit-exact' in result.stdout, result.stderr[-3000:]
  # The chain: steps 1-10 on 8 devices (FSDP), 11-20 on 1 device, 21-30 on 4 (data-parallel).
  drop_steps_after(tmp_path / 'fsdp8', 10)
  run_main(tmp_path / 'fsdp8', devices=1, data_dir=data_dir)
  drop_steps_after(tmp_path / 'fsdp8', 20)
  run_main(tmp_path / 'fsdp8', devices=4, data_dir=data_dir)
  run_main(tmp_path / 'four', devices=4, data_dir=data_dir)  # uninterrupted on 4 devices
  chained, uninterrupted = read_state(tmp_path / 'fsdp8', 30), read_state(tmp_path / 'four', 30)
  # The device layouts sum in different orders, so the runs part in the last bits, and training can grow that: at
  # this seed a few weights end up 2e-5 apart (since a change of 2026-12-02 moved the step's results by one
  # rounding; seeds 1 and 2: 2e-7), likely a ReLU or max pool deciding otherwise on some example. A wrongly
  # restored or resharded leaf would be off by the weights' own scale, about 0.1.
  for name in ('params', 'opt_state'):
    flat_chained = jax.tree.leaves(chained[name])
    flat_uninterrupted = jax.tree.leaves(uninterrupted[name])
    for a, b in zip(flat_chained, flat_uninterrupted, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_killed_and_resumed_fsdp_run_ends_bit_identical(tmp_path, data_dir):
  out = subprocess.run(
      [sys.executable, os.path.join(TOOLS, 'kill_resume.py'), sys.executable, 'configs/digits_cnn.py:quick',
       str(tmp_path), f'--config.data.data_dir={data_dir}', '--config.mesh.fsdp=4', '--config.sharding.min_bytes=0'],
      capture_output=True, text=True, timeout=900, cwd=ROOT, env=eight_devices(4))
  verdict = json.loads(out.stdout.strip().splitlines()[-1])
  assert verdict['identical'], verdict
  assert 0 < verdict['killed_after_step'] < 30


def test_two_processes_match_one_survive_sigterm_exactly_and_resume_in_one(tmp_path, data_dir):
  args = ['--config=configs/digits_cnn.py:quick', f'--config.data.data_dir={data_dir}',
          '--config.checkpoint_every=10', '--config.checkpoint.keep_latest=5']
  launched = subprocess.run(
      [sys.executable, '-m', 'jft.launch', '--processes=2', '--devices_per_process=2', '--timeout=500', '--',
       f'--workdir={tmp_path / "two"}', *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert launched.returncode == 0, launched.stderr[-3000:]
  test_line = json.loads(launched.stdout.strip().splitlines()[-1])
  one = subprocess.run([sys.executable, '-m', 'jft.main', f'--workdir={tmp_path / "one"}', *args], cwd=ROOT,
                       env=eight_devices(4), capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  # Only process 0 wrote the work directory's files; the same data order; the same result up to summation order.
  lines = {name: [json.loads(line) for line in open(tmp_path / name / 'metrics.jsonl')] for name in ('two', 'one')}
  assert [line['step'] for line in lines['two']] == [line['step'] for line in lines['one']]
  (test_metrics,) = [line for line in lines['two'] if line['split'] == 'test']
  assert test_metrics['accuracy'] == test_line['accuracy'] and len(launched.stdout.strip().splitlines()) >= 1
  for a, b in zip(lines['two'], lines['one'], strict=True):
    np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-5)
  for step in (10, 20, 30):  # one data state for all hosts, the one a single process has at that step
    data_states = [(tmp_path / name / 'checkpoints' / str(step) / 'data' / 'metadata').read_text()
                   for name in ('two', 'one')]
    assert json.loads(data_states[0]) == json.loads(data_states[1])
  two, one_state = read_state(tmp_path / 'two', 30), read_state(tmp_path / 'one', 30)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), two['params'], one_state['params'])

  # SIGTERM to the launcher: every process saves at the one step JAX's preemption sync point names, all exit 75,
  # and the same launch resumes to parameters bit-identical to the uninterrupted two-process run.
  preempted = tmp_path / 'preempted'
  launcher = subprocess.Popen([sys.executable, '-m', 'jft.launch', '--processes=2', '--devices_per_process=2',
                               '--timeout=500', '--', f'--workdir={preempted}', *args, '--config.log_every=5'],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  stderr = sigterm_after_step(launcher, preempted, 5)
  assert launcher.returncode == 75, stderr[-3000:]
  assert stderr.count('jft: preempted by SIGTERM: saved the checkpoint of step') == 2  # process 0 and process 1
  resumed = subprocess.run([sys.executable, '-m', 'jft.launch', '--processes=2', '--devices_per_process=2',
                            '--timeout=500', '--', f'--workdir={preempted}', *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  jax.tree.map(np.testing.assert_array_equal, read_state(preempted, 30)['params'], two['params'])

  # Saved by 2 processes, restored bit-exactly in 1, and the run goes on as the uninterrupted one.
  result = subprocess.run([sys.executable, '-c', RESTORE_SCRIPT, str(tmp_path / 'two'), '10', '{}'],
                          cwd=ROOT, env=eight_devices(1), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and 'bit-exact' in result.stdout, result.stderr[-3000:]
  drop_steps_after(tmp_path / 'two', 10)
  resumed = subprocess.run([sys.executable, '-m', 'jft.main', f'--workdir={tmp_path / "two"}', *args], cwd=ROOT,
                           env=eight_devices(1), capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               read_state(tmp_path / 'two', 30)['params'], one_state['params'])
