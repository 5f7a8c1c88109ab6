"""Dropout whose random bits come from Philox 4x32-10: the same `nn.Dropout`, 8-10x faster on CPU, on any mesh.

Why Philox: jax draws threefry2x32 bits on CPU through a rolled loop that XLA cannot fuse, so every dropout mask
is written to memory five times over; on MiniLM at 32 x 128 the masks took about 30% of the fine-tuning step
(benchmarks/README.md). Philox 4x32-10 (Salmon et al. 2011, Random123; what PyTorch and TensorFlow use for
dropout on accelerators) is a counter-based generator: one fused elementwise computation. The dropout key is
drawn from the module's `dropout` rng stream as usual, so a run stays a pure function of its seed and step.

Why written out here: the mask is bit for bit what `nn.Dropout` draws with a key of jax's own 'philox4x32'
implementation (tests/test_dropout.py), but jax lowers that generator's `lax.mulhi` to `chlo.mulhi`, which
jaxlib 0.10.2 cannot compile for an array sharded over several devices under Shardy, its default partitioner
("Unable to convert MHLO to StableHLO"): a BERT with dropout on a mesh of more than one device would not compile.
Here the high half of each product comes from an explicit uint64 multiply, which every partitioner handles.

Two choices keep the compiled step small (benchmarks/README.md, "What each change bought", item 6): the Philox
key is the module's own dropout key (two words of jax's default threefry2x32, already a hash of the seed, the
step and the module's path) rather than two words drawn from it, which on CPU costs a threefry loop per dropout
site; and on CPU each mask is computed once and kept in memory, one byte an element (`stored_once`), rather than
recomputed by every op that reads it.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)  # Random123's Philox 4x32 round multipliers
PHILOX_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)  # added to the two key words before each round after the first
PHILOX_ROUNDS = 10
MANTISSA_BITS = 23  # a uniform float32 in [0, 1) is the top 23 bits of a 32-bit draw, over 2^23 (jax.random)


def mulhi(x: jax.Array, multiplier: int) -> jax.Array:
  """The high 32 bits of the 64-bit product of uint32 `x` and the constant `multiplier` (< 2^32)."""
  with jax.enable_x64(True):  # explicit uint64 here only; the widening multiply XLA vectorises well
    product = x.astype(jnp.uint64) * np.uint64(multiplier)
    return (product >> np.uint64(32)).astype(jnp.uint32)


def philox4x32(key: tuple[jax.Array, jax.Array], counter: tuple) -> tuple[jax.Array, ...]:
  """Philox 4x32-10 (Random123): the four uint32 output words for the four counter words under the two key words."""
  k0, k1 = key
  x0, x1, x2, x3 = counter
  for round_index in range(PHILOX_ROUNDS):
    if round_index:
      k0, k1 = k0 + np.uint32(PHILOX_KEY_STEPS[0]), k1 + np.uint32(PHILOX_KEY_STEPS[1])
    hi0, lo0 = mulhi(x0, PHILOX_MULTIPLIERS[0]), x0 * np.uint32(PHILOX_MULTIPLIERS[0])
    hi1, lo1 = mulhi(x2, PHILOX_MULTIPLIERS[1]), x2 * np.uint32(PHILOX_MULTIPLIERS[1])
    x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
  return x0, x1, x2, x3


def add_product(words: tuple[jax.Array, jax.Array], x: jax.Array, multiplier: int) -> tuple[jax.Array, jax.Array]:
  """(high, low) uint32 words of the 64-bit sum `words + x * multiplier` (uint32 `x`, `multiplier` < 2^64)."""
  high, low = words
  m_hi, m_lo = multiplier >> 32, multiplier & 0xFFFFFFFF
  new_low = low + x * np.uint32(m_lo)
  carry = (new_low < low).astype(jnp.uint32)
  return high + mulhi(x, m_lo) + x * np.uint32(m_hi) + carry, new_low


def flat_index(shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Each element's row-major index in an array of `shape`, as (high, low) uint32 words: Philox's counter.

  Built from one iota per dimension, so XLA's partitioner can split it like the array it indexes."""
  words = (jnp.zeros(shape, jnp.uint32), jnp.zeros(shape, jnp.uint32))
  small = math.prod(shape) < 2**32  # the high word stays 0: skip its arithmetic
  stride = 1
  for dim in reversed(range(len(shape))):
    iota = lax.broadcasted_iota(jnp.uint32, shape, dim)
    words = (words[0], words[1] + iota * np.uint32(stride)) if small else add_product(words, iota, stride)
    stride *= shape[dim]
  return words


