"""The Flax BERT port against Hugging Face transformers' BertModel (saved outputs, see tests/fixtures/README.md)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from jft import model_files, pretrained, tree_paths
from jft.errors import UserError
from jft.models import bert
from jft.models.bert import BertClassifier, BertConfig, mean_pool

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
SMALL = os.path.join(FIXTURES, 'bert_small')


def reference(name):
  return np.load(os.path.join(FIXTURES, f'{name}_reference.npz'), allow_pickle=False)


@pytest.mark.parametrize('source,fixture', [('minilm', 'minilm'), (SMALL, 'bert_small')])
def test_outputs_match_hugging_face_within_1e4(source, fixture):
  ref = reference(fixture)
  model = pretrained.load(source)
  out = model.module.apply(model.variables, ref['input_ids'], ref['attention_mask'], ref['token_type_ids'])
  np.testing.assert_allclose(out.last_hidden_state, ref['last_hidden_state'], atol=1e-4, rtol=0)
  np.testing.assert_allclose(out.pooler_output, ref['pooler_output'], atol=1e-4, rtol=0)


def test_omitted_token_types_are_zeros_as_in_hugging_face():
  ref = reference('bert_small')
  model = pretrained.load(SMALL)
  out = model.module.apply(model.variables, ref['input_ids'], ref['attention_mask'])
  np.testing.assert_allclose(out.last_hidden_state, ref['last_hidden_state_no_types'], atol=1e-4, rtol=0)
  np.testing.assert_allclose(out.pooler_output, ref['pooler_output_no_types'], atol=1e-4, rtol=0)


def test_shipped_tokenizer_gives_the_reference_ids():
  ref = reference('minilm')
  tokenizer = Tokenizer.from_file(model_files.pretrained_file('minilm', 'tokenizer.json'))
  tokenizer.no_padding()
  for i, (a, b) in enumerate(zip(ref['text_a'], ref['text_b'], strict=True)):
    encoding = tokenizer.encode(str(a), str(b)) if str(b) else tokenizer.encode(str(a))
    length = int(ref['attention_mask'][i].sum())
    assert encoding.ids == ref['input_ids'][i, :length].tolist()
    assert encoding.type_ids == ref['token_type_ids'][i, :length].tolist()


def test_config_comes_from_config_json():
  config = pretrained.load(SMALL).config
  assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (48, 3, 4)
  assert (config.intermediate_size, config.vocab_size, config.type_vocab_size) == (80, 211, 3)
  minilm = BertConfig.from_source('minilm')
  assert (minilm.hidden_size, minilm.num_hidden_layers, minilm.intermediate_size) == (384, 6, 1536)


def test_converter_transposes_linear_weights_and_ignores_buffers():
  tensors = load_file(os.path.join(SMALL, 'model.safetensors'))
  tensors['embeddings.position_ids'] = np.arange(40)[None]
  converted, unused = pretrained.convert_hf_bert({'bert.' + k: v for k, v in tensors.items()})
  assert unused == []
  np.testing.assert_array_equal(converted['encoder/layer_1/mlp/intermediate/kernel'],
                                tensors['encoder.layer.1.intermediate.dense.weight'].T)
  assert converted['encoder/layer_1/mlp/intermediate/kernel'].shape == (48, 80)
  np.testing.assert_array_equal(converted['embeddings/layer_norm/scale'], tensors['embeddings.LayerNorm.weight'])


def test_weights_that_do_not_fit_config_name_each_mismatch(tmp_path):
  broken = tmp_path / 'broken'
  shutil.copytree(SMALL, broken)
  tensors = load_file(broken / 'model.safetensors')
  del tensors['encoder.layer.2.output.dense.bias']
  tensors['encoder.layer.0.attention.self.query.weight'] = np.zeros((48, 40), np.float32)
  save_file(tensors, broken / 'model.safetensors')
  with pytest.raises(UserError) as error:
    pretrained.load(str(broken))
  message = str(error.value)
  assert 'missing   encoder/layer_2/mlp/output/bias (48,)' in message
  assert 'encoder/layer_0/attention/query/kernel: expected (48, 48), found (40, 48)' in message


def test_missing_directory_and_unsupported_config_are_user_errors(tmp_path):
  with pytest.raises(UserError, match='neither a registered'):
    pretrained.load(str(tmp_path / 'nowhere'))
  odd = tmp_path / 'odd'
  shutil.copytree(SMALL, odd)
  config = json.loads((odd / 'config.json').read_text())
  (odd / 'config.json').write_text(json.dumps({**config, 'position_embedding_type': 'relative_key'}))
  with pytest.raises(UserError, match='position_embedding_type'):
    pretrained.load(str(odd))


def test_missing_minilm_package_error_gives_the_install_command(monkeypatch):
  monkeypatch.setitem(model_files.REGISTERED, 'minilm', ('no_such_package_xyz', 'model', 'pip install it'))
  with pytest.raises(UserError, match='pip install it'):
    pretrained.load('minilm')


@pytest.mark.parametrize('pooling', ['cls', 'mean', 'pooler'])
def test_classifier_pools_the_encoder_outputs(pooling):
  ref = reference('bert_small')
  model = pretrained.load(SMALL)
  classifier = BertClassifier(model.config, num_classes=5, pooling=pooling)
  ids, mask, types = ref['input_ids'], ref['attention_mask'], ref['token_type_ids']
  params = classifier.init(jax.random.PRNGKey(0), ids, mask, types)['params']
  assert ('pooler' in params) == (pooling == 'pooler')
  params = {**params, **{k: v for k, v in model.variables['params'].items() if k in params}}
  logits = classifier.apply({'params': params}, ids, mask, types)
  features = {'cls': ref['last_hidden_state'][:, 0], 'pooler': ref['pooler_output'],
              'mean': (ref['last_hidden_state'] * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)}[pooling]
  expected = features @ np.asarray(params['head']['kernel']) + np.asarray(params['head']['bias'])
  np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_mean_pool_ignores_padding_by_hand():
  hidden = np.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]], np.float32)
  np.testing.assert_allclose(mean_pool(hidden, np.array([[1, 1, 0]])), [[2.0, 3.0]])


def test_parameter_paths_follow_the_design():
  params = pretrained.load(SMALL).variables['params']
  paths = tree_paths.flatten(params)
  assert paths['encoder/layer_0/attention/query/kernel'].shape == (48, 48)
  assert paths['embeddings/word_embeddings/embedding'].shape == (211, 48)
  assert {p.split('/')[1] for p in paths if p.startswith('encoder/')} == {'layer_0', 'layer_1', 'layer_2'}


def test_attention_is_cut_into_chunks_of_heads_on_one_cpu_device_only(monkeypatch):
  assert jax.default_backend() == 'cpu' and jax.device_count() == 1
  assert bert.attention_head_chunks(12, 128) == [slice(0, 6), slice(6, 12)]
  assert bert.attention_head_chunks(12, 95) == [slice(0, 12)]  # short: one piece
  assert bert.attention_head_chunks(1, 128) == [slice(0, 1)]
  monkeypatch.setattr(bert, 'CPU_ATTENTION_CHUNKS', 3)
  assert bert.attention_head_chunks(4, 96) == [slice(0, 1), slice(1, 2), slice(2, 4)]
  monkeypatch.setattr(jax, 'device_count', lambda: 8)
  assert bert.attention_head_chunks(12, 128) == [slice(0, 12)]


@pytest.mark.parametrize('chunks', [2, 3])
def test_attention_in_chunks_of_heads_trains_as_in_one_piece(monkeypatch, chunks):
  """Dropout on: the chunks slice one mask, so the loss and every gradient are those of the one-piece attention, to
  float32 rounding (XLA may add a softmax row or a gradient's sum in another order for the chunks' shapes)."""
  ref = reference('bert_small')
  model = pretrained.load(SMALL)
  classifier = BertClassifier(model.config, num_classes=5)
  ids, mask, types = ref['input_ids'], ref['attention_mask'], ref['token_type_ids']
  params = classifier.init(jax.random.PRNGKey(0), ids, mask, types)['params']
  params = {**params, **{k: v for k, v in model.variables['params'].items() if k in params}}

  monkeypatch.setattr(bert, 'CPU_ATTENTION_MIN_LENGTH', 0)  # the fixture's texts are short

  def loss_and_grads(count, dropout_seed=3):
    monkeypatch.setattr(bert, 'CPU_ATTENTION_CHUNKS', count)
    assert len(bert.attention_head_chunks(model.config.num_attention_heads, ids.shape[1])) == count
    rngs = {'dropout': jax.random.PRNGKey(dropout_seed)}
    def loss(p):
      logits = classifier.apply({'params': p}, ids, mask, types, train=True, rngs=rngs)
      return jnp.sum(logits ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)  # a new function: traced with this chunk count

  (one_loss, one_grads), (loss, grads) = loss_and_grads(1), loss_and_grads(chunks)
  np.testing.assert_allclose(loss, one_loss, rtol=1e-6)
  one_grads = tree_paths.flatten(one_grads)
  for path, grad in tree_paths.flatten(grads).items():
    np.testing.assert_allclose(grad, one_grads[path], rtol=1e-5, atol=1e-6, err_msg=path)
  # Other dropout masks (as a mask sliced wrongly or drawn per chunk would give) move them beyond that tolerance:
  _, other_mask_grads = loss_and_grads(chunks, dropout_seed=4)
  path = 'encoder/layer_0/attention/value/kernel'
  assert not np.allclose(tree_paths.flatten(other_mask_grads)[path], one_grads[path], rtol=1e-5, atol=1e-6)
