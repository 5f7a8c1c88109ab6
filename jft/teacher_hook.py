"""The teacher in the train loop (`config.distill`): its eval-mode logits added to each batch as a feature.

A `Hook` (jft/hooks.py): the teacher's forward pass is its own jitted function, its variables laid out on the
mesh by the FSDP rule (a teacher may be larger than its student), the batch and the logits split over the batch
axes. The teacher is neither trained nor checkpointed; the student's loss (`jft.distill.make_loss`) reads the
logits from `batch[distill.TEACHER_LOGITS]`.
"""

from typing import Any

import jax
from jax.sharding import Mesh

from jft import distill, hooks, sharding
from jft import step as step_lib
from jft.apply_fn import ApplyFn

PyTree = Any


class TeacherLogits(hooks.Hook):
  """Adds the logits of `apply_fn` on (`params`, `model_state`) to every batch; `specs` lays out the params."""

  def __init__(self, apply_fn: ApplyFn, params: PyTree, model_state: PyTree, mesh: Mesh, specs: PyTree):
    params_sharding = sharding.named(mesh, specs)
    model_state_sharding = sharding.replicated(mesh)
    self.params = sharding.put(params, params_sharding)
    self.model_state = sharding.put(model_state, jax.tree.map(lambda _: model_state_sharding, model_state))
    self.logits = step_lib.jit_logits_fn(step_lib.make_logits_fn(apply_fn), mesh,
                                         (params_sharding, model_state_sharding))

  def on_batch(self, batch: hooks.Batch) -> hooks.Batch:
    return {**batch, distill.TEACHER_LOGITS: self.logits(self.params, self.model_state, batch)}
