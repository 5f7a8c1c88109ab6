"""The best validation result so far, and early stopping once it has not improved for `patience` evaluations.

`config.early_stopping = dict(metric='accuracy', mode='max', patience=K, min_delta=0.0)`: after each validation,
the run stops once K evaluations in a row failed to beat the best by more than `min_delta` (patience None: off).
`config.test_on = 'best'` (the default where there is a validation split) tests the checkpoint of the best
validation result by `config.checkpoint.best_metric`: the loop saves a checkpoint at every evaluation that sets
a new best, so that step is always there. Both records travel in each checkpoint (its `progress` item), so a
resumed run remembers its best and its patience, and re-running a run that stopped early tests again without
training on.
"""

import dataclasses
import math
from typing import Any

import ml_collections

from jft.errors import UserError

MODES = ('max', 'min')
TEST_ON = ('best', 'last')


@dataclasses.dataclass
class Best:
  """The best value of `metric` (higher is better for mode 'max'), its step, and the evaluations since it."""

  metric: str
  mode: str = 'max'
  min_delta: float = 0.0
  value: float | None = None
  step: int | None = None
  evals_since: int = 0

  def __post_init__(self):
    if self.mode not in MODES:
      raise UserError(f'the mode of {self.metric!r} is {self.mode!r}; use one of {MODES}')

  def update(self, step: int, metrics: dict[str, Any]) -> bool:
    """Takes one evaluation's metrics; True if it is the new best (NaN never is)."""
    if self.metric not in metrics:
      raise UserError(f'the validation metrics have no {self.metric!r} to pick the best by; use one of '
                      f'{sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))}')
    value = float(metrics[self.metric])
    gain = (value - self.value if self.mode == 'max' else self.value - value) if self.value is not None else math.inf
    if math.isnan(value) or not gain > self.min_delta:
      self.evals_since += 1
      return False
    self.value, self.step, self.evals_since = value, step, 0
    return True

  def to_json(self) -> dict[str, Any]:
    return dict(value=self.value, step=self.step, evals_since=self.evals_since)

  def load(self, saved: dict[str, Any] | None) -> None:
    """Continues from `to_json()` of a checkpoint (None or {}: from the start)."""
    if saved:
      self.value, self.step, self.evals_since = saved['value'], saved['step'], saved['evals_since']


@dataclasses.dataclass
class EarlyStopping(Best):
  """`Best` that says `stop` once `patience` evaluations in a row have not improved on it."""

  patience: int = 1

  @property
  def stop(self) -> bool:
    return self.evals_since >= self.patience

  def stopped(self, saved: dict[str, Any] | None) -> bool:
    """Whether the run that saved the record `saved` (`to_json()`; None or {}: none) had stopped."""
    return bool(saved) and saved['evals_since'] >= self.patience


def from_config(config: ml_collections.ConfigDict) -> EarlyStopping | None:
  """The early stopping of `config.early_stopping`; None when it is absent or its patience is None."""
  settings = config.get('early_stopping')
  if not settings or settings.get('patience') is None:
    return None
  if not config.data.get('validation_split'):
    raise UserError('config.early_stopping needs a validation split to watch: set config.data.validation_split, '
                    'or set early_stopping.patience=None')
  return EarlyStopping(metric=settings.metric, mode=settings.mode, min_delta=settings.get('min_delta', 0.0),
                       patience=settings.patience)


def test_on(config: ml_collections.ConfigDict) -> str:
  """'best' or 'last': which state the final test evaluates ('last' when there is no validation split)."""
  choice = config.get('test_on', 'best')
  if choice not in TEST_ON:
    raise UserError(f'config.test_on is {choice!r}; use one of {TEST_ON}')
  return choice if config.data.get('validation_split') else 'last'