def random_bits(key_data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """uint32 bits of `shape` from a Philox 4x32 key's data (2 uint32 words), bit for bit
  `jax.random.bits(jax.random.wrap_key_data(key_data, impl='philox4x32'), shape, jnp.uint32)`."""
  high, low = flat_index(tuple(shape))
  zero = np.uint32(0)
  out = philox4x32((key_data[0], key_data[1]), (high, low, zero, zero))
  return out[0] ^ out[1] ^ out[2] ^ out[3]


def bernoulli_keep(key_data: jax.Array, keep_prob: float, shape: tuple[int, ...]) -> jax.Array:
  """True where an element is kept, with probability `keep_prob`: `jax.random.bernoulli(key, keep_prob, shape)` for
  the Philox key of `key_data`, bit for bit. That draws u = m / 2^23 from the top 23 bits m and keeps u < p (p in
  float32); the same as m < ceil(p * 2^23), compared here in integers."""
  threshold = math.ceil(float(np.float32(keep_prob)) * 2**MANTISSA_BITS)
  return (random_bits(key_data, shape) >> (32 - MANTISSA_BITS)) < np.uint32(threshold)


@functools.partial(jax.jit, static_argnums=(1, 2))
def keep_mask(key_data: jax.Array, keep_prob: float, shape: tuple[int, ...]) -> jax.Array:
  """`bernoulli_keep`, stored once on CPU. Jitted: a model's dropout sites of one shape share one trace (XLA
  inlines the calls): about a fifth off tracing MiniLM's train step."""
  keep = bernoulli_keep(key_data, keep_prob, shape)
  return stored_once(keep) if jax.default_backend() == 'cpu' else keep


def stored_once(keep: jax.Array) -> jax.Array:
  """`keep` unchanged, but computed once and kept in memory (one byte an element) on XLA's CPU backend.

  XLA's fusion copies an elementwise producer it deems cheap into every op that reads it, and Philox's ten rounds of
  multiplies and xors look cheap to it: MiniLM's step computed each mask 3-4 times (the forward op, the layer
  norm's statistics, the backward op), over two fifths of the compiled program's instructions. An integer
  remainder is one of the ops XLA's cost model calls expensive and does not copy, so the mask ends in one (`% 3` of
  a 0 or 1: the same value) and the ops that read it read the stored bytes. Measured on a 2-core Xeon at 32 x 64:
  compilation 5.8 -> 4.0 s, the load from the compilation cache 1.47-1.75 -> 0.95-1.16 s
  (benchmarks/trace_step.py), the step 2-8% faster (benchmarks/README.md)."""
  return (keep.astype(jnp.uint8) % np.uint8(3)).astype(jnp.bool_)


def philox_key_data(key: jax.Array) -> jax.Array:
  """The two uint32 words of a Philox key for a dropout site from the site's jax key: the key's own data when it is
  two uint32 words (threefry2x32, jax's default, whose words are already a hash of the seed and everything folded
  in), else two words drawn from it."""
  data = jax.random.key_data(key)
  if data.shape == (2,) and data.dtype == jnp.uint32:
    return data
  return jax.random.bits(key, (2,), jnp.uint32)


class Dropout(nn.Module):
  """`nn.Dropout(rate)`: zeroes each element with probability `rate` and scales the rest by 1 / (1 - rate)."""

  rate: float
  deterministic: bool = False
  rng_collection: str = 'dropout'

  @property
  def draws(self) -> bool:
    """Whether a call draws a mask: training, with a rate strictly between 0 and 1."""
    return not self.deterministic and 0.0 < self.rate < 1.0

  @nn.compact
  def __call__(self, inputs: jax.Array, keep: jax.Array | None = None) -> jax.Array:
    """`inputs` with dropout applied; `keep`: the part of a mask from `mask` that covers `inputs` (for a caller
    that applies one mask to an array in slices), else a mask is drawn here."""
    if not 0.0 <= self.rate <= 1.0:
      raise ValueError(f'dropout rate must be in [0, 1], got {self.rate}')
    if self.deterministic or self.rate == 0.0:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)  # as nn.Dropout: no 0 / 0 in the gradient
    keep = self.mask(inputs.shape) if keep is None else keep
    return lax.select(keep, inputs / (1.0 - self.rate), jnp.zeros_like(inputs))

  def mask(self, shape: tuple[int, ...]) -> jax.Array:
    """The keep mask a call on an array of `shape` draws (the module's next dropout key): True where kept."""
    return keep_mask(philox_key_data(self.make_rng(self.rng_collection)), 1.0 - self.rate, tuple(shape))
