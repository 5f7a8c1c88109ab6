"""What a start pays for the MiniLM train step before it runs: tracing, lowering, compiling, and loading the
compiled program back (what a warm start does instead of compiling), with the program's size.

python benchmarks/trace_step.py [--batch_size=32] [--length=64]
Prints seconds for each phase (one fresh process: the first trace is the one a run pays), the traced program's
top-level equations, the optimised HLO's instructions (and of them `xor`: mostly the Philox rounds of the dropout
masks) and the serialized executable's bytes, whose load is timed as jax's compilation cache does it
(`jax.experimental.serialize_executable`: the same backend deserialisation).
"""

import json
import time

from absl import app, flags
from jax.experimental import serialize_executable
from minilm_setup import MiniLMSetup
from timing import machine

_BATCH = flags.DEFINE_integer('batch_size', 32, 'examples per step')
_LENGTH = flags.DEFINE_integer('length', 64, 'tokens per example')
_LOADS = flags.DEFINE_integer('loads', 3, 'timed loads of the compiled program')


def timed(fn):
  start = time.perf_counter()
  result = fn()
  return result, time.perf_counter() - start


def main(_):
  setup = MiniLMSetup(_BATCH.value, _LENGTH.value)
  state, train_step = setup.state_and_step()
  traced, trace_s = timed(lambda: train_step.trace(state, setup.device_batch))
  lowered, lower_s = timed(traced.lower)
  compiled, compile_s = timed(lowered.compile)
  instructions = [line for line in compiled.as_text().splitlines() if ' = ' in line]
  serialized, in_tree, out_tree = serialize_executable.serialize(compiled)
  load_s = [timed(lambda: serialize_executable.deserialize_and_load(serialized, in_tree, out_tree))[1]
            for _ in range(_LOADS.value)]
  result = {'machine': machine(), 'batch_size': _BATCH.value, 'length': _LENGTH.value, 'trace_s': trace_s,
            'lower_s': lower_s, 'compile_s': compile_s, 'load_s': load_s, 'equations': len(traced.jaxpr.eqns),
            'hlo_instructions': len(instructions),
            'hlo_xor': sum(' xor(' in line for line in instructions), 'serialized_bytes': len(serialized)}
  print(f'machine: {machine()}; MiniLM train step at {_BATCH.value} x {_LENGTH.value}')
  print(f'trace {trace_s:.2f} s ({result["equations"]} top-level equations), lower {lower_s:.2f} s, compile '
        f'{compile_s:.1f} s ({result["hlo_instructions"]} HLO instructions, {result["hlo_xor"]} xor), load '
        f'{min(load_s):.2f}-{max(load_s):.2f} s ({len(serialized) / 1e6:.1f} MB serialized)')
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
