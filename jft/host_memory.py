"""XLA's large host buffers on transparent huge pages: glibc's `glibc.malloc.hugetlb=1`, set by re-executing once.

Why: XLA's CPU backend allocates the temporaries of each run of a compiled step as one buffer (1.6 GB for the
MiniLM fine-tuning step at 32 x 128), from a worker thread. glibc serves an allocation that large with a fresh
`mmap` and gives it back with `munmap` when the step ends, so on every step the kernel maps and zeroes it again,
4 KiB at a time: about 400,000 page faults and 1 s of system CPU time per step on 2 cores, a quarter of the step
(benchmarks/README.md). With the tunable, glibc asks the kernel for transparent huge pages on those maps
(`madvise(MADV_HUGEPAGE)`), 2 MiB at a time: about 1,000 faults per step. The process holds no more memory
than before; the buffers still go back to the system when freed. (Keeping them in glibc's heap instead, with
`mallopt`, avoids the faults too, but the heap fragmented and grew by gigabytes over 20 steps.)

Not under a hypervisor that takes freed memory back: a virtual machine whose balloon device reports free pages
(virtio `VIRTIO_BALLOON_F_REPORTING`, e.g. Firecracker VMs) hands each free 2 MiB block to the host about two
seconds after it is freed, so a huge page touched again after a pause (an evaluation, a step of another length,
a checkpoint) is faulted in from the host: there a 32 x 128 step after a 2.5 s pause took 3.9 s on huge pages
against 1.3 s back to back, and 1.6 s either way in 4 KiB pages (`benchmarks/host_memory.py`), and 150 steps of
the main job took 1.25x as long on huge pages (benchmarks/README.md). On such machines the default is 4 KiB pages.

glibc reads its tunables only at process start, so `reexec_with_huge_pages()` starts the same program again with
the tunable added to `GLIBC_TUNABLES` (`os.execve`: same process id, same arguments); `python -m jft.main` does
it before it imports JAX. It does nothing where it cannot help or was decided already: not Linux with glibc >=
2.35, transparent huge pages set to `never`, free page reporting (above), `glibc.malloc.hugetlb` already in
`GLIBC_TUNABLES` (the user's value wins), or `JFT_HUGE_PAGES=0` in the environment (off). `JFT_HUGE_PAGES=1`
turns it on despite free page reporting (for a loop of back-to-back steps of one shape it is still faster).
"""

import os
import re
import sys
from collections.abc import Mapping

TUNABLE = 'glibc.malloc.hugetlb'
HUGE_PAGES = f'{TUNABLE}=1'  # madvise(MADV_HUGEPAGE) on glibc's mmapped chunks and heaps
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb
SWITCH_VARIABLE = 'JFT_HUGE_PAGES'
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


def should_reexec(environ: Mapping[str, str], glibc: tuple[int, int] | None, thp_mode: str | None,
                  reporting: bool) -> bool:
  """Whether a process with this environment, C library, kernel mode and free page `reporting` (see
  `free_page_reporting`) gains by restarting with the tunable."""
  choice = environ.get(SWITCH_VARIABLE)
  if choice == '0' or TUNABLE in environ.get('GLIBC_TUNABLES', ''):
    return False
  if reporting and choice != '1':
    return False
  return glibc is not None and glibc >= MIN_GLIBC and thp_mode in ('always', 'madvise')


def reexec_with_huge_pages() -> None:
  """Restarts this program with `glibc.malloc.hugetlb=1` where that helps (see the module docstring); returns
  only where it does not. Call it first thing, before JAX is imported or anything is written, and only from a
  program's own entry point: it starts the whole process (`sys.orig_argv`) again."""
  if not should_reexec(os.environ, glibc_version(), transparent_huge_pages_mode(), free_page_reporting()):
    return
  environ = {**os.environ, 'GLIBC_TUNABLES': with_huge_pages(os.environ.get('GLIBC_TUNABLES', ''))}
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def active() -> bool:
  """Whether this process runs with the huge page tunable (glibc reads it at start only)."""
  return HUGE_PAGES in os.environ.get('GLIBC_TUNABLES', '').split(':')
