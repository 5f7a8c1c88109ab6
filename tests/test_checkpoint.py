import asyncio
import gc
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jft.checkpoint import Checkpoints
from jft.errors import UserError
from jft.state import TrainState, create_train_state


def small_state(step=0, width=3):
  params = {'dense': {'kernel': jnp.arange(2.0 * width).reshape(2, width), 'bias': jnp.ones(width)}}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  state = create_train_state(params, {'batch_stats': {'mean': jnp.zeros(width)}}, tx, jax.random.PRNGKey(7))
  return state.replace(step=jnp.asarray(step, jnp.int32)), tx


def test_round_trip_keeps_values_and_optimizer_state_types(tmp_path):
  state, tx = small_state(step=5)
  grads = jax.tree.map(jnp.ones_like, state.params)
  _, opt_state = tx.update(grads, state.opt_state, state.params)
  state = state.replace(opt_state=opt_state)
  checkpoints = Checkpoints(str(tmp_path))
  checkpoints.save(state, {'epoch': 1, 'index': 42}, {'seed': 0})
  checkpoints.wait()

  restored, data_state = Checkpoints(str(tmp_path)).restore(5, jax.eval_shape(lambda: state))
  assert isinstance(restored, TrainState)
  assert data_state == {'epoch': 1, 'index': 42}
  assert jax.tree.structure(restored) == jax.tree.structure(state)  # optax NamedTuples intact
  assert type(restored.opt_state[1][0]).__name__ == 'ScaleByAdamState'
  jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_keeps_latest_and_best(tmp_path):
  checkpoints = Checkpoints(str(tmp_path), keep_latest=2, keep_best=1, best_metric='accuracy')
  accuracy = {10: 0.5, 20: 0.9, 30: 0.6, 40: 0.7, 50: 0.65}
  for step, value in accuracy.items():
    checkpoints.save(small_state(step)[0], {}, {}, metrics={'accuracy': value})
    checkpoints.wait()
  assert checkpoints.all_steps() == [20, 40, 50]
  assert checkpoints.best_step() == 20


def test_minimising_best_metric(tmp_path):
  checkpoints = Checkpoints(str(tmp_path), keep_latest=1, keep_best=1, best_metric='loss', best_mode='min')
  for step, loss in {1: 0.3, 2: 0.1, 3: 0.2, 4: 0.4}.items():
    checkpoints.save(small_state(step)[0], {}, {}, metrics={'loss': loss})
  checkpoints.wait()
  assert checkpoints.all_steps() == [2, 4]


def test_restore_into_other_model_names_each_mismatch(tmp_path):
  checkpoints = Checkpoints(str(tmp_path))
  checkpoints.save(small_state(step=1)[0], {}, {})
  checkpoints.wait()
  wider, _ = small_state(step=1, width=4)
  with pytest.raises(UserError) as error:
    checkpoints.restore(1, jax.eval_shape(lambda: wider))
  message = str(error.value)
  assert 'dense/kernel: expected (2, 4), found (2, 3)' in message
  assert 'dense/bias: expected (4,), found (3,)' in message


def test_best_checkpoint_survives_a_restart(tmp_path):
  first = Checkpoints(str(tmp_path), keep_latest=1, keep_best=1)
  for step, value in {1: 0.8, 2: 0.5}.items():
    first.save(small_state(step)[0], {}, {}, metrics={'accuracy': value})
  first.close()
  second = Checkpoints(str(tmp_path), keep_latest=1, keep_best=1)
  second.save(small_state(3)[0], {}, {}, metrics={'accuracy': 0.6})
  second.wait()
  assert second.all_steps() == [1, 3]
  assert second.best_step() == 1


def test_asyncio_reports_of_the_other_writers_of_a_failed_save_are_dropped_and_others_kept(tmp_path, caplog):
  # When one of orbax's writer tasks fails (disk full), asyncio reports each other failed task when it is
  # collected, with a traceback, often at exit after jft's own message (seen in CI). The coroutine's name carries
  # 'orbax' as orbax's own do in asyncio's report ("coro=<...> defined at .../orbax/...").
  Checkpoints(str(tmp_path))  # installs the filter

  async def orbax_like_write(message):
    raise ValueError(message)

  def report_of_a_task_never_retrieved(message):
    loop = asyncio.new_event_loop()
    task = loop.create_task(orbax_like_write(message))
    loop.run_until_complete(asyncio.wait([task]))
    loop.close()
    del task
    gc.collect()

  with caplog.at_level(logging.ERROR, logger='asyncio'):
    report_of_a_task_never_retrieved('RESOURCE_EXHAUSTED: Failed to write 3440640 bytes: No space left on device')
    assert not [r for r in caplog.records if 'never retrieved' in r.getMessage()]
    report_of_a_task_never_retrieved('a bug of its own')  # not a storage failure: still reported
    reported = [r for r in caplog.records if 'never retrieved' in r.getMessage()]
    assert len(reported) == 1 and 'a bug of its own' in str(reported[0].exc_info[1])
