"""Where XLA's large host buffers come from: a retaining allocator (jemalloc) where the system has one, else glibc,
on transparent huge pages where that helps. Set by re-executing the program once, before JAX is imported. And how
many live at once: one step's, with CPU programs run inline (`run_programs_inline`, below).

Why: XLA's CPU backend allocates the temporaries of each run of a compiled step as one buffer (1.6 GB for the
MiniLM fine-tuning step at 32 x 128), from a worker thread. glibc serves an allocation that large with a fresh
`mmap` and gives it back with `munmap` when the step ends, so on every step the kernel maps and zeroes it again,
4 KiB at a time: about 400,000 page faults and 1 s of system CPU time per step on 2 cores, a quarter of the step
(benchmarks/README.md). glibc cannot keep them: one arena with no `mmap` and no trimming (`mallopt`) fragmented
its heap, which grew from 2.7 to 7.3 GB over 22 steps.

jemalloc (the system's `libjemalloc.so.2`, Debian / Ubuntu package `libjemalloc2`) through `LD_PRELOAD`, with
`MALLOC_CONF=RETAINING`: one arena for every thread, and freed pages never handed back to the kernel, so each
step's temporaries reuse the memory of the steps before (no page faults). Nothing is freed to the kernel, so
nothing is left for a hypervisor to take back (below). The price is memory: the process keeps its high-water
mark. 150 steps of the main job (2026-12-02, 2-core Zen 5 VM, warm compilation cache, fresh processes alternating;
benchmarks/README.md) took 119-134 s against 133-150 s with glibc's 4 KiB pages, with a peak of 6.6-7.3 GB against
3.8-4.0 GB. Purging pages unused for 30 s instead (`dirty_decay_ms:30000`) kept the peak at 3.7 GB but took 153 and
236 s: there the purged pages came back from the hypervisor. jemalloc's transparent huge pages (`thp:always`) took
114-130 s, but a fresh process then faults its first memory in 2 MiB at a time from the hypervisor: a warm start
to the first step took 6.3 s against 3.6 s without them.

What stays where (`oversize_threshold`, in RETAINING): jemalloc serves blocks from 8 MiB up (its default) from an
arena of their own, and a block it keeps is split for any smaller request that fits. There a train state's largest
arrays (MiniLM's word embeddings and their two Adam moments, 47 MB each) landed inside the 1.6 GB the 32 x 128 step
had freed and stayed there until the next checkpoint, so the next such step mapped 1.6 GB afresh: the main job at
seed 3 peaked at 6.5 GB, against 5.4 GB with the threshold below (2026-12-08, 2-core Zen 4, jemalloc's own counters
read every second, one-off; benchmarks/README.md). They were new arrays because the step after a checkpoint cannot
donate the state's buffers while orbax's write holds views of them (its copy to host of a CPU array is
`np.asarray`), so it writes the state to new ones. That arena now serves blocks of 64 MiB and more only, a step's
temporaries (209 MB for MiniLM at 32 x 17), all freed when the step ends; the state's arrays come from the arena of
the rest.

Without jemalloc, glibc with `glibc.malloc.hugetlb=1`: it asks the kernel for transparent huge pages on those
maps (`madvise(MADV_HUGEPAGE)`), 2 MiB at a time, about 1,000 faults per step instead of 400,000. Not under a
hypervisor that takes freed memory back: a virtual machine whose balloon device reports free pages (virtio
`VIRTIO_BALLOON_F_REPORTING`, e.g. Firecracker VMs) hands each free 2 MiB block to the host about two seconds
after it is freed, so a huge page touched again after a pause (an evaluation, a step of another length, a
checkpoint) is faulted in from the host: there a 32 x 128 step after a 2.5 s pause took 3.9 s on huge pages
against 1.3 s back to back, and 1.6 s either way in 4 KiB pages (`benchmarks/host_memory.py`), and 150 steps of
the main job took 1.25x as long on huge pages. On such machines glibc keeps its 4 KiB pages.

One step's temporaries at a time on CPU (`run_programs_inline`). jax's CPU client runs a program asynchronously by
default: the call returns at once and a worker thread runs it. A step frees its temporaries only once the whole
program has finished, after its outputs are ready, so the next step, whose inputs those outputs are, starts and takes
its own temporaries first: two sets alive at a time, which the allocator then keeps (1.6 GB more at 32 x 128, and
each page of it faulted in once). `python -m jft.main` runs each single-device CPU program inline instead
(`jax_cpu_enable_async_dispatch=False`: the call returns when the program is done and its temporaries are freed);
jax keeps programs over several devices asynchronous. The loop loses no overlap worth having: on CPU the host's
cores are the device, and the call releases the GIL, so the threads that make programs ahead or write checkpoints
run on. 150 steps of the main job (2026-12-07, 2-core Zen 4, warm caches, fresh processes alternating; one-off,
benchmarks/README.md): peak resident memory 6.5 / 7.6 GB asynchronous against 4.2 / 4.1 GB inline, minor page
faults 1.65 / 1.92 million against 1.04 / 1.03 million, system time 10.6 / 15.4 s against 4.4 / 4.4 s, training
126.3 / 134.7 s against 123.4 / 122.3 s, the same test accuracy. `JFT_CPU_DISPATCH=async` keeps jax's default.

glibc and the dynamic loader read these settings only at process start, so `reexec()` starts the same program
again with them added to the environment (`os.execve`: same process id, same arguments); `python -m jft.main`
does it before it imports JAX. The environment decides: `JFT_ALLOCATOR=glibc` keeps glibc (`jemalloc`, the
default, falls back to glibc where it is not installed); `JFT_HUGE_PAGES=0` / `=1` turns glibc's huge pages off /
on despite free page reporting; an allocator the user preloads, or a `glibc.malloc.hugetlb` of their own, wins.
Child processes (data workers) inherit the setting.
"""

