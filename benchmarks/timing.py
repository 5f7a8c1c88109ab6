"""Timing several steps against each other in one process (rounds of each in turn, so noise hits all alike), a whole
program in another (`timed_run`: its wall time and peak memory), whole programs in turns that cancel the machine's
drift (`alternating_order`), and naming the machine."""

import contextlib
import subprocess
import tempfile
import time
from collections.abc import Callable


def interleaved_times(runs: dict[str, Callable[[], None]], steps: int, round_size: int) -> dict[str, list[float]]:
  """Seconds of each call of each run (which must block until done), `steps` of each, in rounds of `round_size`."""
  times = {name: [] for name in runs}
  while min(len(t) for t in times.values()) < steps:
    for name, run in runs.items():
      for _ in range(round_size):
        start = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - start)
  return times


def alternating_order(first: str, second: str, pairs: int) -> list[str]:
  """The turns of two programs, `pairs` of them, each pair in the other order from the one before: first, second,
  second, first, first, ... (an ABBA design). Where the machine's speed drifts steadily over the runs, an even number
  of pairs adds the same drift to both programs' sums (a program run alone on these VMs can take 10% longer an hour
  later: benchmarks/README.md)."""
  order = []
  for pair in range(pairs):
    order += [first, second] if pair % 2 == 0 else [second, first]
  return order


def amd_core(family: int, model: int) -> str | None:
  """The core generation of an AMD CPU from its family and model numbers (AMD's Processor Programming Reference
  for each family): family 23 (17h) Zen / Zen 2, 25 (19h) Zen 3 or Zen 4 by model, 26 (1Ah) Zen 5."""
  if family == 0x17:
    return 'Zen 2' if model >= 0x30 else 'Zen'
  if family == 0x19:
    return 'Zen 4' if 0x10 <= model <= 0x1F or 0x60 <= model <= 0xAF else 'Zen 3'
  return 'Zen 5' if family == 0x1A else None


def machine() -> str:
  """This machine in one line, for every number printed: CPU model, family and model numbers (and an AMD CPU's core
  generation), cores jax sees, the widest vector ISA (and AMX, where the CPU has it)."""
  import os  # noqa: PLC0415 (only this helper needs them)
  import platform  # noqa: PLC0415
  model, flags, numbers, vendor = platform.processor() or platform.machine(), set(), {}, ''
  try:
    with open('/proc/cpuinfo') as cpuinfo:
      for line in cpuinfo:
        key, _, value = line.partition(':')
        if key.strip() == 'model name':
          model = value.strip()
        elif key.strip() in ('cpu family', 'model'):
          numbers[key.strip()] = int(value)
        elif key.strip() == 'vendor_id':
          vendor = value.strip()
        elif key.strip() == 'flags':
          flags = set(value.split())
  except (OSError, ValueError):
    pass
  isa = 'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'no AVX2'
  if 'amx_tile' in flags:  # Intel's matrix units (Sapphire Rapids and later), which oneDNN can use
    isa += ' + AMX'
  family = ''
  if len(numbers) == 2:
    core = amd_core(numbers['cpu family'], numbers['model']) if vendor == 'AuthenticAMD' else None
    family = f" (family {numbers['cpu family']} model {numbers['model']}{', ' + core if core else ''})"
  return f'{model}{family}, {os.cpu_count()} cores, {isa}'


def timed_run(command: list[str], **kwargs) -> tuple[float, str, float]:
  """(wall seconds, stdout, peak resident memory in GB) of `command`, run to its end. The peak is the process's
  own `VmHWM` (/proc/PID/status; it starts afresh at each exec), read every 0.1 s while it runs: `getrusage` would
  count the pages of this process, which the child shares from the fork until its exec."""
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=out, stderr=err, **kwargs)
    peak_kb = 0
    while process.poll() is None:
      with contextlib.suppress(OSError):  # ended between the poll and the read
        with open(f'/proc/{process.pid}/status') as status:
          peak_kb = max([peak_kb] + [int(line.split()[1]) for line in status if line.startswith('VmHWM:')])
      time.sleep(0.1)
    seconds = time.perf_counter() - start
    out.seek(0)
    err.seek(0)
    if process.returncode:
      raise RuntimeError(f'{command[:3]} failed ({process.returncode}):\n{err.read().decode()[-3000:]}')
    return seconds, out.read().decode(), peak_kb * 1024 / 1e9
