"""A Flax BERT encoder, shaped by a Hugging Face `config.json`, and a sequence classifier on top of it.

Parameter paths (what freezing, lr and pruning rules match against):
  embeddings/{word,position,token_type}_embeddings/embedding, embeddings/layer_norm/{scale,bias}
  encoder/layer_{i}/attention/{query,key,value,output}/{kernel,bias}, encoder/layer_{i}/attention/layer_norm
  encoder/layer_{i}/mlp/{intermediate,output}/{kernel,bias}, encoder/layer_{i}/mlp/layer_norm
  pooler/{kernel,bias}, and for the classifier head/{kernel,bias}
Query, key and value stay separate parameters (users freeze and prune them one by one). The encoder's dense
layers multiply with `dense.matmul`, whose weight gradient XLA's CPU backend runs at full speed; the attention's
output projection instead contracts heads and head_dim of the (batch, head, token, head_dim) context at once, with
no transpose of the context in between (benchmarks/README.md). On one CPU device, sequences of 96 tokens or more
attend in two independent chunks of heads, which XLA's CPU runtime runs side by side (`attention_head_chunks`).

`dtype='bfloat16'` runs the embeddings' output, the residual stream, every dense layer and both attention matmuls
in bf16 with float32 parameters; the attention softmax (with its mask bias), the LayerNorm statistics, the hidden
states returned, the pooling and the classifier head stay float32. `remat=True` recomputes each encoder layer in
the backward pass (`nn.remat`) instead of keeping its activations: the same parameter paths and gradients.
"""

import dataclasses
import itertools
import json
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jft import config_checks, model_files
from jft.errors import UserError
from jft.models import precision
from jft.models.dense import Dense, plus_bias
from jft.models.dropout import Dropout

ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
}
POOLINGS = ('cls', 'mean', 'pooler')


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The shape of a BERT encoder, with the field names of Hugging Face's `config.json`."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  hidden_act: str = 'gelu'
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  initializer_range: float = 0.02

  def __post_init__(self):
    config_checks.check_fields('the BERT config', dataclasses.asdict(self), config_checks.BERT_FIELDS)
    if self.hidden_size % self.num_attention_heads:
      raise UserError(f'BERT hidden_size {self.hidden_size} is not divisible by num_attention_heads '
                      f'{self.num_attention_heads}: fix config.json or the model overrides')
    if self.hidden_act not in ACTIVATIONS:
      raise UserError(f'BERT hidden_act {self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}')

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> 'BertConfig':
    """The known fields of a Hugging Face config dict; the rest (architectures, versions...) are ignored."""
    if fields.get('model_type', 'bert') != 'bert':
      raise UserError(f"model_type {fields['model_type']!r} is not a BERT; jft loads BERT encoders (model_type 'bert')")
    if fields.get('position_embedding_type', 'absolute') != 'absolute':
      raise UserError(f"position_embedding_type {fields['position_embedding_type']!r} is not supported; "
                      "jft's BERT has absolute position embeddings")
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in fields.items() if k in known})

  @classmethod
  def from_source(cls, source: str, **overrides: Any) -> 'BertConfig':
    """The config of a registered pretrained model (e.g. 'minilm') or a Hugging Face directory."""
    path = model_files.pretrained_file(source, 'config.json')
    try:
      with open(path) as f:
        fields = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise UserError(f'{path} is not a readable JSON config ({e}): give a directory whose config.json is a Hugging '
                      'Face BERT config') from None
    if not isinstance(fields, dict):
      raise UserError(f'{path} holds {type(fields).__name__}, not a JSON object: give a Hugging Face BERT config.json')
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise UserError(f'unknown BERT config field(s) {sorted(unknown)} in the model overrides; '
                      f'use fields of {[f.name for f in dataclasses.fields(cls)]}')
    return cls.from_dict({**fields, **overrides})


@flax.struct.dataclass
class BertOutput:
  """Named as in Hugging Face's BertModel output."""

  last_hidden_state: jax.Array  # [batch, length, hidden]
  pooler_output: jax.Array | None  # [batch, hidden]


