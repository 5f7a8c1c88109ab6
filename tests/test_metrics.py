import jax
import numpy as np
import pytest
from sklearn import metrics as skm

from jft import metrics


def test_summary_matches_sklearn_and_ignores_padding():
  rng = np.random.default_rng(0)
  num_classes, n, pad = 4, 50, 14
  labels = rng.integers(0, num_classes, n + pad)
  logits = rng.normal(size=(n + pad, num_classes)).astype(np.float32)
  logits[np.arange(n + pad), labels] += 1.0  # better than chance, so the metrics are not degenerate
  mask = np.arange(n + pad) < n
  labels[n:] = 0  # padding rows: whatever they hold must not count

  sums = jax.device_get(metrics.batch_sums(logits, labels, mask, num_classes))
  summary = metrics.summarize(sums['loss_sum'], sums['count'], sums['confusion'])

  y, predicted = labels[:n], logits[:n].argmax(-1)
  precision, recall, f1, _ = skm.precision_recall_fscore_support(
      y, predicted, labels=range(num_classes), average='macro', zero_division=0)
  assert summary['count'] == n
  np.testing.assert_allclose(summary['accuracy'], skm.accuracy_score(y, predicted), rtol=1e-6)
  np.testing.assert_allclose(summary['macro_precision'], precision, rtol=1e-6)
  np.testing.assert_allclose(summary['macro_recall'], recall, rtol=1e-6)
  np.testing.assert_allclose(summary['macro_f1'], f1, rtol=1e-6)
  np.testing.assert_allclose(summary['loss'], skm.log_loss(y, jax.nn.softmax(logits[:n]), labels=range(4)),
                             rtol=1e-5)
  np.testing.assert_array_equal(summary['confusion_matrix'],
                                skm.confusion_matrix(y, predicted, labels=range(num_classes)))


def test_class_never_predicted_scores_zero_not_nan():
  confusion = np.array([[3, 0], [2, 0]])  # class 1 is never predicted
  summary = metrics.summarize(loss_sum=1.0, count=5, confusion=confusion)
  assert summary['accuracy'] == 0.6
  np.testing.assert_allclose(summary['macro_precision'], (3 / 5 + 0) / 2)
  np.testing.assert_allclose(summary['macro_recall'], (1 + 0) / 2)
  np.testing.assert_allclose(summary['macro_f1'], (2 * 0.6 * 1 / 1.6 + 0) / 2)


def test_mcnemar_by_hand_and_against_scipy():
  from scipy import stats
  a = np.array([1, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0, 1], bool)
  b = np.array([1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0], bool)
  # discordant: A alone right on 5 (indices 1, 2, 7, 8, 11), B alone on 1 (index 4): n = 6,
  # P(X <= 1) = (1 + 6) / 64, two-sided 14 / 64
  result = metrics.mcnemar(a, b)
  assert (result['a_only'], result['b_only']) == (5, 1)
  assert result['p_value'] == 14 / 64 and result['difference'] == (8 - 4) / 12
  rng = np.random.default_rng(0)
  for _ in range(20):
    a, b = rng.random(300) < rng.random(), rng.random(300) < rng.random()
    result = metrics.mcnemar(a, b)
    n = result['a_only'] + result['b_only']
    np.testing.assert_allclose(result['p_value'], stats.binomtest(result['a_only'], n, 0.5).pvalue, rtol=1e-9)
  assert metrics.mcnemar(a, a)['p_value'] == 1.0  # no discordant example


def test_paired_difference_interval_by_hand_and_against_the_normal_approximation():
  assert metrics.paired_difference_interval(np.ones(50, bool), np.zeros(50, bool)) == (1.0, 1.0)
  # Two runs (rows): example 0 gains 1 point in run 0 only, example 1 in run 1 only. Averaged over the runs
  # each example gains 0.5, so every resample of examples gives 0.5, though each run alone varies with the draw.
  a, b = np.array([[1, 0], [1, 1]], bool), np.array([[0, 0], [1, 0]], bool)
  assert metrics.paired_difference_interval(a, b) == (0.5, 0.5)
  # Many examples: the percentile interval approaches mean +- 1.96 standard errors of the per-example differences.
  rng = np.random.default_rng(1)
  a, b = rng.random(4000) < 0.78, rng.random(4000) < 0.75
  low, high = metrics.paired_difference_interval(a, b)
  differences = a.astype(float) - b
  center, standard_error = differences.mean(), differences.std(ddof=1) / np.sqrt(differences.size)
  np.testing.assert_allclose([low, high], [center - 1.96 * standard_error, center + 1.96 * standard_error],
                             atol=0.1 * standard_error)
  with pytest.raises(ValueError, match='different examples'):
    metrics.paired_difference_interval(np.ones(3, bool), np.ones(4, bool))
