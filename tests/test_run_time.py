"""jft/run_time.py: a run's wall time split into phases, and jax's time making programs."""

import time

import jax
import jax.numpy as jnp
import pytest

from jft import run_time


def test_phases_are_disjoint_and_the_rest_is_train():
  clock = run_time.RunTime(('setup', 'validation', 'test'))
  time.sleep(0.02)
  clock.since_start('setup')
  with clock.phase('validation'):
    time.sleep(0.05)
  time.sleep(0.03)  # training
  with clock.phase('validation'):
    time.sleep(0.05)
  seconds = clock.summary()
  assert set(seconds) == {'total', 'setup', 'validation', 'test', 'train', 'compile'}
  assert seconds['test'] == 0  # declared, never entered: still reported
  assert 0.02 <= seconds['setup'] < 0.5 and 0.1 <= seconds['validation'] < 0.6
  assert seconds['train'] >= 0.03
  assert seconds['setup'] + seconds['validation'] + seconds['train'] == pytest.approx(seconds['total'], rel=1e-9)

  with clock.phase('checkpoint'):  # a phase not declared up front joins on first use
    time.sleep(0.01)
  assert 0.01 <= clock.summary()['checkpoint'] < 0.5


def test_compile_counts_the_tracing_lowering_and_compiling_of_new_programs_only():
  clock = run_time.RunTime()
  x = jnp.ones((64, 64))
  jax.block_until_ready(x)
  before = clock.summary()['compile']

  @jax.jit
  def program(x):
    for _ in range(20):
      x = jnp.tanh(x @ x.T) + 1
    return x

  start = time.perf_counter()
  program(x).block_until_ready()
  first_call = time.perf_counter() - start
  compiled = clock.summary()['compile'] - before
  assert 0 < compiled <= first_call  # traced, lowered and compiled within the first call
  program(x).block_until_ready()  # cached: nothing new to make
  assert clock.summary()['compile'] - before == compiled
  program(jnp.ones((32, 64))).block_until_ready()  # a new shape is a new program
  assert clock.summary()['compile'] - before > compiled