import os
import re
import sys
import sysconfig
from collections.abc import Mapping

TUNABLE = 'glibc.malloc.hugetlb'
HUGE_PAGES = f'{TUNABLE}=1'  # madvise(MADV_HUGEPAGE) on glibc's mmapped chunks and heaps
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb
SWITCH_VARIABLE = 'JFT_HUGE_PAGES'
ALLOCATOR_VARIABLE = 'JFT_ALLOCATOR'
ALLOCATORS = ('jemalloc', 'glibc')
JEMALLOC = 'libjemalloc.so.2'
LIBRARY_DIRS = (f"/usr/lib/{sysconfig.get_config_var('MULTIARCH') or ''}", '/usr/lib64', '/usr/lib', '/usr/local/lib')
# One arena for every thread (a step's buffers come from several), freed pages never purged (dirty, then muzzy),
# and only blocks of 64 MiB and more in jemalloc's arena for large blocks: a step's temporaries, not the arrays of
# a train state (see the module docstring).
OVERSIZE_BYTES = 64 << 20
RETAINING = f'narenas:1,dirty_decay_ms:-1,muzzy_decay_ms:-1,oversize_threshold:{OVERSIZE_BYTES}'
# In LD_PRELOAD: the user chose an allocator, or a sanitizer that must own malloc.
MALLOC_INTERPOSERS = ('jemalloc', 'tcmalloc', 'mimalloc', 'libasan', 'libtsan', 'libmsan', 'libhwasan')
DISPATCH_VARIABLE = 'JFT_CPU_DISPATCH'
DISPATCHES = ('inline', 'async')  # the first is the default
THP_ENABLED = '/sys/kernel/mm/transparent_hugepage/enabled'
VIRTIO_DEVICES = '/sys/bus/virtio/devices'
VIRTIO_ID_BALLOON = 5  # the virtio device id of a memory balloon
VIRTIO_BALLOON_F_REPORTING = 5  # the feature bit of free page reporting (virtio 1.2, 5.5.3)


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the C library this process runs on, None where it is not glibc."""
  try:
    name = os.confstr('CS_GNU_LIBC_VERSION')  # 'glibc 2.36'
  except (AttributeError, ValueError, OSError):
    return None
  match = re.fullmatch(r'glibc (\d+)\.(\d+).*', name or '')
  return (int(match[1]), int(match[2])) if match else None


def transparent_huge_pages_mode(path: str = THP_ENABLED) -> str | None:
  """The kernel's transparent huge page mode ('always', 'madvise' or 'never'), None where it has none."""
  try:
    with open(path) as f:
      match = re.search(r'\[(\w+)\]', f.read())
  except OSError:
    return None
  return match[1] if match else None


