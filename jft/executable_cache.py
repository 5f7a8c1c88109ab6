"""Compiled steps kept on disk under what they are built from, so that a repeated or resumed run skips tracing and
lowering them as well as compiling them.

jax's persistent compilation cache (jft/compilation_cache.py) keys a program by its lowered HLO, so a warm start
still traces and lowers every step before the cache can answer: for the MiniLM train step about 1 s of a 3 s warm
start on a 2-core CPU (benchmarks/trace_step.py). This cache answers before tracing. An entry is keyed by
everything the program is built from:
  - the code: every source file of the jft package and of any other loaded module outside the Python installation
    (a user's own model or script), and the versions of Python, jax, jaxlib, flax, optax, numpy, ml_dtypes, chex;
  - how jax and XLA are set: every `jax.config` value but those that only change what jax logs or reports and
    where its own cache lives (`REPORTING_SETTINGS`: `JAX_LOG_COMPILES=1`, turned on to see whether a start
    compiles, must not itself make it compile) and those that change only how a compiled program is run
    (`RUNTIME_SETTINGS`: whether jax runs CPU programs inline), `XLA_FLAGS` and `LIBTPU_INIT_ARGS`, the devices;
  - what the caller says the function is built from (jft's train loop: the step's name and stage, the whole config,
    and the model module with all its hyperparameters, e.g. a Hugging Face config.json's);
  - the arguments' tree structure, shapes, dtypes and shardings.
So anything that changes the traced program changes the key; the entry is then simply not found, the step is
traced and compiled (jax's cache still answering where the HLO is unchanged, as after an edit that leaves the
programs alone) and stored under the new key. A function that closes over anything else (e.g. arrays that are
neither arguments nor config) must not be cached here, or must put it in `parts`. Once a source file changes
under a running process (an edit, with or without a reload), that process neither loads nor keeps programs: the
code it runs may be the old or the new.

Each function also remembers the program it ran first (`FIRST`), which `prefetch` starts loading on a thread
before the arguments that pick it exist: jft's train loop does so for a fresh run's first step before it reads
its data.

`python -m jft.main --compilation_cache=DIR` keeps these entries in DIR/jft_executables (`off` turns both caches
off); the directory is capped at `MAX_BYTES`, least recently used entries going first. A program jax's cache
answered is kept with the executable jax's cache read (XLA would write the loaded copy without its kernels; jax
has no API for those bytes: `_note_jax_cache_reads`); where they are not to be had it is not kept. Single-
process runs only: a multi-process run's programs are tied to its cluster, and are left to jax's cache. An
unreadable entry (a disk error, a crash while writing, another jaxlib) is reported, deleted and compiled again,
never a failure. Entries are pickles of executables, as jax's own cache holds: like it, a cache directory must
be trusted.
"""

import collections
import concurrent.futures
import contextlib
import functools
import hashlib
import io
import os
import pathlib
import pickle
import sys
import sysconfig
import threading
import zlib
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.monitoring
import numpy as np
from absl import logging
from jax._src.lib import xla_client  # the type of a loaded executable, for _PicklerWritingExecutable
from jax.experimental import serialize_executable

from jft import cache_files

SUBDIRECTORY = 'jft_executables'
SUFFIX = '.executable'
FIRST = '.first'  # beside an Executables' entries: the name of the one it ran first
MAX_BYTES = 2 << 30
_VERSIONED = ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'ml_dtypes', 'chex')
_ENVIRONMENT = ('XLA_FLAGS', 'LIBTPU_INIT_ARGS')
# jax settings that change what jax logs, how it reports errors, or where and what its persistent cache keeps:
# never the traced or compiled program, so they are left out of the key.
REPORTING_SETTINGS = frozenset({
    'jax_log_compiles', 'jax_explain_cache_misses', 'jax_logging_level', 'jax_debug_log_modules',
    'jax_log_checkpoint_residuals', 'jax_compiler_detailed_logging_min_ops', 'jax_pprint_use_color',
    'jax_traceback_filtering', 'jax_tracer_error_num_traceback_frames', 'jax_compilation_cache_dir',
    'jax_enable_compilation_cache', 'jax_compilation_cache_max_size', 'jax_persistent_cache_min_compile_time_secs',
    'jax_persistent_cache_min_entry_size_bytes', 'jax_raise_persistent_cache_errors',
})
# jax settings that change how a compiled program is run, not the program (jft/host_memory.py runs CPU programs
# inline; a script that does not shares its entries).
RUNTIME_SETTINGS = frozenset({'jax_cpu_enable_async_dispatch'})
_directory: pathlib.Path | None = None
_counts = collections.Counter()
_compiling = threading.local()
_listening = False
_sources: dict[pathlib.Path, tuple[tuple[int, int], str]] = {}  # (mtime, size) and hash, as first read
_changed: set[pathlib.Path] = set()
_prefetched: dict[pathlib.Path, concurrent.futures.Future] = {}  # entry -> its (program, in_tree) being loaded


