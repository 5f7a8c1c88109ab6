"""Export to Hugging Face layout and to PEFT adapters (jft/hf_export.py): the inverse of `jft.pretrained.load`, bit
for bit, with LoRA merged; PEFT's tensor names, shapes and config. (That transformers and peft load these and
compute the same outputs is checked by scripts/check_exports.py, which needs PyTorch; its numbers are in the
README.)"""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jft import lora, model_files, pretrained, tree_paths
from jft.errors import UserError
from jft.hf_export import export_hf, export_peft
from jft.init import Run
from jft.models import bert_classifier

TINY = dict(model_type='bert', vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=24, max_position_embeddings=128, type_vocab_size=2, hidden_act='gelu',
            layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, initializer_range=0.02,
            architectures=['BertModel'])


@pytest.fixture(scope='module')
def tiny_bert(tmp_path_factory):
  """A small BERT in Hugging Face layout with MiniLM's tokenizer, random weights, and a pooler."""
  directory = tmp_path_factory.mktemp('tiny_bert')
  with open(directory / 'config.json', 'w') as f:
    json.dump(TINY, f)
  module = bert_classifier(8, architecture=str(directory), pooling='pooler')
  ids = np.ones((1, 4), np.int32)
  params = module.init(jax.random.PRNGKey(0), ids)['params']
  encoder = {k: v for k, v in params.items() if k != 'head'}
  save_file(pretrained.to_hf_tensors(encoder), str(directory / 'model.safetensors'), metadata={'format': 'pt'})
  for name in ('tokenizer.json', 'vocab.txt'):
    os.symlink(model_files.pretrained_file('minilm', name), directory / name)
  return directory


def run_of(tiny_bert, pooling='mean', rank=0, **config):
  """A `Run` as `jft.init.read_run` returns it: a fine-tuned-looking classifier (random, LoRA factors non-zero)."""
  module = bert_classifier(8, architecture=str(tiny_bert), pooling=pooling)
  params = module.init(jax.random.PRNGKey(1), np.ones((1, 4), np.int32))['params']
  lora_config = dict(rank=rank, alpha=2.0 * rank, targets=lora.DEFAULT_TARGETS, train=('head/.*',))
  if rank:
    settings = lora.settings(_config(lora=lora_config))
    params = lora.add_adapters(params, settings, jax.random.PRNGKey(2))
    flat = tree_paths.flatten(params)
    keys = iter(jax.random.split(jax.random.PRNGKey(3), len(flat)))
    params = tree_paths.unflatten({p: jax.random.normal(next(keys), v.shape) if p.endswith('lora_b') else v
                                   for p, v in flat.items()})
  run_config = dict(model=dict(name='bert', architecture=str(tiny_bert), pooling=pooling, overrides={}),
                    data=dict(name='fortunes8', data_dir=None, classes=None), init=str(tiny_bert),
                    lora=lora_config, prune=dict(sparsity=0.0), **config)
  return Run(state_dir='RUN', step=12, config=run_config, params=jax.tree.map(np.asarray, params))


def _config(**fields):
  import ml_collections
  return ml_collections.ConfigDict(fields)


def test_hf_export_of_a_lora_run_loads_back_as_the_merged_encoder_bit_for_bit(tiny_bert, tmp_path):
  run = run_of(tiny_bert, rank=4)
  summary = export_hf(run, str(tmp_path))
  assert summary['architectures'] == ['BertModel'] and 'tokenizer.json' in summary['tokenizer_files']
  merged = lora.merged_for_run(run.params, run.config)
  loaded = pretrained.load(str(tmp_path))
  expected = tree_paths.flatten({k: v for k, v in merged.items() if k != 'head'})
  got = tree_paths.flatten(loaded.variables['params'])
  assert set(got) == set(expected)
  for path in expected:
    np.testing.assert_array_equal(got[path], expected[path], err_msg=path)
  assert not np.array_equal(got['encoder/layer_0/attention/query/kernel'],
                            run.params['encoder']['layer_0']['attention']['query']['kernel'])  # LoRA was merged
  head = load_file(str(tmp_path / 'head.safetensors'))
  np.testing.assert_array_equal(head['weight'], merged['head']['kernel'].T)
  np.testing.assert_array_equal(head['bias'], merged['head']['bias'])
  head_config = json.loads((tmp_path / 'head_config.json').read_text())
  assert head_config['pooling'] == 'mean' and head_config['num_labels'] == 8
  assert head_config['id2label']['0'] in ('LABEL_0', 'art')
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['hidden_size'] == 16 and config['model_type'] == 'bert'


