"""Where metrics go: `metrics.jsonl` (one JSON object per line) and TensorBoard event files (no TensorFlow)."""

import json
import os
from typing import Any

import tensorboardX


class MetricWriter:
  """Appends `{'step', 'split', **metrics}` lines and scalars; on resume, forgets lines of the lost steps.

  Only one process of a multi-host run writes (`enabled`); the others' writes do nothing.
  """

  def __init__(self, workdir: str, resume_step: int | None = None, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if os.path.exists(self.path):
      self._keep_lines_up_to(resume_step or 0)
    self.tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def _keep_lines_up_to(self, step: int) -> None:
    # Lines past the restored checkpoint belong to progress the restart recomputes; the final test line
    # is always recomputed.
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    kept = [line for line in lines
            if json.loads(line)['step'] <= step and json.loads(line)['split'] != 'test']
    if len(kept) != len(lines):
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(kept)
      os.replace(tmp, self.path)

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, 'split': split, **metrics}) + '\n')
    for name, value in metrics.items():
      if isinstance(value, (int, float)):
        self.tensorboard.add_scalar(f'{split}/{name}', value, step)
    self.tensorboard.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self.tensorboard.close()
