"""jft/host_memory.py: when a process restarts itself with glibc's huge page tunable (not where the hypervisor takes
freed pages back), and that the restart keeps its process id and arguments and cuts the page faults of a step whose
temporaries glibc maps afresh each call."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from jft import host_memory

LINUX_GLIBC = (2, 36)


def test_with_huge_pages_appends_to_existing_tunables():
  assert host_memory.with_huge_pages('') == 'glibc.malloc.hugetlb=1'
  assert host_memory.with_huge_pages('glibc.malloc.arena_max=2') == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'


@pytest.mark.parametrize('environ, glibc, thp_mode, reporting, expected', [
    ({}, LINUX_GLIBC, 'madvise', False, True),
    ({}, LINUX_GLIBC, 'always', False, True),
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, LINUX_GLIBC, 'madvise', False, True),
    ({}, LINUX_GLIBC, 'never', False, False),  # the kernel would ignore the advice
    ({}, LINUX_GLIBC, None, False, False),  # no transparent huge pages at all (not Linux, or a kernel without them)
    ({}, None, 'madvise', False, False),  # musl and other C libraries
    ({}, (2, 34), 'madvise', False, False),  # before glibc.malloc.hugetlb existed
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, LINUX_GLIBC, 'madvise', False, False),  # the user's value wins
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, LINUX_GLIBC, 'madvise', False, False),  # restarted: no loop
    ({'JFT_HUGE_PAGES': '0'}, LINUX_GLIBC, 'madvise', False, False),  # turned off
    ({}, LINUX_GLIBC, 'madvise', True, False),  # the hypervisor takes freed huge pages back: 4 KiB pages win
    ({'JFT_HUGE_PAGES': '1'}, LINUX_GLIBC, 'madvise', True, True),  # asked for all the same
    ({'JFT_HUGE_PAGES': '1'}, LINUX_GLIBC, 'never', True, False),  # ... but not where it cannot work
])
def test_should_reexec(environ, glibc, thp_mode, reporting, expected):
  assert host_memory.should_reexec(environ, glibc, thp_mode, reporting) is expected


def _virtio_device(root, name: str, device: str, features: str) -> None:
  (root / name).mkdir(parents=True)
  (root / name / 'device').write_text(f'{device}\n')
  (root / name / 'features').write_text(f'{features}\n')


def test_free_page_reporting_reads_the_balloon_feature_bit(tmp_path):
  # A network device with bit 5 set (another meaning there), and a balloon with stats and deflate-on-OOM only.
  _virtio_device(tmp_path, 'virtio0', '0x0001', '1100010110111')
  _virtio_device(tmp_path, 'virtio1', '0x0005', '0110000000000')
  assert not host_memory.free_page_reporting(str(tmp_path))
  _virtio_device(tmp_path, 'virtio2', '0x0005', '0110010100000')  # as on a Firecracker VM: bit 5, reporting
  assert host_memory.free_page_reporting(str(tmp_path))
  assert not host_memory.free_page_reporting(str(tmp_path / 'missing'))  # no virtio bus: bare metal, or not Linux


@pytest.mark.parametrize('reporting', [False, True])
def test_reexec_follows_free_page_reporting(monkeypatch, reporting):
  starts = []
  monkeypatch.setattr(host_memory, 'glibc_version', lambda: LINUX_GLIBC)
  monkeypatch.setattr(host_memory, 'transparent_huge_pages_mode', lambda: 'madvise')
  monkeypatch.setattr(host_memory, 'free_page_reporting', lambda: reporting)
  monkeypatch.setattr(host_memory.os, 'execve', lambda path, argv, environ: starts.append(environ['GLIBC_TUNABLES']))
  for variable in ('GLIBC_TUNABLES', 'JFT_HUGE_PAGES'):
    monkeypatch.delenv(variable, raising=False)
  host_memory.reexec_with_huge_pages()
  assert starts == ([] if reporting else ['glibc.malloc.hugetlb=1'])


def test_transparent_huge_pages_mode_reads_the_bracketed_word(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert host_memory.transparent_huge_pages_mode(str(path)) == 'madvise'
  assert host_memory.transparent_huge_pages_mode(str(tmp_path / 'missing')) is None


def test_glibc_version_on_this_machine():
  version = host_memory.glibc_version()
  if sys.platform.startswith('linux') and os.confstr('CS_GNU_LIBC_VERSION'):
    assert version is not None and version >= (2, 17)
  else:
    assert version is None


# A step with a 256 MiB temporary (the sorted copies: too large for a glibc thread arena, so mmapped afresh on
# every call), run after `reexec_with_huge_pages`; prints the process id before and after the restart, the
# arguments, the tunables and the median minor page faults per call.
_STEP_SCRIPT = textwrap.dedent("""
    import json, os, resource, statistics, sys
    print(json.dumps({'pid': os.getpid(), 'phase': 'start'}), flush=True)
    from jft import host_memory
    host_memory.reexec_with_huge_pages()
    import jax, jax.numpy as jnp
    x = jnp.arange(2**25, dtype=jnp.float32) % 7.0
    step = jax.jit(lambda x: (jnp.sort(x) * jnp.sort(-x)).sum())
    step(x).block_until_ready()
    faults = []
    for _ in range(5):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      step(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({'pid': os.getpid(), 'phase': 'end', 'argv': sys.argv[1:], 'active': host_memory.active(),
                      'faults': statistics.median(faults)}), flush=True)
""")


def _run_step(tmp_path, **environ) -> list[dict]:
  script = tmp_path / 'step.py'
  script.write_text(_STEP_SCRIPT)
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'JFT_HUGE_PAGES')}
  result = subprocess.run([sys.executable, str(script), 'an-argument'], capture_output=True, text=True,
                          env={**env, 'JAX_PLATFORMS': 'cpu', **environ}, timeout=300, check=True)
  return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.skipif(not host_memory.should_reexec({'JFT_HUGE_PAGES': '1'}, host_memory.glibc_version(),
                                                  host_memory.transparent_huge_pages_mode(), reporting=True),
                    reason='needs Linux, glibc >= 2.35 and transparent huge pages')
def test_reexec_keeps_the_process_and_cuts_page_faults(tmp_path):
  restarted = _run_step(tmp_path, JFT_HUGE_PAGES='1')  # asked for: on this machine by default or not
  starts = [line for line in restarted if line['phase'] == 'start']
  (end,) = [line for line in restarted if line['phase'] == 'end']
  assert len(starts) == 2 and starts[0]['pid'] == starts[1]['pid'] == end['pid']  # once, in the same process
  assert end['argv'] == ['an-argument'] and end['active']

  (plain,) = [line for line in _run_step(tmp_path, JFT_HUGE_PAGES='0') if line['phase'] == 'end']
  assert not plain['active']
  if host_memory.transparent_huge_pages_mode() != 'madvise':
    return  # 'always': the kernel backs large maps with huge pages without being asked, so both fault little
  # 256 MiB in 4 KiB pages is 65,536 faults a call; in 2 MiB pages 128 (plus the small change of any call).
  assert plain['faults'] > 30_000, plain
  assert end['faults'] < plain['faults'] / 8, (end, plain)
