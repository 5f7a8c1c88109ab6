"""The pure train and eval steps, and their one `jax.jit` over the device mesh."""

import concurrent.futures
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jft import divergence, executable_cache, rules, sharding
from jft import metrics as metrics_lib
from jft.apply_fn import ApplyFn
from jft.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
NOT_INPUTS = ('label', 'mask', 'index', 'teacher_logits')
EXAMPLES = 'examples'  # the per-example part of an eval step's output
LossFn = Callable[[jax.Array, Batch], jax.Array]


def cross_entropy_loss(logits: jax.Array, batch: Batch) -> jax.Array:
  """Mean softmax cross-entropy of `logits` against `batch['label']`, in float32."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch['label']))


def model_inputs(batch: Batch) -> Batch:
  """The batch features the model takes as keyword arguments: everything but labels, eval mask and index, and
  targets."""
  return {k: v for k, v in batch.items() if k not in NOT_INPUTS}


def make_train_step(apply_fn: ApplyFn, tx: optax.GradientTransformation, trainable: Any = None,
                    loss_fn: LossFn = cross_entropy_loss,
                    axis_name: str | None = None) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """`train_step(state, batch) -> (state, metrics)`: `loss_fn(logits, batch)`, one optimizer update, not applied
  when the loss or gradient norm is NaN or inf (metric `nonfinite` 1; jft/divergence.py).

  The loss defaults to softmax cross-entropy; `distill.make_loss` adds a teacher's soft targets.

  `trainable` (a tree of bools shaped like the params; None: all) says which parameters are differentiated:
  the backward pass stops at the lowest trainable parameter, and frozen ones are carried over untouched.

  `axis_name`: the step runs on one device's part of the batch under `jax.pmap` over that axis; gradients,
  model state (BatchNorm statistics) and metrics are averaged over it, and each device draws its own dropout.
  Under `jax.jit` (None) the step sees the global batch and the compiler places the collectives.
  """
  def mean_over_devices(tree):
    if axis_name is None:
      return tree
    mean = lambda x: jax.lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree.map(mean, tree)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    mask = jax.tree.map(lambda _: True, state.params) if trainable is None else trainable
    trainable_params, frozen_params = rules.split_trainable(state.params, mask)

    def objective(trainable_params):
      params = rules.merge_trainable(trainable_params, frozen_params)
      logits, model_state = apply_fn(params, state.model_state, model_inputs(batch), True, rng)
      return loss_fn(logits, batch), (logits, model_state)

    (loss, (logits, model_state)), trainable_grads = jax.value_and_grad(objective, has_aux=True)(trainable_params)
    trainable_grads, model_state = mean_over_devices((trainable_grads, model_state))
    metrics = mean_over_devices({
        'loss': loss,
        # Over the labelled examples: a label of -1 marks a text only a teacher labels (jft/distill.py).
        'accuracy': jnp.sum((jnp.argmax(logits, -1) == batch['label']) & (batch['label'] >= 0))
                    / jnp.maximum(jnp.sum(batch['label'] >= 0), 1),
        'grad_norm': optax.tree.norm(trainable_grads),
    })

    def apply_update():
      # Frozen parameters get zero gradients, which the optimizer's freezing discards (XLA removes them).
      grads = rules.merge_trainable(trainable_grads, jax.tree.map(jnp.zeros_like, frozen_params))
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      return optax.apply_updates(trainable_params, rules.split_trainable(updates, mask)[0]), opt_state, model_state

    # A NaN or inf loss or gradient: the update is not applied (jft/divergence.py); the step still counts.
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
    new_trainable, opt_state, model_state = divergence.update_if_finite(
        finite, apply_update, (trainable_params, state.opt_state, state.model_state))
    params = rules.merge_trainable(new_trainable, frozen_params)  # frozen: the very same arrays
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state)
    return new_state, {**metrics, 'nonfinite': jnp.logical_not(finite).astype(jnp.int32)}

  return train_step


def make_eval_step(apply_fn: ApplyFn, num_classes: int) -> Callable[[TrainState, Batch], Metrics]:
  """`eval_step(state, batch) -> sums` (loss sum, count, confusion matrix) over the batch's unmasked examples, and
  under `EXAMPLES` each example's predicted class, label, mask (and `index` in its split, where the batch has it)."""

  def eval_step(state: TrainState, batch: Batch) -> Metrics:
    logits, _ = apply_fn(state.params, state.model_state, model_inputs(batch), False, state.rng)
    sums = metrics_lib.batch_sums(logits, batch['label'], batch['mask'], num_classes)
    examples = {'prediction': jnp.argmax(logits, axis=-1), 'label': batch['label'], 'mask': batch['mask']}
    if 'index' in batch:
      examples['index'] = batch['index']
    return {**sums, EXAMPLES: examples}

  return eval_step