def enable(directory: str | os.PathLike | None) -> None:
  """Keeps compiled steps in `directory` (None: off)."""
  global _directory, _listening
  _directory = None if directory is None else pathlib.Path(directory)
  if not _listening:
    jax.monitoring.register_event_listener(_note_jax_cache_hit)
    _note_jax_cache_reads()
    _listening = True


def _note_jax_cache_hit(event: str, **_) -> None:
  # jax records the event in the thread that compiles, while it compiles.
  if event == '/jax/compilation_cache/cache_hits':
    _compiling.loaded_from_jax_cache = True


def _note_jax_cache_reads() -> None:
  """Has jax's persistent cache leave the executable it reads (XLA's serialized form, with its kernels) in
  `_compiling.jax_cache_executable`, in the thread that compiles: what a program jax's cache answered is kept as
  (`_compile_and_store`). jax has no API for it: this wraps the function of jax 0.10's `compilation_cache` module
  that splits a cache entry into that executable and its compile time; where jax has no such function, such
  programs are simply not kept."""
  from jax._src import compilation_cache as jax_compilation_cache

  split = getattr(jax_compilation_cache, 'extract_executable_and_time', None)
  if split is None or getattr(split, 'notes_for_jft', False):
    return

  @functools.wraps(split)
  def split_and_note(executable_and_time: bytes) -> tuple[bytes, int]:
    executable, compile_time = split(executable_and_time)
    _compiling.jax_cache_executable = executable
    return executable, compile_time

  split_and_note.notes_for_jft = True
  jax_compilation_cache.extract_executable_and_time = split_and_note


def directory() -> pathlib.Path | None:
  return _directory


def counts() -> dict[str, int]:
  """Programs loaded from this cache (`hits`; `prefetched`: of those, the ones `prefetch` had loaded ahead) and
  compiled and stored in it (`misses`) since the process started."""
  return {'hits': _counts['hits'], 'misses': _counts['misses'], 'prefetched': _counts['prefetched']}


def cached(jitted: Callable, name: str, *parts: str) -> Callable:
  """`jitted` (a `jax.jit` function), whose programs come from the cache where one is enabled: an `Executables`
  keyed by `name` and `parts` (what else the function is built from), else `jitted` itself."""
  key = _key(name, parts)
  return jitted if key is None else Executables(jitted, _directory, key)


def prefetch(name: str, *parts: str) -> None:
  """Starts loading, on a thread, the program that `cached(..., name, *parts)` ran first the last time, so that it
  is ready by the time the arguments that pick it are (a fresh run's first step: before its data is read)."""
  key = _key(name, parts)
  if key is None:
    return
  try:
    entry = (_directory / (key.hexdigest() + FIRST)).read_text()
  except OSError:  # never run, or no longer readable: nothing to load ahead
    return
  if os.path.basename(entry) == entry and entry.endswith(SUFFIX):  # an entry of this directory, nothing else
    _prefetched[_directory / entry] = run_on_thread(_read_program, _directory / entry)


def _key(name: str, parts: tuple[str, ...]) -> 'hashlib._Hash | None':
  environment = None if _directory is None or jax.process_count() > 1 else environment_digest()
  return None if environment is None else hashlib.sha256('\0'.join((environment, name, *parts)).encode())


def _read_program(path: pathlib.Path) -> tuple[jax.stages.Compiled, Any]:
  """(the program kept in `path`, the tree structure of the arguments it takes)."""
  serialized, in_tree, out_tree = pickle.loads(zlib.decompress(path.read_bytes()))
  return serialize_executable.deserialize_and_load(serialized, in_tree, out_tree), in_tree