def test_hf_export_with_the_pooler_is_a_sequence_classifier(tiny_bert, tmp_path):
  run = run_of(tiny_bert, pooling='pooler')
  export_hf(run, str(tmp_path))
  tensors = load_file(str(tmp_path / 'model.safetensors'))
  assert 'bert.pooler.dense.weight' in tensors and 'bert.encoder.layer.1.output.dense.weight' in tensors
  np.testing.assert_array_equal(tensors['classifier.weight'], run.params['head']['kernel'].T)
  np.testing.assert_array_equal(tensors['bert.encoder.layer.0.attention.self.query.weight'],
                                run.params['encoder']['layer_0']['attention']['query']['kernel'].T)
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['architectures'] == ['BertForSequenceClassification'] and config['num_labels'] == 8
  assert len(config['id2label']) == 8 and config['label2id'][config['id2label']['3']] == 3
  assert not (tmp_path / 'head.safetensors').exists()
  loaded = tree_paths.flatten(pretrained.load(str(tmp_path)).variables['params'])  # the 'bert.' prefix is read too
  np.testing.assert_array_equal(loaded['pooler/kernel'], run.params['pooler']['kernel'])


def test_peft_export_has_peft_names_shapes_and_config(tiny_bert, tmp_path):
  run = run_of(tiny_bert, rank=4)
  summary = export_peft(run, str(tmp_path))
  assert summary['modules'] == 2 * 6
  tensors = load_file(str(tmp_path / 'adapter_model.safetensors'))
  query = run.params['encoder']['layer_1']['attention']['query']
  np.testing.assert_array_equal(tensors['base_model.model.encoder.layer.1.attention.self.query.lora_A.weight'],
                                query['lora_a'].T)  # [rank, in]
  np.testing.assert_array_equal(tensors['base_model.model.encoder.layer.1.attention.self.query.lora_B.weight'],
                                query['lora_b'].T)  # [out, rank]
  assert tensors['base_model.model.encoder.layer.0.intermediate.dense.lora_B.weight'].shape == (24, 4)
  config = json.loads((tmp_path / 'adapter_config.json').read_text())
  assert (config['peft_type'], config['r'], config['lora_alpha']) == ('LORA', 4, 8.0)
  assert 'encoder.layer.0.attention.output.dense' in config['target_modules']
  assert 'encoder.layer.1.output.dense' in config['target_modules'] and len(config['target_modules']) == 12
  assert config['base_model_name_or_path'] == str(tiny_bert)


def test_peft_export_refuses_what_adapters_cannot_carry(tiny_bert, tmp_path):
  with pytest.raises(UserError, match='not a LoRA run'):
    export_peft(run_of(tiny_bert), str(tmp_path))
  pruned = run_of(tiny_bert, rank=4)
  pruned.config['prune'] = dict(sparsity=0.5)
  with pytest.raises(UserError, match='also pruned'):
    export_peft(pruned, str(tmp_path))
  trains_norms = run_of(tiny_bert, rank=4)
  trains_norms.config['lora']['train'] = ('head/.*', '.*layer_norm.*')
  with pytest.raises(UserError, match='also trains encoder parameters'):
    export_peft(trains_norms, str(tmp_path))
  cnn = run_of(tiny_bert, rank=4)
  cnn.config['model'] = dict(name='cnn')
  with pytest.raises(UserError, match='the hf and peft formats are for BERT runs'):
    export_hf(cnn, str(tmp_path))
