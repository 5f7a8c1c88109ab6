"""The numeric fields of a run's config and the values each may take, checked before anything is written.

ml_collections already refuses a value of the wrong type on the command line (`--config.total_steps=ten`);
this catches what it lets through: a config built in Python with a string or a bool for a number, and numbers
out of range (`total_steps=0`, `optim.b2=1.5`, `prune.sparsity=1`, `optim.lr=nan`). The check walks this table,
not the config, so a field a config does not have is skipped; tests/test_bad_inputs.py asserts that every
numeric field of every config in configs/ has an entry here.
Relations between fields (buckets against max_len, a schedule against total_steps, a mesh against the
devices) are checked where they are used, beside the code that needs them.
"""

import dataclasses
import math
from typing import Any

import ml_collections

from jft.errors import UserError


@dataclasses.dataclass(frozen=True)
class Number:
  """A number of `kind` (an int is accepted where a float is) in [low, high]; `low_open` excludes low,
  `high_open` excludes high; `optional`: None is allowed; `sequence`: a tuple of such numbers (`empty`: () too);
  `or_minus_one`: -1 is allowed too (a mesh axis taking the rest of the devices); `why`: said after the range."""

  kind: type
  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  optional: bool = False
  sequence: bool = False
  empty: bool = False
  or_minus_one: bool = False
  why: str = ''

  def describe(self) -> str:
    noun = 'an integer' if self.kind is int else 'a number'
    if self.low is not None and self.high is not None:
      text = f'{noun} in {"(" if self.low_open else "["}{self.low:g}, {self.high:g}{")" if self.high_open else "]"}'
    elif self.low is not None:
      text = f'{noun} {">" if self.low_open else ">="} {self.low:g}'
    elif self.high is not None:
      text = f'{noun} {"<" if self.high_open else "<="} {self.high:g}'
    else:
      text = noun
    text = f'a tuple of {text.replace("an integer", "integers").replace("a number", "numbers")}' if self.sequence \
        else text
    text += (', or -1 for the rest' if self.or_minus_one else '') + (', or None' if self.optional else '')
    text += ', or ()' if self.empty else ''
    return f'{text} ({self.why})' if self.why else text

  def accepts(self, value: Any) -> bool:
    if value is None:
      return self.optional
    if self.sequence:
      return (isinstance(value, (tuple, list)) and (len(value) > 0 or self.empty)
              and all(map(self._accepts_one, value)))
    return self._accepts_one(value)

  def _accepts_one(self, value: Any) -> bool:
    kinds = (int,) if self.kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
      return False
    if self.or_minus_one and value == -1:
      return True
    if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
      return False
    return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))


POSITIVE_INT = Number(int, low=1)
COUNT = Number(int, low=0)
FRACTION = Number(float, low=0, high=1, high_open=True)  # dropout rates, sparsity, Adam's betas

OPTIM = {
    'lr': Number(float, low=0, low_open=True),
    'weight_decay': Number(float, low=0),
    'b1': FRACTION,
    'b2': FRACTION,
    'momentum': FRACTION,
    'warmup_steps': COUNT,
    'clip_norm': Number(float, low=0, low_open=True, optional=True),
    'accumulate_steps': POSITIVE_INT,
    'layer_decay': Number(float, low=0, high=1, low_open=True, optional=True),
}
FIELDS: dict[str, Number] = {
    'seed': Number(int, low=0, high=2**32 - 1),
    'batch_size': POSITIVE_INT,
    'total_steps': POSITIVE_INT,
    'log_every': POSITIVE_INT,
    'eval_every': POSITIVE_INT,
    'checkpoint_every': POSITIVE_INT,
    'skip_nonfinite': COUNT,
    'checkpoint.keep_latest': POSITIVE_INT,
    'checkpoint.keep_best': COUNT,
    'data.crop_padding': COUNT,
    'data.max_shift': COUNT,
    'data.image_size': Number(int, low=1, optional=True),
    'data.examples_per_class': Number(int, low=1, optional=True),
    'data.max_len': POSITIVE_INT,
    'data.buckets': Number(int, low=1, sequence=True, empty=True, why='() with data.num_buckets'),
    'data.num_buckets': Number(int, low=0, why='0: pad to data.buckets'),
    'data.sort_window': POSITIVE_INT,
    'model.features': Number(int, low=1, sequence=True),
    'model.hidden': POSITIVE_INT,
    'model.dropout': FRACTION,
    'model.head_dropout': FRACTION,
    **{f'optim.{name}': rule for name, rule in OPTIM.items()},
    'prune.sparsity': FRACTION,
    'prune.start_step': Number(int, low=1, why='the train loop counts its steps from 1, so a mask due at step 0 '
                               'would never be computed: use start_step=1 to prune before the first update'),
    'prune.end_step': Number(int, low=1, optional=True),
    'prune.every': POSITIVE_INT,
    'prune.cycles': POSITIVE_INT,
    'prune.initial_sparsity': FRACTION,
    'distill.weight': Number(float, low=0, high=1),
    'distill.temperature': Number(float, low=0, low_open=True),
    'early_stopping.patience': Number(int, low=1, optional=True, why='evaluations without improvement; None is off'),
    'early_stopping.min_delta': Number(float, low=0),
    'lora.rank': Number(int, low=0, why='0 is off'),
    'lora.alpha': Number(float, low=0, low_open=True),
    'mesh.data': Number(int, low=1, or_minus_one=True),
    'mesh.fsdp': Number(int, low=1, or_minus_one=True),
    'mesh.model': Number(int, low=1, or_minus_one=True),
    'sharding.min_bytes': COUNT,
}
# The numeric fields of a BERT config.json, also settable through config.model.overrides.
BERT_FIELDS: dict[str, Number] = {
    'vocab_size': POSITIVE_INT,
    'hidden_size': POSITIVE_INT,
    'num_hidden_layers': POSITIVE_INT,
    'num_attention_heads': POSITIVE_INT,
    'intermediate_size': POSITIVE_INT,
    'max_position_embeddings': POSITIVE_INT,
    'type_vocab_size': POSITIVE_INT,
    'layer_norm_eps': Number(float, low=0, low_open=True),
    'hidden_dropout_prob': FRACTION,
    'attention_probs_dropout_prob': FRACTION,
    'initializer_range': Number(float, low=0),
}


def check(config: ml_collections.ConfigDict) -> None:
  """Raises a UserError naming the first numeric field of `config` (stages' optim overrides included) whose
  value is of the wrong type or out of range, with the values it may take."""
  for path, rule in FIELDS.items():
    found, value = _lookup(config, path)
    if found:
      _check_value(f'config.{path}', value, rule)
  for i, stage in enumerate(config.get('stages') or ()):
    for name, value in dict(dict(stage).get('optim') or {}).items():  # their steps: jft/stages.py
      if name in OPTIM:
        _check_value(f'config.stages[{i}].optim.{name}', value, OPTIM[name])


def check_fields(where: str, fields: dict[str, Any], rules: dict[str, Number]) -> None:
  """The same check for a flat dict (e.g. a BERT config.json's fields), named `where.FIELD` in the message."""
  for name, rule in rules.items():
    if name in fields:
      _check_value(f'{where}.{name}', fields[name], rule)


def _check_value(name: str, value: Any, rule: Number) -> None:
  if not rule.accepts(value):
    raise UserError(f'{name} is {value!r} ({type(value).__name__}): make it {rule.describe()}')


def _lookup(config: Any, path: str) -> tuple[bool, Any]:
  node = config
  for name in path.split('.'):
    if node is None or not hasattr(node, 'keys') or name not in node.keys():
      return False, None
    node = node[name]
  return True, node