class Executables:
  """Calls `jitted` through its compiled programs, one per signature of the arguments, each loaded from
  `directory` or compiled and stored there. `key` is a hash of everything but the arguments the program is built
  from (`cached` makes it)."""

  def __init__(self, jitted: Callable, directory: pathlib.Path, key: 'hashlib._Hash'):
    self.jitted, self.directory, self.key = jitted, directory, key
    self.programs: dict[tuple, jax.stages.Compiled] = {}
    self._lock = threading.Lock()

  def __call__(self, *args):
    program = self.programs.get(_signature(args))
    if program is None:
      program = self.compile(*args)
    return program(*args)

  def compile(self, *args, lowered: jax.stages.Lowered | None = None) -> jax.stages.Compiled:
    """The program for arguments like `args` (arrays, or shape-dtype structs with shardings): from memory, else
    from the cache, else traced (unless `lowered` is given: the cache has no program yet), compiled and stored."""
    signature = _signature(args)
    with self._lock:
      if signature not in self.programs:
        program = None if lowered is not None else self._load(signature, args)
        self._keep(signature, program or self._compile_and_store(signature, lowered or self.jitted.lower(*args)))
      return self.programs[signature]

  def compile_in_background(self, *abstract_args) -> concurrent.futures.Future:
    """`compile` on a thread; where the cache has no program yet, the tracing and lowering (Python, holding the
    GIL) happen here first, and only XLA's compilation on the thread."""
    signature = _signature(abstract_args)
    lowered = None
    if signature not in self.programs and not self.path(signature).exists():
      lowered = self.jitted.lower(*abstract_args)
    return run_on_thread(functools.partial(self.compile, *abstract_args, lowered=lowered))

  def _keep(self, signature: tuple, program: jax.stages.Compiled) -> None:
    """Holds `program` for calls with `signature`; the first one is what `prefetch` loads next time."""
    if not self.programs:
      with contextlib.suppress(OSError):
        first, name = self.directory / (self.key.hexdigest() + FIRST), self.path(signature).name
        if not first.exists() or first.read_text() != name:
          cache_files.write_atomically(first, name.encode())
    self.programs[signature] = program

  def path(self, signature: tuple) -> pathlib.Path:
    key = self.key.copy()
    tree, *leaves = signature
    devices = {sharding: _devices(sharding) for *_, sharding in leaves}
    key.update(repr((str(tree), [(*leaf, devices[leaf[-1]]) for leaf in leaves])).encode())
    return self.directory / (key.hexdigest() + SUFFIX)

  def _load(self, signature: tuple, args: tuple) -> jax.stages.Compiled | None:
    path = self.path(signature)
    prefetched = _prefetched.pop(path, None)
    try:
      program, in_tree = _read_program(path) if prefetched is None else prefetched.result()
      if in_tree != jax.tree.structure((args, {})):
        raise ValueError(f'it takes arguments structured as {in_tree}')
    except FileNotFoundError:
      return None
    except Exception as e:  # noqa: BLE001 (any unreadable entry is compiled again, never a failure)
      logging.warning('jft: could not load the compiled program %s (%s: %s); deleting it and compiling again',
                      path, type(e).__name__, e)
      with contextlib.suppress(OSError):  # e.g. a cache on a read-only disk
        path.unlink(missing_ok=True)
      return None
    cache_files.mark_used(path)
    _counts['hits'] += 1
    _counts['prefetched'] += prefetched is not None
    return program

  def _compile_and_store(self, signature: tuple, lowered: jax.stages.Lowered) -> jax.stages.Compiled:
    _compiling.loaded_from_jax_cache, _compiling.jax_cache_executable = False, None
    program = lowered.compile()
    _counts['misses'] += 1
    # XLA serialises an executable it loaded without its compiled kernels (jaxlib 0.10.2, CPU: the copy fails
    # with "Function ... not found" when run), so a program jax's cache answered is kept as jax's cache holds it.
    executable = _compiling.jax_cache_executable if _compiling.loaded_from_jax_cache else None
    if _compiling.loaded_from_jax_cache and executable is None:
      logging.info('jft: %s came from jax\'s compilation cache, which did not say what it read: not kept', self.jitted)
      return program
    try:
      serialized, in_tree, out_tree = _serialize(program, executable)
      entry = zlib.compress(pickle.dumps((serialized, in_tree, out_tree), pickle.HIGHEST_PROTOCOL), 1)
    except Exception as e:  # noqa: BLE001 (a program jax cannot serialize still runs; it is just not kept)
      logging.info('jft: not keeping the compiled program of %s (%s: %s)', self.jitted, type(e).__name__, e)
      return program
    try:
      cache_files.write_atomically(self.path(signature), entry)
      cache_files.evict(self.directory, SUFFIX, MAX_BYTES)
    except OSError as e:
      logging.warning('jft: could not keep the compiled program in %s: %s', self.directory, e)
    return program


def _serialize(program: jax.stages.Compiled, executable: bytes | None = None) -> tuple[bytes, Any, Any]:
  """`serialize_executable.serialize(program)`: (bytes, in_tree, out_tree) for `deserialize_and_load`; with XLA's
  serialized `executable` (where given) written for the program's own. The second is `serialize`'s own steps (jax
  0.10) with a pickler that writes those bytes: the entry a program compiled here would make."""
  if executable is None:
    return serialize_executable.serialize(program)
  unloaded = getattr(program._executable, '_unloaded_executable', None)
  if unloaded is None or getattr(getattr(unloaded, 'mut', None), 'in_mut', None) or program._params.const_args:
    raise ValueError('jax cannot serialize this program')
  args_info, in_tree = jax.tree.flatten(program.args_info)
  with io.BytesIO() as file:
    _PicklerWritingExecutable(file, executable).dump((unloaded, args_info, program._no_kwargs))
    return file.getvalue(), in_tree, program.out_tree


