"""The train step's programs made on threads ahead of the steps that need them (jft/compile_ahead.py): in the order
the batches first need them, at most `workers` at a time, each run by its step without tracing or compiling it
again, whether the step is a plain `jax.jit` function or one kept by jft/executable_cache.py."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jft import compile_ahead, executable_cache, sharding
from jft.errors import UserError


def make_step():
  """A jitted `step(state, batch)` with donated state, and the (length, traced on the main thread) of each trace."""
  traces = []

  def step(state, batch):
    traces.append((batch['input_ids'].shape[1], threading.current_thread() is threading.main_thread()))
    tokens = (batch['input_ids'] * batch['attention_mask']).sum()
    return {'w': state['w'] + tokens, 'count': state['count'] + 1}, {'tokens': tokens}

  return jax.jit(step, donate_argnums=0), traces


def batch_of(length, mesh):
  """A text batch of 4 rows padded to `length`, row i holding i + 1 tokens of 2, with a teacher's logits (no length
  axis) as a hook would add them."""
  ids = np.where(np.arange(length) < np.arange(1, 5)[:, None], 2, 0).astype(np.int32)
  return sharding.put_batch({'input_ids': ids, 'attention_mask': (ids != 0).astype(np.int32),
                             'token_type_ids': np.zeros_like(ids), 'label': np.arange(4, dtype=np.int32),
                             'teacher_logits': np.zeros((4, 3), np.float32)}, mesh)


def fresh_state(mesh):
  return sharding.put_replicated({'w': jnp.zeros((), jnp.int32), 'count': jnp.zeros((), jnp.int32)}, mesh)


@pytest.fixture
def mesh():
  return sharding.make_mesh(jax.devices()[:1])


def test_the_abstract_batch_changes_only_the_length_axis(mesh):
  abstract = compile_ahead.at_length(batch_of(8, mesh), 16)
  assert {k: v.shape for k, v in abstract.items()} == {
      'input_ids': (4, 16), 'attention_mask': (4, 16), 'token_type_ids': (4, 16), 'label': (4,),
      'teacher_logits': (4, 3)}
  assert abstract['teacher_logits'].dtype == np.float32 and abstract['label'].sharding == sharding.batch_sharded(mesh)
  assert compile_ahead.batch_length(batch_of(8, mesh)) == 8 and compile_ahead.batch_length({'image': 0}) is None


@pytest.mark.parametrize('kept', [False, True], ids=['jit', 'executable_cache'])
def test_each_coming_length_is_made_once_on_a_thread_and_its_step_runs_it(mesh, kept, tmp_path, monkeypatch):
  step, traces = make_step()
  if kept:
    monkeypatch.setattr(executable_cache, '_directory', tmp_path / 'executables')
    step = executable_cache.cached(step, 'step')
  state = step(fresh_state(mesh), batch_of(8, mesh))[0]  # the stage's first step, made here
  ahead = compile_ahead.CompileAhead(step, state, batch_of(8, mesh), [8, 16, 8, 4, 16, 32], workers=1)
  assert list(ahead.queue) == [4, 32] and list(ahead.making) == [16]  # first needed, first made; one at a time
  for length in (16, 8, 4, 16, 32):
    ahead.before_step(batch_of(length, mesh))
    state, metrics = step(state, batch_of(length, mesh))
    assert int(metrics['tokens']) == 2 * (1 + 2 + 3 + 4)  # the padding changes nothing
  assert not ahead.queue and not ahead.making
  assert sorted(traces) == [(4, False), (8, True), (16, False), (32, False)]  # each once, the others on threads
  assert int(state['count']) == 6 and int(state['w']) == 6 * 20


def test_a_step_whose_length_is_still_queued_makes_its_own(mesh):
  step, traces = make_step()
  state = step(fresh_state(mesh), batch_of(8, mesh))[0]
  ahead = compile_ahead.CompileAhead(step, state, batch_of(8, mesh), [16, 32], workers=1)
  making_16 = ahead.making[16]
  ahead.before_step(batch_of(32, mesh))  # 32 comes first after all: taken off the queue, made by its step
  assert 32 not in ahead.queue
  state, _ = step(state, batch_of(32, mesh))
  making_16.result()
  assert sorted(traces) == [(8, True), (16, False), (32, True)]


def test_a_failed_program_is_made_again_by_its_step(mesh, caplog):
  step, traces = make_step()
  state = step(fresh_state(mesh), batch_of(8, mesh))[0]
  ahead = compile_ahead.CompileAhead(step, state, batch_of(8, mesh), [16], workers=1)
  ahead.making[16].result()
  failed = ahead.making[16] = executable_cache.run_on_thread(lambda: 1 / 0)  # as if it had failed
  failed.exception()
  ahead.before_step(batch_of(16, mesh))
  assert 'making the train step ahead for length 16 failed (ZeroDivisionError' in caplog.text
  assert int(step(state, batch_of(16, mesh))[1]['tokens']) == 20


def test_half_the_cores_make_programs_at_a_time_and_at_least_two_unless_told(monkeypatch):
  monkeypatch.setattr('os.cpu_count', lambda: 2)
  assert compile_ahead.workers({}) == 2 and compile_ahead.workers({'JFT_COMPILE_AHEAD': ''}) == 2
  monkeypatch.setattr('os.cpu_count', lambda: 16)
  assert compile_ahead.workers({}) == 8
  assert [compile_ahead.workers({'JFT_COMPILE_AHEAD': n}) for n in ('0', '3')] == [0, 3]  # 0: none ahead
  with pytest.raises(UserError, match="JFT_COMPILE_AHEAD='two' is not a count"):
    compile_ahead.workers({'JFT_COMPILE_AHEAD': 'two'})