class LinearParams(nn.Module):
  """The kernel [in, out] and bias [out] of a dense layer, returned rather than applied (so they can be fused)."""

  features_in: int
  features_out: int
  init_std: float

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    kernel = self.param('kernel', nn.initializers.normal(self.init_std), (self.features_in, self.features_out))
    bias = self.param('bias', nn.initializers.zeros, (self.features_out,))
    return kernel, bias


def _layer_norm(config: BertConfig, name: str, dtype: Any = jnp.float32) -> nn.LayerNorm:
  # Two-pass variance, as PyTorch computes it: the one-pass form drifts past 1e-5 on BERT's activations.
  # Its mean and variance are float32 reductions whatever the compute dtype (flax's force_float32_reductions).
  return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, dtype=dtype, name=name)


def _dense(config: BertConfig, features: int, name: str, dtype: Any = jnp.float32) -> Dense:
  return Dense(features, kernel_init=nn.initializers.normal(config.initializer_range), dtype=dtype, name=name)


CPU_ATTENTION_CHUNKS = 2  # benchmarks/attention_chunks.py: 2, 4 and 6 chunks alike on 2 cores, 12 slower
CPU_ATTENTION_MIN_LENGTH = 96  # shorter: no faster beyond the noise (17-74 tokens), and compiles longer


def attention_head_chunks(num_heads: int, length: int) -> list[slice]:
  """The slices of the heads the attention over `length` tokens computes one by one, as independent parts of the
  program: `CPU_ATTENTION_CHUNKS` on a single CPU device from `CPU_ATTENTION_MIN_LENGTH` tokens, else one slice of
  all of them.

  Why: XLA's CPU runtime runs a batched matmul (the scores' and the context's product per example and head, in the
  forward and the backward pass) on one thread, in YNNPACK's kernel as in Eigen's, while the other cores idle; its
  executor does run independent ops side by side, so independent chunks of heads keep the cores busy: on 2 cores
  of a Zen 4, MiniLM's train step 2-5% faster at 98 and 128 tokens, no faster beyond the noise at 17-74 tokens,
  where the products are short, and each shape's compilation up to 0.9 s longer (benchmarks/README.md). The
  function is the same: each head's products and softmax as before, and one dropout mask for all heads, sliced per
  chunk; the values agree to float32 rounding (XLA may add a softmax row or a gradient's sum in another order for
  the chunks' shapes; on MiniLM's step the first loss and gradient norm came out the same to the bit). Not on other
  backends, which run each product on the whole device, nor over several devices, where a tensor-parallel rule may
  shard the heads and slicing them would move data. More cores may gain from more chunks (not measured)."""
  on_one_cpu = jax.default_backend() == 'cpu' and jax.device_count() == 1
  chunks = CPU_ATTENTION_CHUNKS if on_one_cpu and length >= CPU_ATTENTION_MIN_LENGTH else 1
  bounds = np.linspace(0, num_heads, min(chunks, num_heads) + 1).astype(int)
  return [slice(int(lo), int(hi)) for lo, hi in itertools.pairwise(bounds)]


