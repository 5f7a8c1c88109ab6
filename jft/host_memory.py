"""XLA's large host buffers on transparent huge pages: glibc's `glibc.malloc.hugetlb=1`, set by re-executing once.

Why: XLA's CPU backend allocates the temporaries of each run of a compiled step as one buffer (1.6 GB for the
MiniLM fine-tuning step at 32 x 128), from a worker thread. glibc serves an allocation that large with a fresh
`mmap` and gives it back with `munmap` when the step ends, so on every step the kernel maps and zeroes it again,
4 KiB at a time: about 400,000 page faults and 1 s of system CPU time per step on 2 cores, a quarter of the step
(benchmarks/README.md). With the tunable, glibc asks the kernel for transparent huge pages on those maps
(`madvise(MADV_HUGEPAGE)`), 2 MiB at a time: about 1,000 faults per step. The process holds no more memory
than before; the buffers still go back to the system when freed. (Keeping them in glibc's heap instead, with
`mallopt`, avoids the faults too, but the heap fragmented and grew by gigabytes over 20 steps.)

glibc reads its tunables only at process start, so `reexec_with_huge_pages()` starts the same program again with
the tunable added to `GLIBC_TUNABLES` (`os.execve`: same process id, same arguments); `python -m jft.main` does
it before it imports JAX. It does nothing where it cannot help or was decided already: not Linux with glibc >=
2.35, transparent huge pages set to `never`, `glibc.malloc.hugetlb` already in `GLIBC_TUNABLES` (the user's
value wins), or `JFT_HUGE_PAGES=0` in the environment (off).
"""

import os
import re
import sys
from collections.abc import Mapping

TUNABLE = 'glibc.malloc.hugetlb'
HUGE_PAGES = f'{TUNABLE}=1'  # madvise(MADV_HUGEPAGE) on glibc's mmapped chunks and heaps
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb
OFF_VARIABLE = 'JFT_HUGE_PAGES'
THP_ENABLED = '/sys/kernel/mm/transparent_hugepage/enabled'


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


def should_reexec(environ: Mapping[str, str], glibc: tuple[int, int] | None, thp_mode: str | None) -> bool:
  """Whether a process with this environment, C library and kernel mode gains by restarting with the tunable."""
  if environ.get(OFF_VARIABLE) == '0' or TUNABLE in environ.get('GLIBC_TUNABLES', ''):
    return False
  return glibc is not None and glibc >= MIN_GLIBC and thp_mode in ('always', 'madvise')


def reexec_with_huge_pages() -> None:
  """Restarts this program with `glibc.malloc.hugetlb=1` where that helps (see the module docstring); returns
  only where it does not. Call it first thing, before JAX is imported or anything is written, and only from a
  program's own entry point: it starts the whole process (`sys.orig_argv`) again."""
  if not should_reexec(os.environ, glibc_version(), transparent_huge_pages_mode()):
    return
  environ = {**os.environ, 'GLIBC_TUNABLES': with_huge_pages(os.environ.get('GLIBC_TUNABLES', ''))}
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def active() -> bool:
  """Whether this process runs with the huge page tunable (glibc reads it at start only)."""
  return HUGE_PAGES in os.environ.get('GLIBC_TUNABLES', '').split(':')
