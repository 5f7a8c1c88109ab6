"""What bf16 compute and rematerialisation save in memory: the compiled train step of a BERT-base-shaped classifier
(12 layers, hidden 768, random init) + AdamW, float32 and bfloat16, each without and with remat, as ratios to
float32 without remat. It only compiles (on abstract shapes); no step runs and no parameters are allocated.

python benchmarks/remat_memory.py [--layers=12] [--hidden=768] [--vocab_size=30522] [--batch_size=8] [--length=128]
Per variant, `compiled.memory_analysis()` of the jitted step (state donated, as jft.main runs it): temporaries (the
activations kept for the backward pass and the gradients live here), arguments (params + AdamW state + batch),
outputs, and the total the step needs (arguments + outputs - donated aliases + temporaries). Parameters and
optimizer state stay float32 under bf16, so only the temporaries move.

On CPU, XLA's default concurrency-optimised scheduler runs the recomputation early and remat saves nothing; run with
XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false to see what it saves under a memory-minimising one.
"""

import json
import os

import jax
import ml_collections
import numpy as np
from absl import app, flags
from minilm_setup import OPTIM

from jft import optim, sharding
from jft import step as step_lib
from jft.apply_fn import linen_apply_fn, split_variables
from jft.models import BertClassifier, BertConfig
from jft.state import create_train_state

_LAYERS = flags.DEFINE_integer('layers', 12, 'encoder layers')
_HIDDEN = flags.DEFINE_integer('hidden', 768, 'hidden size (heads of 64, MLP 4x)')
_VOCAB = flags.DEFINE_integer('vocab_size', 30522, 'word embeddings')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'examples per step')
_LENGTH = flags.DEFINE_integer('length', 128, 'tokens per example')
VARIANTS = {'float32': ('float32', False), 'float32+remat': ('float32', True), 'bfloat16': ('bfloat16', False),
            'bfloat16+remat': ('bfloat16', True)}
FIELDS = {'temp': 'temp_size_in_bytes', 'argument': 'argument_size_in_bytes', 'output': 'output_size_in_bytes',
          'alias': 'alias_size_in_bytes'}


def step_memory(config: BertConfig, dtype: str, remat: bool, batch: dict[str, jax.ShapeDtypeStruct]) -> dict:
  """The compiled train step's memory analysis, in bytes, for one variant."""
  module = BertClassifier(config, num_classes=8, pooling='mean', dtype=dtype, remat=remat)
  example = {k: np.zeros((1, _LENGTH.value), np.int32) for k in step_lib.model_inputs(batch)}
  tx = optim.make_optimizer(ml_collections.ConfigDict(OPTIM), 1000)
  abstract_state = jax.eval_shape(
      lambda key: create_train_state(*split_variables(module.init(key, **example)), tx, jax.random.PRNGKey(1)),
      jax.random.PRNGKey(0))
  train_step = step_lib.jit_train_step(step_lib.make_train_step(linen_apply_fn(module), tx), sharding.make_mesh())
  memory = train_step.lower(abstract_state, batch).compile().memory_analysis()
  row = {name: int(getattr(memory, attribute)) for name, attribute in FIELDS.items()}
  return {**row, 'total': row['argument'] + row['output'] - row['alias'] + row['temp']}


def main(_):
  config = BertConfig(vocab_size=_VOCAB.value, hidden_size=_HIDDEN.value, num_hidden_layers=_LAYERS.value,
                      num_attention_heads=_HIDDEN.value // 64, intermediate_size=4 * _HIDDEN.value)
  shape = (_BATCH.value, _LENGTH.value)
  batch = {k: jax.ShapeDtypeStruct(shape if k != 'label' else shape[:1], np.int32)
           for k in ('input_ids', 'attention_mask', 'label')}
  rows = {name: step_memory(config, dtype, remat, batch) for name, (dtype, remat) in VARIANTS.items()}
  base = rows['float32']
  print(f'BERT {config.num_hidden_layers} x {config.hidden_size}, vocab {config.vocab_size}, batch '
        f'{_BATCH.value} x {_LENGTH.value}, AdamW; {jax.devices()[0].device_kind}, '
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"{'variant':<15} {'temp MiB':>9} {'arg MiB':>8} {'out MiB':>8} {'total MiB':>10} {'temp / f32':>11} "
        f"{'total / f32':>12}")
  for name, row in rows.items():
    row['temp_ratio'], row['total_ratio'] = row['temp'] / base['temp'], row['total'] / base['total']
    print(f"{name:<15} {row['temp'] / 2**20:>9.1f} {row['argument'] / 2**20:>8.1f} {row['output'] / 2**20:>8.1f} "
          f"{row['total'] / 2**20:>10.1f} {row['temp_ratio']:>11.3f} {row['total_ratio']:>12.3f}")
  print(json.dumps({'layers': config.num_hidden_layers, 'hidden': config.hidden_size, 'vocab': config.vocab_size,
                    'batch': _BATCH.value, 'length': _LENGTH.value, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
                    'rows': rows}))


if __name__ == '__main__':
  app.run(main)
