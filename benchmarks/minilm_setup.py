"""The MiniLM classifier, a synthetic fortunes8-shaped batch and jitted train steps, shared by the benchmarks."""

import jax
import ml_collections
import numpy as np

from jft import optim, pretrained, rules, sharding
from jft import step as step_lib
from jft.apply_fn import linen_apply_fn, split_variables
from jft.models import BertClassifier
from jft.state import create_train_state

NUM_CLASSES = 8
OPTIM = dict(name='adamw', lr=1e-4, weight_decay=0.01, warmup_steps=10, schedule='linear', clip_norm=1.0,
             accumulate_steps=1)


class MiniLMSetup:
  """MiniLM + a new head (mean pooling) with pretrained encoder parameters, and one batch of token ids."""

  def __init__(self, batch_size: int, length: int):
    model = pretrained.load('minilm')
    self.config = model.config
    self.module = BertClassifier(model.config, num_classes=NUM_CLASSES, pooling='mean')
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

  def state_and_step(self, freeze: tuple[str, ...] = (), prunable=None):
    """(a fresh replicated train state, the jitted train step) with the parameters matching `freeze` frozen,
    and pruning masks for the `prunable` ones (a tree of bools) in the optimizer."""
    labels = self.labels(freeze)
    tx = optim.make_optimizer(ml_collections.ConfigDict(OPTIM), 1000, labels, prunable)
    params = jax.tree.map(np.array, self.params)  # a copy: the step donates the state
    state = sharding.put_replicated(create_train_state(params, self.model_state, tx, jax.random.PRNGKey(1)), self.mesh)
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(linen_apply_fn(self.module), tx, labels.trainable), self.mesh)
    return state, train_step
