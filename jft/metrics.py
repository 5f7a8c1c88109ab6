"""Classification metrics: on-device sums per batch (masked), finished on the host from the totals."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax


def batch_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int) -> dict[str, jax.Array]:
  """Loss sum, example count and confusion matrix [true, predicted] of one batch; padding (mask 0) excluded."""
  mask = mask.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  predicted = jnp.argmax(logits, axis=-1)
  pairs = jax.nn.one_hot(labels, num_classes)[:, :, None] * jax.nn.one_hot(predicted, num_classes)[:, None, :]
  return {
      'loss_sum': jnp.sum(losses * mask),
      'count': jnp.sum(mask),
      'confusion': jnp.einsum('b,bij->ij', mask, pairs),
  }


def summarize(loss_sum: float, count: float, confusion: np.ndarray) -> dict[str, float]:
  """Loss, accuracy, macro precision/recall/F1 over all classes (0 where undefined), confusion matrix."""
  confusion = np.asarray(confusion, np.float64)
  true_positives = np.diag(confusion)
  predicted = confusion.sum(axis=0)
  actual = confusion.sum(axis=1)
  precision = np.divide(true_positives, predicted, out=np.zeros_like(true_positives), where=predicted > 0)
  recall = np.divide(true_positives, actual, out=np.zeros_like(true_positives), where=actual > 0)
  denominator = precision + recall
  f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
  return {
      'loss': float(loss_sum / count),
      'accuracy': float(true_positives.sum() / count),
      'macro_precision': float(precision.mean()),
      'macro_recall': float(recall.mean()),
      'macro_f1': float(f1.mean()),
      'count': int(count),
      'confusion_matrix': confusion.astype(np.int64).tolist(),
  }


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float]:
  """The exact McNemar test of two models on the same examples (bools: each example right or not).

  Only the discordant examples count: `a_only` right for A alone, `b_only` for B alone. Under the hypothesis that
  both models are equally accurate, a_only ~ Binomial(a_only + b_only, 1/2); `p_value` is the two-sided exact
  probability (doubled smaller tail, at most 1). `difference`: A's accuracy minus B's.
  """
  correct_a, correct_b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
  if correct_a.shape != correct_b.shape:
    raise ValueError(f'the two models were scored on different examples ({correct_a.shape} vs {correct_b.shape})')
  a_only, b_only = int(np.sum(correct_a & ~correct_b)), int(np.sum(~correct_a & correct_b))
  n = a_only + b_only
  tail = sum(math.comb(n, k) for k in range(min(a_only, b_only) + 1)) / 2**n
  return {'a_only': a_only, 'b_only': b_only, 'p_value': min(1.0, 2 * tail),
          'difference': float(np.mean(correct_a) - np.mean(correct_b)) if correct_a.size else 0.0}


def paired_difference_interval(correct_a: np.ndarray, correct_b: np.ndarray, confidence: float = 0.95,
                               resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
  """A bootstrap interval of A's accuracy minus B's, paired on the same examples.

  `correct_a`, `correct_b`: bools [examples] or [runs, examples] (e.g. one row per seed, each run paired with B's
  run of its row). The statistic is the mean over rows of (A's accuracy - B's); each resample draws the examples
  with replacement, the same draw for every row, so the interval is what the choice of test examples leaves
  uncertain (the spread between rows, e.g. seeds, is a separate matter: report it beside). Percentile interval.
  """
  correct_a, correct_b = np.atleast_2d(np.asarray(correct_a, bool)), np.atleast_2d(np.asarray(correct_b, bool))
  if correct_a.shape != correct_b.shape:
    raise ValueError(f'the two models were scored on different examples ({correct_a.shape} vs {correct_b.shape})')
  if not 0 < confidence < 1:
    raise ValueError(f'confidence must be in (0, 1), got {confidence}')
  # Per example, the mean over rows of (a - b): resampling examples and averaging gives the statistic.
  per_example = np.mean(correct_a.astype(np.float64) - correct_b, axis=0)
  draws = np.random.default_rng(seed).integers(0, per_example.size, (resamples, per_example.size))
  statistics = per_example[draws].mean(axis=1)
  tail = 100 * (1 - confidence) / 2
  low, high = np.percentile(statistics, [tail, 100 - tail])
  return float(low), float(high)