class _PicklerWritingExecutable(serialize_executable._JaxPjrtPickler):
  """jax's pickler of executables, writing XLA's serialized `executable` for the loaded executable it meets."""

  def __init__(self, file, executable: bytes):
    super().__init__(file)
    self.executable = executable

  def persistent_id(self, obj):
    return ('exec', self.executable) if isinstance(obj, xla_client.LoadedExecutable) else super().persistent_id(obj)


def run_on_thread(function: Callable, *args: Any) -> concurrent.futures.Future:
  """`function(*args)` on a thread of its own (XLA compiles and loads programs without the GIL)."""
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='jft-compile')
  future = pool.submit(function, *args)
  pool.shutdown(wait=False)
  return future


def environment_digest() -> str | None:
  """A hash of the code, the versions, jax's and flax's settings, XLA's flags and the devices of this process's
  programs; None once a source file has changed since this process first read it (the code running may then be
  the old or the new: nothing is loaded or kept)."""
  digest = hashlib.sha256()
  for path in _source_files():
    content = _source_digest(path)
    if content is None:
      return None
    digest.update(f'{path}\0{content}'.encode())
  versions = [sys.version, *(f'{name} {getattr(sys.modules.get(name), "__version__", None)}' for name in _VERSIONED)]
  settings = sorted((name, repr(value)) for name, value in jax.config.values.items()
                    if name not in REPORTING_SETTINGS | RUNTIME_SETTINGS)
  settings += sorted((name, repr(getattr(flax.config, name))) for name in dir(flax.config)
                     if name.startswith(('flax_', 'nnx_')))  # e.g. how flax derives rngs
  environment = [(name, os.environ.get(name)) for name in _ENVIRONMENT]
  devices = [(d.id, d.process_index, d.platform, d.device_kind) for d in jax.devices()]
  digest.update(repr((versions, settings, environment, devices, jax.devices()[0].client.platform_version)).encode())
  return digest.hexdigest()


def _source_digest(path: pathlib.Path) -> str | None:
  """The hash of `path` as this process first read it, or None if it has changed since (warned once)."""
  stat = path.stat()
  seen = (stat.st_mtime_ns, stat.st_size)
  if path not in _sources:
    _sources[path] = (seen, hashlib.sha256(path.read_bytes()).hexdigest())
  first_seen, content = _sources[path]
  if seen != first_seen and hashlib.sha256(path.read_bytes()).hexdigest() != content:
    if path not in _changed:
      _changed.add(path)
      logging.warning('jft: %s changed while this process ran: its compiled steps are neither loaded nor kept '
                      '(a new process keeps them again)', path)
    return None
  return content


def _source_files() -> list[pathlib.Path]:
  """jft's source files and those of every loaded module outside the Python installation (stdlib, site-packages:
  their code is named by the versions)."""
  installation = tuple({os.path.join(os.path.realpath(sysconfig.get_path(name)), '')
                        for name in ('stdlib', 'platstdlib', 'purelib', 'platlib')})
  files = set(pathlib.Path(__file__).parent.rglob('*.py'))
  for module in list(sys.modules.values()):
    file = getattr(module, '__file__', None)
    if file and file.endswith('.py') and not os.path.abspath(file).startswith(installation):
      files.add(pathlib.Path(file))
  return sorted({path.resolve() for path in files if path.is_file()})


def _signature(args: tuple) -> tuple:
  """The arguments' tree structure and each leaf's shape, dtype, weak type and sharding: what picks the program."""
  leaves, tree = jax.tree.flatten(args)
  return (tree, *map(_leaf_signature, leaves))


def _leaf_signature(leaf: Any) -> tuple:
  try:  # a jax.Array or jax.ShapeDtypeStruct (faster than isinstance, once a step)
    return leaf.shape, leaf.dtype, leaf.weak_type, leaf.sharding
  except AttributeError:
    pass
  # A NumPy array or Python number has no sharding, and a Python number is weakly typed, as jax.jit sees them.
  dtype = getattr(leaf, 'dtype', None)
  return np.shape(leaf), np.result_type(leaf) if dtype is None else dtype, dtype is None, None


def _devices(sharding: jax.sharding.Sharding | None) -> tuple[int, ...]:
  """The devices of `sharding` in its mesh's order (which a sharding's repr leaves out)."""
  if sharding is None:
    return ()
  mesh = getattr(sharding, 'mesh', None)
  return tuple(mesh.device_ids.flat) if mesh is not None else tuple(sorted(d.id for d in sharding.device_set))
