"""The optimizer: one optax transformation built from `config.optim`."""

from typing import Any

import jax
import ml_collections
import optax

from jft.errors import UserError

PyTree = Any
SCHEDULES = ('cosine', 'linear', 'constant')


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine or linear decay to 0 (or constant)."""
  if optim.schedule not in SCHEDULES:
    raise UserError(f'unknown config.optim.schedule {optim.schedule!r}; use one of {SCHEDULES}')
  warmup = min(optim.warmup_steps, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  if optim.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(optim.lr, decay_steps)
  elif optim.schedule == 'linear':
    decay = optax.linear_schedule(optim.lr, 0.0, decay_steps)
  else:
    decay = optax.constant_schedule(optim.lr)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup])


def decay_mask(params: PyTree) -> PyTree:
  """Weight decay on matrices and kernels (ndim >= 2); not on biases or normalisation scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """Clipping (optional), then AdamW or SGD with momentum on the schedule, with masked weight decay."""
  if optim.lr <= 0:
    raise UserError(f'config.optim.lr must be positive, got {optim.lr}')
  schedule = make_schedule(optim, total_steps)
  if optim.name == 'adamw':
    tx = optax.adamw(schedule, b1=optim.get('b1', 0.9), b2=optim.get('b2', 0.999),
                     weight_decay=optim.weight_decay, mask=decay_mask)
  elif optim.name == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
                     optax.sgd(schedule, momentum=optim.get('momentum', 0.9), nesterov=True))
  else:
    raise UserError(f"unknown config.optim.name {optim.name!r}; use 'adamw' or 'sgd'")
  if optim.get('clip_norm'):
    tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm), tx)
  if optim.get('accumulate_steps', 1) > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=optim.accumulate_steps)
  return tx
