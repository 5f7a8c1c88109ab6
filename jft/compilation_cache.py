"""jax's persistent compilation cache, on by default for the command line: a repeated or resumed run loads its
compiled steps from disk instead of compiling them again (benchmarks/startup.py measures cold against warm).

`python -m jft.main --compilation_cache=DIR` (default `$JFT_COMPILATION_CACHE`, else ~/.cache/jft/xla;
`off` turns it off). A cache the user already gave jax (`JAX_COMPILATION_CACHE_DIR`) is left as it is.
Entries are keyed by the program, the jax/XLA versions, the flags and the devices, so a stale entry is never
used; the directory is capped at `MAX_BYTES`, least recently used entries going first. A local cache directory
also keeps jft's compiled steps whole (jft/executable_cache.py, in DIR/jft_executables), which a warm start loads
without tracing them, and the text datasets' tokenized splits (jft/data/token_cache.py, in DIR/jft_tokenized).
"""

import collections
import os

DEFAULT_DIR = '~/.cache/jft/xla'
MAX_BYTES = 2 << 30
# jax caches only programs that took at least 1 s to compile; a run's many small ones (initialisation, the
# sharded puts, the eval step of a small model) add up to seconds of a warm start too.
MIN_COMPILE_SECONDS = 0.0
OFF = 'off'
_EVENTS = {'/jax/compilation_cache/cache_hits': 'hits', '/jax/compilation_cache/cache_misses': 'misses'}
_counts = collections.Counter()
_listening = False


def _count(event: str, **_) -> None:
  if event in _EVENTS:
    _counts[_EVENTS[event]] += 1


def counts() -> dict[str, int]:
  """Programs loaded from the cache (`hits`) and compiled and written to it (`misses`) since `enable`."""
  return {'hits': _counts['hits'], 'misses': _counts['misses']}


def default_dir() -> str:
  return os.environ.get('JFT_COMPILATION_CACHE', DEFAULT_DIR)


def enable(directory: str | None = None) -> str | None:
  """Turns the cache on at `directory` (None: `default_dir()`; 'off': leaves it off); returns the directory used."""
  import jax  # here: the command line defines its flags from this module without loading JAX
  import jax.monitoring

  configured = jax.config.jax_compilation_cache_dir  # the user's own setting wins
  if not configured:
    directory = default_dir() if directory is None else directory
    if not directory or directory == OFF:
      return None
    configured = os.path.expanduser(directory)
    jax.config.update('jax_compilation_cache_dir', configured)
    jax.config.update('jax_compilation_cache_max_size', MAX_BYTES)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECONDS)
  if '://' not in configured:  # the executables and tokenized splits are kept on a local disk only
    from jft import executable_cache
    from jft.data import token_cache
    executable_cache.enable(os.path.join(configured, executable_cache.SUBDIRECTORY))
    token_cache.enable(os.path.join(configured, token_cache.SUBDIRECTORY))
  global _listening
  if not _listening:
    jax.monitoring.register_event_listener(_count)
    _listening = True
  return configured
