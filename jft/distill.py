"""Knowledge distillation: the student also learns the softened predictions of a fixed teacher.

Hinton et al. (2015): loss = (1 - w) * CE(student, labels) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T)).
The T^2 keeps the soft term's gradients on the scale of the hard one as T changes. The teacher's logits are a
batch feature (`teacher_logits`), computed by a separate jitted forward pass of the teacher in eval mode before
each step: deterministic, so a resumed run sees exactly the logits an uninterrupted one saw, and the teacher's
parameters are neither trained, nor in the optimizer, nor in the checkpoints.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jft.errors import UserError

TEACHER_LOGITS = 'teacher_logits'
Batch = dict[str, jax.Array]
LossFn = Callable[[jax.Array, Batch], jax.Array]


def check_settings(weight: float, temperature: float) -> None:
  if not 0.0 <= weight <= 1.0:
    raise UserError(f'config.distill.weight must be in [0, 1] (the share of the distillation term), got {weight}')
  if not temperature > 0:
    raise UserError(f'config.distill.temperature must be positive, got {temperature}')


def distillation_loss(logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, weight: float,
                      temperature: float) -> jax.Array:
  """Per-example (1 - w) * CE(logits, labels) + w * T^2 * KL(teacher_T || student_T), in float32."""
  logits, teacher_logits = logits.astype(jnp.float32), teacher_logits.astype(jnp.float32)
  hard = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  soft = optax.losses.kl_divergence_with_log_targets(jax.nn.log_softmax(logits / temperature),
                                                     jax.nn.log_softmax(teacher_logits / temperature))
  return (1.0 - weight) * hard + weight * temperature**2 * soft


def make_loss(weight: float, temperature: float) -> LossFn:
  """`loss(logits, batch)` for `step.make_train_step`: distillation against `batch['teacher_logits']`.

  Examples labelled -1 (unlabelled texts a teacher labels, `data.unlabeled`) count in the soft term only:
  the hard term is the mean over the labelled examples, the soft term over all.
  """
  check_settings(weight, temperature)

  def loss(logits: jax.Array, batch: Batch) -> jax.Array:
    if TEACHER_LOGITS not in batch:
      raise ValueError(f'distillation needs batch[{TEACHER_LOGITS!r}]: add the teacher logits to each batch')
    labelled = batch['label'] >= 0
    labels = jnp.where(labelled, batch['label'], 0)  # any valid class: the hard term of these is dropped
    per_example = distillation_loss(logits, batch[TEACHER_LOGITS], labels, 0.0, temperature)  # the hard term
    hard = jnp.sum(jnp.where(labelled, per_example, 0.0)) / jnp.maximum(jnp.sum(labelled), 1)
    soft = jnp.mean(distillation_loss(logits, batch[TEACHER_LOGITS], labels, 1.0, temperature))
    return (1.0 - weight) * hard + weight * soft

  return loss
