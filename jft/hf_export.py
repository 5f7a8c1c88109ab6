"""A BERT run in the formats other tools load: Hugging Face `transformers` (`hf`) and PEFT LoRA adapters (`peft`).

`hf` writes a directory in Hugging Face layout: `config.json` (the `init` model's, with the run's overrides),
`model.safetensors` with Hugging Face tensor names, and the tokenizer files of the `init` model. LoRA adapters
are merged first (pruned weights stay zero). With `model.pooling='pooler'` the directory is a
`BertForSequenceClassification` (`bert.*` + `classifier.*`, `num_labels`, `id2label`); with 'mean' or 'cls' it is
a `BertModel` without a pooler (load it with `add_pooling_layer=False`), and the new head is saved beside it in
`head.safetensors` (`weight` [num_labels, hidden] and `bias`, as a `torch.nn.Linear`) with `head_config.json`
(the pooling, the labels): logits = head(mean of the last hidden states over the real tokens) for 'mean', of
the first token's for 'cls'. `jft.pretrained.load(OUT)` gives back the encoder's parameters bit for bit.

`peft` writes a LoRA run's encoder adapters as PEFT saves them: `adapter_model.safetensors`
(`base_model.model.{module}.lora_A.weight` [rank, in] and `lora_B.weight` [out, rank]) and `adapter_config.json`
(`r`, `lora_alpha`, `target_modules`: the adapted modules' full names, `base_model_name_or_path`: the `init`
model's directory), so that `PeftModel.from_pretrained(BertModel.from_pretrained(BASE), OUT)` is the fine-tuned
encoder and `merge_and_unload()` merges it; the head travels in the `hf` export.
"""

import json
import os
import re
import shutil
from typing import Any

import ml_collections
import numpy as np
from safetensors.numpy import save_file

from jft import data, lora, model_files, pretrained, pruning, rules, tree_paths
from jft.errors import UserError
from jft.init import Run

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.txt')
SAFETENSORS_METADATA = {'format': 'pt'}  # what transformers checks before it loads a safetensors file


def _bert_config(run: Run) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(run.config)
  if config.model.name != 'bert':
    raise UserError(f'{run.state_dir} is a run of model {config.model.name!r}; the hf and peft formats are for BERT '
                    'runs (use --format=jft-pruned for the others)')
  return config


def _class_names(config: ml_collections.ConfigDict, num_labels: int) -> list[str]:
  try:
    names = list(data.class_names(config.data.name, config.data.get('data_dir'), config.data.get('classes')))
  except Exception:  # the dataset's package is not here: the labels keep their numbers
    names = []
  return names if len(names) == num_labels else [f'LABEL_{i}' for i in range(num_labels)]


def export_hf(run: Run, out: str) -> dict[str, Any]:
  """Writes the `hf` directory `out` of a run's step; returns what it wrote (files, tensors, labels)."""
  config = _bert_config(run)
  params = dict(lora.merged_for_run(run.params, run.config))  # a copy: the head is taken out of it
  head = params.pop('head')
  architecture = config.model.architecture
  source_dir = model_files.pretrained_dir(architecture)
  with open(os.path.join(source_dir, 'config.json')) as f:
    hf_config = json.load(f)
  hf_config.update(dict(config.model.get('overrides') or {}))
  num_labels = int(np.asarray(head['bias']).shape[0])
  labels = _class_names(config, num_labels)
  pooling = config.model.get('pooling', 'mean')
  os.makedirs(out, exist_ok=True)
  head_weight, head_bias = np.ascontiguousarray(np.asarray(head['kernel']).T), np.asarray(head['bias'])
  if pooling == 'pooler':
    tensors = {**pretrained.to_hf_tensors(params, prefix='bert.'), 'classifier.weight': head_weight,
               'classifier.bias': head_bias}
    hf_config.update(architectures=['BertForSequenceClassification'], num_labels=num_labels,
                     id2label={str(i): name for i, name in enumerate(labels)},
                     label2id={name: i for i, name in enumerate(labels)}, problem_type='single_label_classification')
  else:
    tensors = pretrained.to_hf_tensors(params)
    hf_config.update(architectures=['BertModel'])
    save_file({'weight': head_weight, 'bias': head_bias}, os.path.join(out, 'head.safetensors'),
              metadata=SAFETENSORS_METADATA)
    with open(os.path.join(out, 'head_config.json'), 'w') as f:
      json.dump({'pooling': pooling, 'num_labels': num_labels, 'id2label': dict(enumerate(labels)),
                 'head_dropout': config.model.get('head_dropout')}, f, indent=2)
  hf_config.pop('_name_or_path', None)
  save_file(tensors, os.path.join(out, 'model.safetensors'), metadata=SAFETENSORS_METADATA)
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(hf_config, f, indent=2)
  copied = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(source_dir, name))]
  for name in copied:
    shutil.copyfile(os.path.join(source_dir, name), os.path.join(out, name))
  return {'out': out, 'format': 'hf', 'architectures': hf_config['architectures'], 'tensors': len(tensors),
          'labels': labels, 'tokenizer_files': copied, 'step': run.step}


