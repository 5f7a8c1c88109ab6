"""The one interface through which an optional feature joins the train loop.

The loop is: next batch -> put on the mesh -> each hook's `before_step` (the state) and `on_batch` (the batch)
-> the step -> log (each hook's `report`) / evaluate / save; the final test line adds each hook's `summary`.
A feature (the pruning schedule, the teacher) is a `Hook` its own module owns; `jft.components` builds them.
Hooks run outside the jitted step, so what they do to the state is itself jitted with explicit shardings.
"""

from typing import Any

TrainState = Any
Batch = dict[str, Any]


class Hook:
  """Does nothing by default: a feature overrides what it needs."""

  def before_step(self, step: int, state: TrainState) -> TrainState:
    """The state train step `step` starts from (e.g. with new pruning masks)."""
    del step
    return state

  def on_batch(self, batch: Batch) -> Batch:
    """The batch the step sees, on the mesh (e.g. with a teacher's logits added)."""
    return batch

  def report(self, state: TrainState) -> dict[str, float]:
    """Metrics for the train log line."""
    del state
    return {}

  def summary(self, state: TrainState) -> dict[str, float]:
    """Metrics for the final test line."""
    del state
    return {}