class SelfAttention(nn.Module):
  """Multi-head self-attention with a residual connection and a post layer norm."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, mask_bias_Bx1x1xL: jax.Array, train: bool) -> jax.Array:
    config = self.config
    hidden = x_BxLxD.shape[-1]
    heads = config.num_attention_heads
    head_dim = hidden // heads
    # The projections are `Dense` layers viewed as [batch, length, heads, head_dim]; the context comes out of the
    # second attention einsum as [batch, heads, length, head_dim] and the output projection contracts (heads,
    # head_dim) straight from there, with no transpose back to [batch, length, hidden] (benchmarks/README.md).
    def project(name: str) -> jax.Array:
      return _dense(config, hidden, name, self.dtype)(x_BxLxD).reshape(*x_BxLxD.shape[:2], heads, head_dim)

    query_BxLxHxK, key_BxLxHxK, value_BxLxHxK = project('query'), project('key'), project('value')
    # One dropout mask for all heads, applied to each chunk of heads (`attention_head_chunks`).
    dropout = Dropout(config.attention_probs_dropout_prob, deterministic=not train)
    batch, length = x_BxLxD.shape[:2]
    keep_BxHxLxL = dropout.mask((batch, heads, length, length)) if dropout.draws else None
    contexts = []
    for chunk in attention_head_chunks(heads, length):
      # Scores, the float32 mask bias and the softmax in float32, whatever the compute dtype.
      scores = (jnp.einsum('bqhk,bshk->bhqs', query_BxLxHxK[:, :, chunk], key_BxLxHxK[:, :, chunk])
                / math.sqrt(head_dim)).astype(jnp.float32)
      probs = jax.nn.softmax(scores + mask_bias_Bx1x1xL, axis=-1).astype(self.dtype)
      probs = dropout(probs, None if keep_BxHxLxL is None else keep_BxHxLxL[:, chunk])
      contexts.append(jnp.einsum('bhqs,bshk->bhqk', probs, value_BxLxHxK[:, :, chunk]))
    context_BxHxLxK = contexts[0] if len(contexts) == 1 else jnp.concatenate(contexts, axis=1)
    kernel, bias = LinearParams(hidden, hidden, config.initializer_range, name='output')()
    kernel_HxKxD = kernel.reshape(heads, head_dim, hidden).astype(self.dtype)
    out = plus_bias(jnp.einsum('bhqk,hkd->bqd', context_BxHxLxK, kernel_HxKxD), bias.astype(self.dtype))
    out = Dropout(config.hidden_dropout_prob, deterministic=not train)(out)
    return _layer_norm(config, 'layer_norm', self.dtype)(x_BxLxD + out)


class FeedForward(nn.Module):
  """The position-wise MLP with a residual connection and a post layer norm."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, train: bool) -> jax.Array:
    config = self.config
    h = ACTIVATIONS[config.hidden_act](_dense(config, config.intermediate_size, 'intermediate', self.dtype)(x_BxLxD))
    out = _dense(config, config.hidden_size, 'output', self.dtype)(h)
    out = Dropout(config.hidden_dropout_prob, deterministic=not train)(out)
    return _layer_norm(config, 'layer_norm', self.dtype)(x_BxLxD + out)


class TransformerLayer(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, mask_bias_Bx1x1xL: jax.Array, train: bool) -> jax.Array:
    x_BxLxD = SelfAttention(self.config, self.dtype, name='attention')(x_BxLxD, mask_bias_Bx1x1xL, train)
    return FeedForward(self.config, self.dtype, name='mlp')(x_BxLxD, train)