def with_huge_pages(tunables: str) -> str:
  """`tunables` (a GLIBC_TUNABLES value: colon-separated name=value pairs) with the huge page tunable added."""
  return f'{tunables}:{HUGE_PAGES}' if tunables else HUGE_PAGES


def free_page_reporting(devices: str = VIRTIO_DEVICES) -> bool:
  """Whether a virtio balloon device reports free pages to the hypervisor (it then takes them back)."""
  try:
    names = os.listdir(devices)
  except OSError:
    return False
  for name in names:
    try:
      with open(os.path.join(devices, name, 'device')) as f:
        device = int(f.read().strip(), 16)
      with open(os.path.join(devices, name, 'features')) as f:
        features = f.read().strip()  # one character per feature bit the driver accepted, bit 0 first
    except (OSError, ValueError):
      continue
    if device == VIRTIO_ID_BALLOON and features[VIRTIO_BALLOON_F_REPORTING:VIRTIO_BALLOON_F_REPORTING + 1] == '1':
      return True
  return False


def find_jemalloc(directories: tuple[str, ...] = LIBRARY_DIRS) -> str | None:
  """The path of the system's jemalloc shared library, None where it is not installed."""
  for directory in directories:
    path = os.path.join(directory, JEMALLOC)
    if os.path.isfile(path):
      return path
  return None


def huge_pages_help(environ: Mapping[str, str], glibc: tuple[int, int] | None, thp_mode: str | None,
                    reporting: bool) -> bool:
  """Whether glibc's huge page tunable helps a process with this environment, C library, kernel mode and free page
  `reporting` (see `free_page_reporting`)."""
  choice = environ.get(SWITCH_VARIABLE)
  if choice == '0' or TUNABLE in environ.get('GLIBC_TUNABLES', ''):
    return False
  if reporting and choice != '1':
    return False
  return glibc is not None and glibc >= MIN_GLIBC and thp_mode in ('always', 'madvise')


def restart_environment(environ: Mapping[str, str], jemalloc: str | None, glibc: tuple[int, int] | None,
                        thp_mode: str | None, reporting: bool) -> dict[str, str] | None:
  """The variables to start this program again with (see the module docstring), None where it should run as it is:
  `jemalloc` the library's path (None: not installed); the rest as for `huge_pages_help`."""
  allocator = environ.get(ALLOCATOR_VARIABLE, 'jemalloc')
  if allocator not in ALLOCATORS:
    raise ValueError(f'{ALLOCATOR_VARIABLE}={allocator!r} is not an allocator jft knows: use '
                     f'{" or ".join(ALLOCATORS)} (or leave it unset for jemalloc where installed)')
  preload = environ.get('LD_PRELOAD', '')
  if any(name in preload for name in MALLOC_INTERPOSERS):
    return None  # the user's allocator, or this process already restarted with jemalloc
  if allocator == 'jemalloc' and jemalloc is not None and glibc is not None:
    return {'LD_PRELOAD': f'{jemalloc}:{preload}' if preload else jemalloc,
            'MALLOC_CONF': environ.get('MALLOC_CONF') or RETAINING}
  if huge_pages_help(environ, glibc, thp_mode, reporting):
    return {'GLIBC_TUNABLES': with_huge_pages(environ.get('GLIBC_TUNABLES', ''))}
  return None