def make_logits_fn(apply_fn: ApplyFn) -> Callable[[Any, Any, Batch], jax.Array]:
  """`logits(params, model_state, batch)`: the model's eval-mode (deterministic) logits, e.g. a teacher's."""

  def logits(params, model_state, batch: Batch) -> jax.Array:
    return apply_fn(params, model_state, model_inputs(batch), False, jax.random.PRNGKey(0))[0]

  return logits


def jit_logits_fn(logits_fn: Callable, mesh: Mesh, variables_sharding: tuple[Any, Any] | None = None
                  ) -> Callable[[Any, Any, Batch], jax.Array]:
  """Compiles `logits_fn`: (params, model_state) laid out by `variables_sharding` (default replicated), the batch
  and the logits split over the mesh's batch axes."""
  replicated, batch_sharded = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  params_sharding, model_state_sharding = variables_sharding or (replicated, replicated)
  return jax.jit(logits_fn, in_shardings=(params_sharding, model_state_sharding, batch_sharded),
                 out_shardings=batch_sharded)


def jit_train_step(train_step: Callable, mesh: Mesh,
                   state_sharding: Any = None) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Compiles the step once: the state laid out by `state_sharding` (default replicated) and donated, the batch
  split over the mesh's batch axes, the metrics replicated."""
  replicated = sharding.replicated(mesh)
  state_sharding = replicated if state_sharding is None else state_sharding
  return jax.jit(train_step, in_shardings=(state_sharding, sharding.batch_sharded(mesh)),
                 out_shardings=(state_sharding, replicated), donate_argnums=0)


def compile_in_background(jitted: Callable, *abstract_args: Any) -> concurrent.futures.Future:
  """Traces and lowers `jitted` for `abstract_args` (shape-dtype structs with shardings, or arrays) here, then
  compiles it, or loads it from the compilation cache, on a thread: XLA does that without the GIL, so the caller
  can meanwhile build the real arguments in Python (a step kept by jft/executable_cache.py is loaded there
  without tracing). Once the future is done, a call of `jitted` on arguments of those shapes and shardings runs
  that program (neither traced nor compiled again)."""
  if isinstance(jitted, executable_cache.Executables):
    return jitted.compile_in_background(*abstract_args)
  return executable_cache.run_on_thread(jitted.lower(*abstract_args).compile)


def jit_eval_step(eval_step: Callable, mesh: Mesh,
                  state_sharding: Any = None) -> Callable[[TrainState, Batch], Metrics]:
  replicated = sharding.replicated(mesh)
  state_sharding = replicated if state_sharding is None else state_sharding
  return jax.jit(eval_step, in_shardings=(state_sharding, sharding.batch_sharded(mesh)), out_shardings=replicated)


def evaluate(eval_step: Callable[[TrainState, Batch], Metrics], state: TrainState, batches: Any,
             mesh: Mesh, keep_predictions: bool = False) -> dict[str, float] | tuple[dict[str, float], dict]:
  """Metrics over every example of `batches` (numpy dicts with a `mask`), summed on device, finished on host.

  `keep_predictions`: also {'index', 'label', 'prediction'} (numpy, padding dropped, in index order) for paired
  comparisons of two models on the same examples (`metrics.mcnemar`); the batches must carry an `index`.
  """
  totals, kept = None, []
  for local_batch in batches:
    sums = eval_step(state, sharding.put_batch(local_batch, mesh))
    examples = sums.pop(EXAMPLES)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if keep_predictions:
      kept.append(examples)
  totals = jax.device_get(totals)
  metrics = metrics_lib.summarize(totals['loss_sum'], totals['count'], totals['confusion'])
  if not keep_predictions:
    return metrics
  kept = jax.device_get(kept)
  if kept and 'index' not in kept[0]:
    raise ValueError('keep_predictions needs batches with an `index` (data.eval_batches gives one)')
  mask = np.concatenate([k['mask'] for k in kept]) if kept else np.zeros(0, bool)
  columns = {name: np.concatenate([k[name] for k in kept])[mask] if kept else np.zeros(0, np.int32)
             for name in ('index', 'label', 'prediction')}
  order = np.argsort(columns['index'], kind='stable')
  return metrics, {name: column[order] for name, column in columns.items()}