def export_peft(run: Run, out: str) -> dict[str, Any]:
  """Writes the `peft` directory `out` of a LoRA run's step; returns what it wrote."""
  config = _bert_config(run)
  settings = lora.settings(config)
  if settings is None or not lora.has_adapters(run.params):
    raise UserError(f'{run.state_dir} is not a LoRA run (config.lora.rank is 0): it has no adapters to export; use '
                    '--format=hf for the whole model')
  if pruning.is_on(config.get('prune')):
    raise UserError('this LoRA run also pruned: PEFT would add its adapters to the pruned weights as well, so the '
                    'merged model would not be sparse; use --format=hf, which merges with the zeros kept')
  flat = tree_paths.flatten(run.params)
  trained_encoder = [path for path in flat if not path.startswith('head/') and not re.fullmatch(lora.ADAPTER, path)
                     and rules.matches_any(path, settings.train)]
  if trained_encoder:
    raise UserError(f'config.lora.train also trains encoder parameters ({", ".join(trained_encoder[:3])}), which '
                    'PEFT adapters alone do not carry; use --format=hf for the whole fine-tuned model')
  init = config.get('init')
  if not init or not (model_files.is_registered(init) or os.path.isfile(os.path.join(init, 'config.json'))):
    raise UserError(f'the run started from init={init!r}, not from a Hugging Face model, so PEFT has no base model '
                    'to put the adapters on; use --format=hf')
  tensors, modules = {}, []
  for path in flat:
    if not re.fullmatch(lora.ADAPTER, path) or not path.endswith('lora_a'):
      continue
    kernel = path.removesuffix('lora_a') + 'kernel'
    try:
      module = pretrained.hf_module_name(kernel)
    except ValueError:
      raise UserError(f'{kernel} has adapters but no Hugging Face module to put them on; narrow '
                      'config.lora.targets to the encoder\'s kernels for a PEFT export') from None
    modules.append(module)
    tensors[f'base_model.model.{module}.lora_A.weight'] = np.ascontiguousarray(np.asarray(flat[path]).T)
    tensors[f'base_model.model.{module}.lora_B.weight'] = np.ascontiguousarray(
        np.asarray(flat[path.removesuffix('lora_a') + 'lora_b']).T)
  os.makedirs(out, exist_ok=True)
  save_file(tensors, os.path.join(out, 'adapter_model.safetensors'), metadata=SAFETENSORS_METADATA)
  adapter_config = {
      'peft_type': 'LORA', 'task_type': 'FEATURE_EXTRACTION', 'r': settings.rank, 'lora_alpha': settings.alpha,
      'target_modules': sorted(modules), 'lora_dropout': 0.0, 'bias': 'none', 'fan_in_fan_out': False,
      'base_model_name_or_path': model_files.pretrained_dir(init), 'inference_mode': True, 'modules_to_save': None,
      'init_lora_weights': True, 'use_rslora': False, 'use_dora': False,
  }
  with open(os.path.join(out, 'adapter_config.json'), 'w') as f:
    json.dump(adapter_config, f, indent=2)
  return {'out': out, 'format': 'peft', 'modules': len(modules), 'rank': settings.rank, 'alpha': settings.alpha,
          'base': adapter_config['base_model_name_or_path'], 'step': run.step}
