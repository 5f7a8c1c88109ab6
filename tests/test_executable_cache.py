"""Compiled programs kept under what they are built from (jft/executable_cache.py): loaded without tracing, the same
results as compiling, a new entry whenever anything the program comes from changes, bad entries compiled again."""

import importlib
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jft import cache_files, executable_cache, sharding


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
  monkeypatch.setattr(executable_cache, '_directory', tmp_path / 'executables')
  return tmp_path / 'executables'


def make_update():
  """A jitted `update(state, x)` with donated state, and a list that grows each time it is traced."""
  traces = []

  def update(state, x):
    traces.append(x.shape)
    return {'w': state['w'] * 0.5 + x.sum(0), 'count': state['count'] + 1}, {'norm': jnp.linalg.norm(x)}

  return jax.jit(update, donate_argnums=0), traces


def fresh_state():
  return {'w': jnp.arange(4.0), 'count': jnp.zeros((), jnp.int32)}


def counts_since(before):
  return {k: v - before[k] for k, v in executable_cache.counts().items()}


def test_a_second_process_loads_the_program_without_tracing_it(cache_dir):
  x = np.arange(12.0, dtype=np.float32).reshape(3, 4)
  first_update, first_traces = make_update()
  before = executable_cache.counts()
  expected = executable_cache.cached(first_update, 'update', 'lr=0.1')(fresh_state(), x)
  assert counts_since(before) == {'hits': 0, 'misses': 1, 'prefetched': 0} and first_traces == [(3, 4)]
  assert len(list(cache_dir.glob(f'*{executable_cache.SUFFIX}'))) == 1

  update, traces = make_update()  # as a new process would build it
  cached = executable_cache.cached(update, 'update', 'lr=0.1')
  state = fresh_state()
  before = executable_cache.counts()
  result = cached(state, x)
  assert counts_since(before) == {'hits': 1, 'misses': 0, 'prefetched': 0}
  assert traces == []  # neither traced nor lowered
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), result, expected))
  np.testing.assert_allclose(result[0]['w'], np.arange(4.0) * 0.5 + x.sum(0))  # by hand
  assert state['w'].is_deleted()  # the donation is kept
  again = cached(result[0], x)  # the next call runs the same program from memory
  assert counts_since(before) == {'hits': 1, 'misses': 0, 'prefetched': 0} and int(again[0]['count']) == 2


def test_anything_the_program_comes_from_makes_a_new_entry(cache_dir):
  x = np.ones((3, 4), np.float32)
  executable_cache.cached(make_update()[0], 'update', 'lr=0.1')(fresh_state(), x)
  before = executable_cache.counts()
  executable_cache.cached(make_update()[0], 'update', 'lr=0.2')(fresh_state(), x)  # another config
  executable_cache.cached(make_update()[0], 'other', 'lr=0.1')(fresh_state(), x)  # another function
  cached = executable_cache.cached(make_update()[0], 'update', 'lr=0.1')
  cached(fresh_state(), np.ones((5, 4), np.float32))  # another shape
  cached(fresh_state(), np.ones((3, 4), np.int32))  # another dtype
  assert counts_since(before) == {'hits': 0, 'misses': 4, 'prefetched': 0}
  assert len(list(cache_dir.glob(f'*{executable_cache.SUFFIX}'))) == 5


def test_a_sharding_is_part_of_the_signature(cache_dir):
  mesh = sharding.make_mesh(jax.devices()[:1])
  x = np.ones((2, 4), np.float32)
  replicated = jax.device_put(x, sharding.replicated(mesh))
  split = jax.device_put(x, sharding.batch_sharded(mesh))
  signature = executable_cache._signature
  assert signature((replicated,)) == signature((jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated.sharding),))
  assert signature((replicated,)) != signature((split,))