class Embeddings(nn.Module):
  """Word + position + token type embeddings, layer norm, dropout."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids_BxL: jax.Array, token_type_ids_BxL: jax.Array, train: bool) -> jax.Array:
    config = self.config
    length = input_ids_BxL.shape[1]
    if length > config.max_position_embeddings:
      raise UserError(f'a sequence of {length} tokens is longer than the model\'s {config.max_position_embeddings} '
                      'positions: set data.max_len (and the largest bucket) to at most that')
    init = nn.initializers.normal(config.initializer_range)
    embed = lambda count, name: nn.Embed(count, config.hidden_size, embedding_init=init, name=name)
    x = embed(config.vocab_size, 'word_embeddings')(input_ids_BxL)
    x = x + embed(config.max_position_embeddings, 'position_embeddings')(jnp.arange(length))[None]
    x = x + embed(config.type_vocab_size, 'token_type_embeddings')(token_type_ids_BxL)
    x = _layer_norm(config, 'layer_norm', self.dtype)(x)
    return Dropout(config.hidden_dropout_prob, deterministic=not train)(x)


class Encoder(nn.Module):
  """The stack of layers; `remat` recomputes each layer's activations in the backward pass (`nn.remat`, the
  parameter paths unchanged) instead of keeping them: less memory for more compute. On CPU, XLA's default
  concurrency-optimised scheduler runs the recomputation early and saves nothing (benchmarks/remat_memory.py)."""

  config: BertConfig
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, attention_mask_BxL: jax.Array, train: bool) -> jax.Array:
    # Masked keys get the most negative float32: exp underflows to exactly 0, as in Hugging Face's BERT.
    mask_bias = jnp.where(attention_mask_BxL[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    layer = nn.remat(TransformerLayer, static_argnums=(3,)) if self.remat else TransformerLayer  # 3: `train`
    for i in range(self.config.num_hidden_layers):
      x_BxLxD = layer(self.config, self.dtype, name=f'layer_{i}')(x_BxLxD, mask_bias, train)
    return x_BxLxD


def _pool(config: BertConfig, hidden_BxLxD: jax.Array) -> jax.Array:
  """tanh(dense(hidden state of the first token)), BERT's pooled output; its parameters are `pooler/...`
  of the calling module."""
  kernel, bias = LinearParams(config.hidden_size, config.hidden_size, config.initializer_range, name='pooler')()
  return jnp.tanh(hidden_BxLxD[:, 0] @ kernel + bias)


def _encode(config: BertConfig, input_ids, attention_mask, token_type_ids, train, dtype='float32', remat=False):
  """Embeddings and encoder, as submodules of the calling compact module (so paths start at embeddings/...).

  The hidden states come back in float32 whatever the compute `dtype`.
  """
  dtype = precision.compute_dtype(dtype)
  input_ids = jnp.asarray(input_ids)
  attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
  token_type_ids = jnp.zeros_like(input_ids) if token_type_ids is None else jnp.asarray(token_type_ids)
  x = Embeddings(config, dtype, name='embeddings')(input_ids, token_type_ids, train)
  hidden = Encoder(config, dtype, remat, name='encoder')(x, attention_mask, train)
  return hidden.astype(jnp.float32), attention_mask


class BertModel(nn.Module):
  """The BERT encoder: `apply(variables, input_ids, attention_mask, token_type_ids)` -> `BertOutput`."""

  config: BertConfig
  add_pooler: bool = True
  dtype: str = 'float32'  # the compute dtype ('bfloat16': parameters stay float32)
  remat: bool = False  # recompute each layer's activations in the backward pass

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, train: bool = False) -> BertOutput:
    hidden, _ = _encode(self.config, input_ids, attention_mask, token_type_ids, train, self.dtype, self.remat)
    pooled = _pool(self.config, hidden) if self.add_pooler else None
    return BertOutput(last_hidden_state=hidden, pooler_output=pooled)


def mean_pool(hidden_BxLxD: jax.Array, attention_mask_BxL: jax.Array) -> jax.Array:
  """The average hidden state over the real (unmasked) tokens of each sequence."""
  weights = attention_mask_BxL.astype(hidden_BxLxD.dtype)[..., None]
  return jnp.sum(hidden_BxLxD * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


class BertClassifier(nn.Module):
  """BERT encoder + pooling (`cls`: first token; `mean`: over real tokens; `pooler`: BERT's tanh pooler)
  + dropout + a new linear `head`. Returns logits [batch, num_classes]."""

  config: BertConfig
  num_classes: int
  pooling: str = 'mean'
  head_dropout: float | None = None  # None: the encoder's hidden_dropout_prob.
  dtype: str = 'float32'  # the encoder's compute dtype; pooling and the head run in float32
  remat: bool = False  # recompute each layer's activations in the backward pass

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, train: bool = False) -> jax.Array:
    if self.pooling not in POOLINGS:
      raise UserError(f'unknown model.pooling {self.pooling!r}; use one of {POOLINGS}')
    hidden, attention_mask = _encode(self.config, input_ids, attention_mask, token_type_ids, train, self.dtype,
                                     self.remat)
    if self.pooling == 'mean':
      features = mean_pool(hidden, attention_mask)
    elif self.pooling == 'cls':
      features = hidden[:, 0]
    else:
      features = _pool(self.config, hidden)
    dropout = self.config.hidden_dropout_prob if self.head_dropout is None else self.head_dropout
    features = Dropout(dropout, deterministic=not train)(features)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(self.config.initializer_range),
                    name='head')(features)
