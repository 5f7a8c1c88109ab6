"""Where metrics go: `metrics.jsonl` (one JSON object per line) and TensorBoard event files (no TensorFlow)."""

import json
import os
import time
from typing import Any

import jax
import numpy as np
import tensorboardX
from etils import epath


class MetricWriter:
  """Appends `{'step', 'split', **metrics}` lines and scalars; on resume, forgets lines of the lost steps.

  Only one process of a multi-host run writes (`enabled`); the others' writes do nothing. The work directory
  may be local or remote (`gs://...`, through etils.epath); a remote file cannot be appended to, so there
  the whole file is rewritten on each write (it holds a line per log step).
  """

  def __init__(self, workdir: str | os.PathLike, resume_step: int | None = None, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    self.path = epath.Path(workdir) / 'metrics.jsonl'
    self.local = '://' not in str(self.path)
    self.lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
    self._keep_lines_up_to(resume_step or 0)
    self.tensorboard = tensorboardX.SummaryWriter(str(epath.Path(workdir) / 'tensorboard'))

  def _keep_lines_up_to(self, step: int) -> None:
    # Lines past the restored checkpoint belong to progress the restart recomputes; the final test line
    # is always recomputed.
    lines = [line for line in self.lines if line.strip()]
    kept = [line for line in lines if json.loads(line)['step'] <= step and json.loads(line)['split'] != 'test']
    if len(kept) != len(self.lines):
      tmp = self.path.parent / (self.path.name + '.tmp')
      tmp.write_text(''.join(kept))
      tmp.replace(self.path)
    self.lines = kept

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    line = json.dumps({'step': step, 'split': split, **metrics}) + '\n'
    self.lines.append(line)
    if self.local:
      with self.path.open('a') as f:
        f.write(line)
    else:
      self.path.write_text(''.join(self.lines))
    for name, value in metrics.items():
      if isinstance(value, (int, float)):
        self.tensorboard.add_scalar(f'{split}/{name}', value, step)
    self.tensorboard.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self.tensorboard.close()


class TrainLog:
  """The train metrics between two log lines: their means, and the steps per second of training alone."""

  def __init__(self):
    self.pending, self.start = [], time.perf_counter()
    self.startup, self.untimed = {}, 0

  def add(self, metrics: dict[str, jax.Array]) -> None:
    self.pending.append(metrics)

  def first_step_done(self, startup: dict[str, float]) -> None:
    """Facts about the start of the run (e.g. `seconds_to_first_step`), reported with the next flush. The first
    step (it compiles) leaves the steps/s clock when its window has other steps to time."""
    self.startup, self.untimed, self.start_after_first = startup, len(self.pending), time.perf_counter()

  def flush(self) -> dict[str, float]:
    """The means of the metrics added since the last flush, `steps_per_sec`, and once the startup facts.
    Steps whose update was skipped (`nonfinite`, jft/divergence.py) are counted, not averaged in."""
    pending = jax.device_get(self.pending)
    skipped = sum(int(metrics.pop('nonfinite', 0)) for metrics in pending)
    finite = [metrics for metrics in pending if all(np.isfinite(v) for v in metrics.values())]
    means = {k: float(v) for k, v in jax.tree.map(lambda *x: np.mean(x), *finite).items()} if finite else {}
    if skipped:
      means['nonfinite_steps'] = skipped
    timed, start = len(self.pending), self.start
    if 0 < self.untimed < timed:
      timed, start = timed - self.untimed, self.start_after_first
    means['steps_per_sec'] = timed / (time.perf_counter() - start)
    means.update(self.startup)
    self.pending, self.startup, self.untimed = [], {}, 0
    return means

  def resume_clock(self) -> None:
    """After a flush, restarts the clock, so the evaluations and saves since are not counted."""
    if not self.pending:
      self.start = time.perf_counter()
