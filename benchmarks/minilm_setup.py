"""The MiniLM classifier, a synthetic fortunes8-shaped batch, jitted train steps and FLOP counts, shared by the
benchmarks."""

import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from timing import interleaved_times

from jft import lora, optim, pretrained, rules, sharding
from jft import step as step_lib
from jft.apply_fn import linen_apply_fn, split_variables
from jft.models import BertClassifier, BertConfig
from jft.state import create_train_state

NUM_CLASSES = 8
OPTIM = dict(name='adamw', lr=1e-4, weight_decay=0.01, warmup_steps=10, schedule='linear', clip_norm=1.0,
             accumulate_steps=1)


class MiniLMSetup:
  """MiniLM + a new head (mean pooling) with pretrained encoder parameters, and one batch of token ids.
  `source`: the registered name or a Hugging Face directory of the encoder (any BERT of the same shape times alike);
  `dtype`: the compute dtype (`config.model.dtype`: 'bfloat16' computes in bf16, parameters stay float32)."""

  def __init__(self, batch_size: int, length: int, source: str = 'minilm', dtype: str = 'float32'):
    model = pretrained.load(source)
    self.config = model.config
    self.module = BertClassifier(model.config, num_classes=NUM_CLASSES, pooling='mean', dtype=dtype)
    rng = np.random.default_rng(0)
    self.batch = {
        'input_ids': rng.integers(1000, model.config.vocab_size, (batch_size, length)).astype(np.int32),
        'attention_mask': np.ones((batch_size, length), np.int32),
        'token_type_ids': np.zeros((batch_size, length), np.int32),
        'label': rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32),
    }
    one = {k: v[:1] for k, v in step_lib.model_inputs(self.batch).items()}
    params, self.model_state = split_variables(self.module.init(jax.random.PRNGKey(0), **one))
    self.params = {**params, **{k: v for k, v in model.variables['params'].items() if k in params}}
    self.mesh = sharding.make_mesh()
    self.device_batch = sharding.put_batch(self.batch, self.mesh)

  def labels(self, freeze: tuple[str, ...] = ()) -> rules.ParamLabels:
    return rules.resolve(self.params, freeze=freeze)

  def state_and_step(self, freeze: tuple[str, ...] = (), prunable=None, lora_settings: lora.LoraSettings | None = None):
    """(a fresh replicated train state, the jitted train step) with the parameters matching `freeze` frozen,
    pruning masks for the `prunable` ones (a tree of bools) in the optimizer, and LoRA adapters if `lora_settings`
    (the base frozen, the model seeing the merged weights)."""
    params, apply_fn = self.params, linen_apply_fn(self.module)
    if lora_settings is not None:
      params = lora.add_adapters(params, lora_settings, jax.random.PRNGKey(2))
      freeze = (*freeze, lora.freeze_rule(lora_settings))
      apply_fn = lora.wrap_apply_fn(apply_fn, lora_settings.scale)
    labels = rules.resolve(params, freeze=freeze)
    tx = optim.make_optimizer(ml_collections.ConfigDict(OPTIM), 1000, labels, prunable)
    params = jax.tree.map(np.array, params)  # a copy: the step donates the state
    state = sharding.put_replicated(create_train_state(params, self.model_state, tx, jax.random.PRNGKey(1)), self.mesh)
    train_step = step_lib.jit_train_step(step_lib.make_train_step(apply_fn, tx, labels.trainable), self.mesh)
    return state, train_step


def median_step_times(setup: MiniLMSetup, runs: dict[str, tuple], steps: int = 6) -> dict[str, float]:
  """Median seconds of each named (state, train step) of `runs` on `setup`'s batch, compiled first, then timed
  interleaved in rounds of 2 so machine noise hits them alike."""
  runs = {name: list(pair) for name, pair in runs.items()}

  def run(name):
    state, train_step = runs[name]
    runs[name][0], metrics = train_step(state, setup.device_batch)
    jax.block_until_ready(metrics)

  for name in runs:
    run(name)  # compile
  times = interleaved_times({name: lambda name=name: run(name) for name in runs}, steps, 2)
  return {name: statistics.median(t) for name, t in times.items()}


def forward_flops(config: BertConfig, batch: int, length: int, num_classes: int) -> float:
  """Multiply-adds x 2 of the encoder's matmuls and the head, for one forward pass."""
  hidden, inner = config.hidden_size, config.intermediate_size
  per_token_per_layer = (2 * 4 * hidden * hidden  # query, key, value, attention output
                         + 2 * 2 * hidden * inner  # the MLP's two matmuls
                         + 2 * 2 * length * hidden)  # scores q.k and the weighted sum of values
  return batch * (length * config.num_hidden_layers * per_token_per_layer + 2 * hidden * num_classes)


def matmul_peak_flops(size: int = 2048, repeats: int = 10) -> float:
  """The best FLOP/s of a float32 [size, size] @ [size, size] on the default device."""
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    dot(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best