def test_a_changed_source_file_changes_the_key(tmp_path, monkeypatch, caplog):
  module_file = tmp_path / 'my_model.py'
  module_file.write_text('WIDTH = 4\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setattr(executable_cache, '_sources', {})
  monkeypatch.setattr(executable_cache, '_directory', tmp_path / 'executables')
  importlib.import_module('my_model')
  try:
    assert module_file.resolve() in executable_cache._source_files()  # a user's module outside the installation
    assert not any('site-packages' in str(path) for path in executable_cache._source_files())
    before = executable_cache.environment_digest()
    assert before is not None and executable_cache.environment_digest() == before
    os.utime(module_file, ns=(1, 1))  # touched, not changed: the same code
    assert executable_cache.environment_digest() == before
    module_file.write_text('WIDTH = 8\n')
    # This process may run the old code or the new (reloaded): its programs are neither loaded nor kept.
    update, _ = make_update()
    with caplog.at_level(logging.WARNING):
      assert executable_cache.environment_digest() is None
      assert executable_cache.cached(update, 'update') is update
    assert f'{module_file.resolve()} changed while this process ran' in caplog.text
    monkeypatch.setattr(executable_cache, '_sources', {})  # a new process reads the new code: a new key
    after = executable_cache.environment_digest()
    assert after is not None and after != before
  finally:
    del sys.modules['my_model']


@pytest.mark.parametrize(('setting', 'value', 'same_program'), [
    ('jax_log_compiles', True, True),  # JAX_LOG_COMPILES=1, to see whether a warm start compiles
    ('jax_explain_cache_misses', True, True),
    ('jax_persistent_cache_min_compile_time_secs', 7.0, True),
    ('jax_cpu_enable_async_dispatch', False, True),  # how CPU programs run (jft.main: inline), not what they are
    ('jax_default_matmul_precision', 'highest', False),  # another program
    ('jax_enable_x64', True, False),
])
def test_only_settings_that_can_change_the_program_are_in_the_key(setting, value, same_program):
  before = executable_cache.environment_digest()
  assert before is not None
  old = jax.config.values[setting]
  jax.config.update(setting, value)
  try:
    assert (executable_cache.environment_digest() == before) == same_program
  finally:
    jax.config.update(setting, old)
  assert executable_cache.environment_digest() == before


@pytest.mark.parametrize('damage', ['truncated', 'garbage', 'empty'])
def test_an_unreadable_entry_is_compiled_again(cache_dir, damage, caplog):
  x = np.ones((3, 4), np.float32)
  expected = executable_cache.cached(make_update()[0], 'update')(fresh_state(), x)
  (entry,) = cache_dir.glob(f'*{executable_cache.SUFFIX}')
  data = entry.read_bytes()
  entry.write_bytes({'truncated': data[:len(data) // 2], 'garbage': b'not a program' * 100, 'empty': b''}[damage])
  update, traces = make_update()
  before = executable_cache.counts()
  with caplog.at_level(logging.WARNING):
    result = executable_cache.cached(update, 'update')(fresh_state(), x)
  assert f'could not load the compiled program {entry}' in caplog.text and 'compiling again' in caplog.text
  assert counts_since(before) == {'hits': 0, 'misses': 1, 'prefetched': 0} and traces == [(3, 4)]
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), result, expected))
  assert entry.read_bytes() != data[:len(data) // 2] and len(entry.read_bytes()) > 100  # stored again, whole


def test_compiling_in_the_background_loads_or_compiles_on_a_thread(cache_dir):
  x = np.ones((3, 4), np.float32)
  abstract = (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), fresh_state()),
              jax.ShapeDtypeStruct(x.shape, x.dtype))
  cold, warm = {'hits': 0, 'misses': 1, 'prefetched': 0}, {'hits': 1, 'misses': 0, 'prefetched': 0}
  for expected in (cold, warm):  # the second time as a new process would
    update, traces = make_update()
    cached = executable_cache.cached(update, 'update')
    before = executable_cache.counts()
    program = cached.compile_in_background(*abstract).result()
    assert counts_since(before) == expected and len(traces) == expected['misses']
    assert cached(fresh_state(), x)[0]['count'] == 1 and len(traces) == expected['misses']  # that program runs
    assert cached.programs == {executable_cache._signature(abstract): program}


def test_the_least_recently_used_entries_go_first(tmp_path):
  for age, name in enumerate(('old', 'middle', 'new')):
    path = tmp_path / f'{name}{executable_cache.SUFFIX}'
    path.write_bytes(b'x' * 100)
    os.utime(path, (1000 + age, 1000 + age))
  cache_files.evict(tmp_path, executable_cache.SUFFIX, 250)
  kept = sorted(path.name for path in tmp_path.iterdir())
  assert kept == [f'{name}{executable_cache.SUFFIX}' for name in ('middle', 'new')]


def test_off_or_in_several_processes_the_jitted_function_is_used_as_it_is(monkeypatch):
  update, _ = make_update()
  monkeypatch.setattr(executable_cache, '_directory', None)
  assert executable_cache.cached(update, 'update') is update


def test_a_cache_that_cannot_be_written_still_loads_and_runs(cache_dir, monkeypatch, caplog):
  x = np.ones((3, 4), np.float32)
  expected = executable_cache.cached(make_update()[0], 'update')(fresh_state(), x)  # kept while writable

  def refuse(*_, **__):
    raise PermissionError('read-only file system')

  monkeypatch.setattr(cache_files.os, 'utime', refuse)
  monkeypatch.setattr(cache_files, 'write_atomically', refuse)
  before = executable_cache.counts()
  with caplog.at_level(logging.WARNING):
    loaded = executable_cache.cached(make_update()[0], 'update')(fresh_state(), x)
    compiled = executable_cache.cached(make_update()[0], 'update')(fresh_state(), np.ones((5, 4), np.float32))
  assert counts_since(before) == {'hits': 1, 'misses': 1, 'prefetched': 0}
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), loaded, expected))
  assert int(compiled[0]['count']) == 1 and 'could not keep the compiled program' in caplog.text


def test_the_first_program_a_function_ran_is_loaded_ahead_next_time(cache_dir, monkeypatch):
  monkeypatch.setattr(executable_cache, '_prefetched', {})
  x = np.ones((3, 4), np.float32)
  first = executable_cache.cached(make_update()[0], 'update', 'lr=0.1')
  expected = first(fresh_state(), x)
  first(fresh_state(), np.ones((5, 4), np.float32))  # a second shape: not the first program
  (remembered,) = cache_dir.glob(f'*{executable_cache.FIRST}')
  assert remembered.read_text() == first.path(executable_cache._signature((fresh_state(), x))).name

  executable_cache.prefetch('update', 'lr=0.2')  # never run: nothing to load
  assert executable_cache._prefetched == {}
  executable_cache.prefetch('update', 'lr=0.1')  # as a new process does before its data is read
  (loading,) = executable_cache._prefetched.values()
  loading.result()  # loaded on its thread
  update, traces = make_update()
  before = executable_cache.counts()
  result = executable_cache.cached(update, 'update', 'lr=0.1')(fresh_state(), x)
  assert counts_since(before) == {'hits': 1, 'misses': 0, 'prefetched': 1} and traces == []
  assert executable_cache._prefetched == {}  # taken by the call
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), result, expected))