def reexec() -> None:
  """Restarts this program with the host memory setting that helps (see the module docstring); returns only where
  none does. Call it first thing, before JAX is imported or anything is written, and only from a program's own
  entry point: it starts the whole process (`sys.orig_argv`) again."""
  jemalloc = find_jemalloc()
  if os.environ.get(ALLOCATOR_VARIABLE) == 'jemalloc' and jemalloc is None:
    print(f'jft: {ALLOCATOR_VARIABLE}=jemalloc, but there is no {JEMALLOC} in {", ".join(LIBRARY_DIRS)} (Debian / '
          'Ubuntu: apt install libjemalloc2); running on glibc', file=sys.stderr, flush=True)
  added = restart_environment(os.environ, jemalloc, glibc_version(), transparent_huge_pages_mode(),
                              free_page_reporting())
  if added is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **added})


def without_setting(environ: Mapping[str, str], jemalloc: str | None) -> dict[str, str]:
  """`environ` without what `reexec` adds (for a process that should start with the system's defaults, e.g. another
  framework a benchmark compares against); `jemalloc` the path it preloads."""
  environ = dict(environ)
  preload = [path for path in environ.pop('LD_PRELOAD', '').split(':') if path and path != jemalloc]
  if preload:
    environ['LD_PRELOAD'] = ':'.join(preload)
  if environ.get('MALLOC_CONF', '').startswith(RETAINING):
    del environ['MALLOC_CONF']
  tunables = [t for t in environ.pop('GLIBC_TUNABLES', '').split(':') if t and t != HUGE_PAGES]
  if tunables:
    environ['GLIBC_TUNABLES'] = ':'.join(tunables)
  return environ


def describe(environ: Mapping[str, str] = os.environ) -> str:
  """This process's host allocator as the first training log line gives it: 'jemalloc', 'glibc, huge pages' or
  'glibc' (both are read at start only)."""
  if 'jemalloc' in environ.get('LD_PRELOAD', ''):
    return 'jemalloc'
  return 'glibc, huge pages' if active(environ) else 'glibc'


def active(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether this process runs with glibc's huge page tunable (glibc reads it at start only)."""
  return HUGE_PAGES in environ.get('GLIBC_TUNABLES', '').split(':')


def cpu_dispatch(environ: Mapping[str, str] = os.environ) -> str:
  """How single-device CPU programs run as `JFT_CPU_DISPATCH` asks: 'inline' (the default) or 'async' (jax's own
  default); ValueError naming the choices for anything else."""
  choice = environ.get(DISPATCH_VARIABLE, DISPATCHES[0])
  if choice not in DISPATCHES:
    raise ValueError(f'{DISPATCH_VARIABLE}={choice!r}: use {" or ".join(DISPATCHES)} (inline, the default: one '
                     "step's temporaries in memory at a time on CPU; async: jax's default)")
  return choice


def run_programs_inline(environ: Mapping[str, str] = os.environ) -> str:
  """Makes jax run each single-device CPU program inline, unless `JFT_CPU_DISPATCH=async` (see the module
  docstring); returns the choice. Call it before anything asks jax about devices: jax reads the setting when it
  makes its CPU client (RuntimeError if it has made it already)."""
  import jax  # noqa: PLC0415 (this module is imported before jax, for `reexec`)
  from jax._src import xla_bridge  # noqa: PLC0415 (no public way to ask whether the clients exist)

  choice = cpu_dispatch(environ)
  if xla_bridge.backends_are_initialized():
    raise RuntimeError('host_memory.run_programs_inline() was called after jax made its clients, which read the '
                       'setting once: call it before anything asks jax about devices or runs a computation')
  jax.config.update('jax_cpu_enable_async_dispatch', choice == 'async')
  return choice
