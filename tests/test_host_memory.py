"""jft/host_memory.py: when a process restarts itself with jemalloc (where installed) or glibc's huge page tunable
(not where the hypervisor takes freed pages back), and that the restart keeps its process id and arguments and cuts
the page faults of a step whose temporaries glibc maps afresh each call; that CPU programs run inline unless asked
otherwise, with the GIL released while they run."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from jft import host_memory

LINUX_GLIBC = (2, 36)
JEMALLOC = '/usr/lib/x86_64-linux-gnu/libjemalloc.so.2'
GLIBC = {'JFT_ALLOCATOR': 'glibc'}


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
def test_huge_pages_help(environ, glibc, thp_mode, reporting, expected):
  assert host_memory.huge_pages_help(environ, glibc, thp_mode, reporting) is expected
  # Without jemalloc the restart is exactly this rule.
  restart = host_memory.restart_environment(environ, None, glibc, thp_mode, reporting)
  expected_tunables = host_memory.with_huge_pages(environ.get('GLIBC_TUNABLES', ''))
  assert restart == ({'GLIBC_TUNABLES': expected_tunables} if expected else None)


@pytest.mark.parametrize('environ, jemalloc, thp_mode, expected', [
    ({}, JEMALLOC, 'madvise', {'LD_PRELOAD': JEMALLOC, 'MALLOC_CONF': host_memory.RETAINING}),
    ({}, JEMALLOC, 'never', {'LD_PRELOAD': JEMALLOC, 'MALLOC_CONF': host_memory.RETAINING}),
    ({'LD_PRELOAD': '/opt/lib/libfoo.so'}, JEMALLOC, 'never',  # the user's other preloads stay, after it
     {'LD_PRELOAD': f'{JEMALLOC}:/opt/lib/libfoo.so', 'MALLOC_CONF': host_memory.RETAINING}),
    ({'MALLOC_CONF': 'narenas:4'}, JEMALLOC, 'never', {'LD_PRELOAD': JEMALLOC, 'MALLOC_CONF': 'narenas:4'}),  # theirs
    ({'LD_PRELOAD': JEMALLOC}, JEMALLOC, 'madvise', None),  # restarted already: no loop
    ({'LD_PRELOAD': '/usr/lib/libtcmalloc_minimal.so.4'}, JEMALLOC, 'madvise', None),  # the user's allocator wins
    ({'LD_PRELOAD': '/usr/lib/x86_64-linux-gnu/libasan.so.8'}, JEMALLOC, 'madvise', None),  # a sanitizer owns malloc
    ({'JFT_ALLOCATOR': 'jemalloc'}, None, 'never', None),  # asked for but not installed: glibc as it is
    ({'JFT_ALLOCATOR': 'glibc', 'JFT_HUGE_PAGES': '0'}, JEMALLOC, 'madvise', None),
    (GLIBC, JEMALLOC, 'madvise', {'GLIBC_TUNABLES': host_memory.HUGE_PAGES}),  # glibc: its own rule
])
def test_restart_environment_prefers_jemalloc(environ, jemalloc, thp_mode, expected):
  assert host_memory.restart_environment(environ, jemalloc, LINUX_GLIBC, thp_mode, reporting=False) == expected
  if expected is not None and 'LD_PRELOAD' in expected:  # the same under free page reporting: nothing is freed
    assert host_memory.restart_environment(environ, jemalloc, LINUX_GLIBC, thp_mode, reporting=True) == expected
  assert host_memory.restart_environment(environ, jemalloc, None, thp_mode, reporting=False) is None  # not glibc


def test_an_unknown_allocator_is_an_error_that_names_the_choices():
  with pytest.raises(ValueError, match=r"JFT_ALLOCATOR='tcmalloc'.*jemalloc or glibc"):
    host_memory.restart_environment({'JFT_ALLOCATOR': 'tcmalloc'}, JEMALLOC, LINUX_GLIBC, 'madvise', False)


def test_find_jemalloc_looks_in_the_library_directories(tmp_path):
  assert host_memory.find_jemalloc((str(tmp_path / 'a'), str(tmp_path / 'b'))) is None
  (tmp_path / 'b').mkdir()
  (tmp_path / 'b' / 'libjemalloc.so.2').write_bytes(b'')
  assert host_memory.find_jemalloc((str(tmp_path / 'a'), str(tmp_path / 'b'))) == str(tmp_path / 'b' /
                                                                                        'libjemalloc.so.2')


def test_without_setting_gives_back_the_environment_before_the_restart():
  before = {'PATH': '/bin', 'LD_PRELOAD': '/opt/lib/libfoo.so', 'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}
  for environ in (before, {}, GLIBC):
    for jemalloc in (JEMALLOC, None):
      added = host_memory.restart_environment(environ, jemalloc, LINUX_GLIBC, 'madvise', reporting=False) or {}
      assert host_memory.without_setting({**environ, **added}, jemalloc) == environ


def test_describe_names_the_setting():
  assert host_memory.describe({'LD_PRELOAD': JEMALLOC, 'MALLOC_CONF': host_memory.RETAINING}) == 'jemalloc'
  assert host_memory.describe({'GLIBC_TUNABLES': host_memory.HUGE_PAGES}) == 'glibc, huge pages'
  assert host_memory.describe({}) == 'glibc'


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
@pytest.mark.parametrize('jemalloc', [None, JEMALLOC])
def test_reexec_follows_jemalloc_and_free_page_reporting(monkeypatch, capsys, reporting, jemalloc):
  starts = []
  monkeypatch.setattr(host_memory, 'find_jemalloc', lambda: jemalloc)
  monkeypatch.setattr(host_memory, 'glibc_version', lambda: LINUX_GLIBC)
  monkeypatch.setattr(host_memory, 'transparent_huge_pages_mode', lambda: 'madvise')
  monkeypatch.setattr(host_memory, 'free_page_reporting', lambda: reporting)
  monkeypatch.setattr(host_memory.os, 'execve', lambda path, argv, environ: starts.append(environ))
  for variable in ('GLIBC_TUNABLES', 'JFT_HUGE_PAGES', 'LD_PRELOAD', 'MALLOC_CONF'):
    monkeypatch.delenv(variable, raising=False)
  monkeypatch.setenv('JFT_ALLOCATOR', 'jemalloc')
  host_memory.reexec()
  if jemalloc:
    assert [(e['LD_PRELOAD'], e['MALLOC_CONF'], 'GLIBC_TUNABLES' in e) for e in starts] == [
        (JEMALLOC, host_memory.RETAINING, False)]
  else:
    assert [e['GLIBC_TUNABLES'] for e in starts] == ([] if reporting else ['glibc.malloc.hugetlb=1'])
    assert 'no libjemalloc.so.2' in capsys.readouterr().err  # asked for by name: says why not


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
# every call), run after `reexec`; prints the process id before and after the restart, the arguments, the setting
# and the median minor page faults per call.
_STEP_SCRIPT = textwrap.dedent("""
    import json, os, resource, statistics, sys
    print(json.dumps({'pid': os.getpid(), 'phase': 'start'}), flush=True)
    from jft import host_memory
    host_memory.reexec()
    import jax, jax.numpy as jnp
    x = jnp.arange(2**25, dtype=jnp.float32) % 7.0
    step = jax.jit(lambda x: (jnp.sort(x) * jnp.sort(-x)).sum())
    step(x).block_until_ready()
    faults = []
    for _ in range(5):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      step(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({'pid': os.getpid(), 'phase': 'end', 'argv': sys.argv[1:], 'setting': host_memory.describe(),
                      'faults': statistics.median(faults)}), flush=True)
""")


def _run_step(tmp_path, source: str = _STEP_SCRIPT, **environ) -> tuple[list[dict], dict]:
  """(the start lines, the end line) of a step script in a fresh process with `environ` added."""
  script = tmp_path / 'step.py'
  script.write_text(source)
  env = host_memory.without_setting(os.environ, host_memory.find_jemalloc())
  for variable in (host_memory.SWITCH_VARIABLE, host_memory.ALLOCATOR_VARIABLE):
    env.pop(variable, None)
  result = subprocess.run([sys.executable, str(script), 'an-argument'], capture_output=True, text=True,
                          env={**env, 'JAX_PLATFORMS': 'cpu', **environ}, timeout=300, check=True)
  lines = [json.loads(line) for line in result.stdout.splitlines()]
  (end,) = [line for line in lines if line['phase'] == 'end']
  return [line for line in lines if line['phase'] == 'start'], end


def _assert_restarted_once(starts, end):
  assert len(starts) == 2 and starts[0]['pid'] == starts[1]['pid'] == end['pid']  # once, in the same process
  assert end['argv'] == ['an-argument']


@pytest.mark.skipif(not host_memory.huge_pages_help({'JFT_HUGE_PAGES': '1'}, host_memory.glibc_version(),
                                                    host_memory.transparent_huge_pages_mode(), reporting=True),
                    reason='needs Linux, glibc >= 2.35 and transparent huge pages')
def test_huge_pages_restart_keeps_the_process_and_cuts_page_faults(tmp_path):
  starts, end = _run_step(tmp_path, JFT_ALLOCATOR='glibc', JFT_HUGE_PAGES='1')  # asked for: default here or not
  _assert_restarted_once(starts, end)
  assert end['setting'] == 'glibc, huge pages'
  plain_starts, plain = _run_step(tmp_path, JFT_ALLOCATOR='glibc', JFT_HUGE_PAGES='0')
  assert len(plain_starts) == 1 and plain['setting'] == 'glibc'
  if host_memory.transparent_huge_pages_mode() != 'madvise':
    return  # 'always': the kernel backs large maps with huge pages without being asked, so both fault little
  # 256 MiB in 4 KiB pages is 65,536 faults a call; in 2 MiB pages 128 (plus the small change of any call).
  assert plain['faults'] > 30_000, plain
  assert end['faults'] < plain['faults'] / 8, (end, plain)


@pytest.mark.skipif(host_memory.find_jemalloc() is None or host_memory.glibc_version() is None,
                    reason='needs glibc and the system jemalloc (Debian / Ubuntu: apt install libjemalloc2)')
def test_jemalloc_restart_keeps_the_process_and_the_memory(tmp_path):
  starts, end = _run_step(tmp_path)  # the default where it is installed
  _assert_restarted_once(starts, end)
  assert end['setting'] == 'jemalloc'
  _, plain = _run_step(tmp_path, JFT_ALLOCATOR='glibc', JFT_HUGE_PAGES='0')
  assert plain['setting'] == 'glibc'
  if host_memory.transparent_huge_pages_mode() == 'always':
    return  # the kernel backs glibc's large maps with huge pages too, so both fault little
  # glibc maps the 256 MiB afresh each call (65,536 faults); jemalloc keeps it from the call before.
  assert plain['faults'] > 30_000, plain
  assert end['faults'] < 1_000, (end, plain)


# A step with 512 MiB of temporaries run twice, then three 48 MiB arrays made that stay (as a train state's largest
# arrays do once a step has run), then the step again; prints (as its end line) the minor page faults of that last
# call.
_KEPT_ARRAYS_SCRIPT = textwrap.dedent("""
    import json, resource
    from jft import host_memory
    host_memory.reexec()
    import jax, jax.numpy as jnp
    host_memory.run_programs_inline()
    x = jnp.arange(2**25, dtype=jnp.float32) % 7.0
    step = jax.jit(lambda x: (jnp.sort(x) * jnp.sort(-x)).sum())
    step(x).block_until_ready()
    step(x).block_until_ready()
    kept = [jnp.full(12 << 20, float(i)) for i in range(3)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x).block_until_ready()
    print(json.dumps({'phase': 'end', 'setting': host_memory.describe(),
                      'faults': resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
""")


@pytest.mark.skipif(host_memory.find_jemalloc() is None or host_memory.glibc_version() is None,
                    reason='needs glibc and the system jemalloc (Debian / Ubuntu: apt install libjemalloc2)')
def test_arrays_that_stay_do_not_take_the_memory_a_step_keeps(tmp_path):
  # jemalloc's default sends blocks of 8 MiB and more to its arena for large blocks: there the kept arrays took a
  # piece of the step's freed 512 MiB, and the next call mapped 512 MiB afresh (131,077 faults, 2026-12-08).
  _, end = _run_step(tmp_path, _KEPT_ARRAYS_SCRIPT)
  assert end['setting'] == 'jemalloc'
  assert end['faults'] < 1_000, end  # the step's memory reused whole


@pytest.mark.parametrize('variable, value, choices', [('JFT_ALLOCATOR', 'tcmalloc', 'jemalloc or glibc'),
                                                      ('JFT_CPU_DISPATCH', 'sync', 'inline or async')])
def test_the_command_line_exits_2_on_an_unknown_setting(tmp_path, variable, value, choices):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, '-m', 'jft.main', '--config=configs/digits_cnn.py:quick',
                           f'--workdir={tmp_path / "run"}'], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, variable: value})
  assert result.returncode == 2, result.stderr[-2000:]
  assert f"{variable}='{value}'" in result.stderr and choices in result.stderr
  assert not (tmp_path / 'run').exists()  # stopped before anything was written


# A program of about 0.1-0.3 s on 2 cores, called once compiled while another thread counts; prints whether its result
# was ready when the call returned and how far the other thread counted during the call.
_DISPATCH_SCRIPT = textwrap.dedent("""
    import json, threading, time
    from jft import host_memory
    choice = host_memory.run_programs_inline()
    import jax, jax.numpy as jnp
    program = jax.jit(lambda x: jnp.linalg.matrix_power(x, 8).sum())
    x = jnp.full((1500, 1500), 1 / 1500, jnp.float32)
    program(x).block_until_ready()
    count, done = [0], threading.Event()
    def counter():
      while not done.is_set():
        count[0] += 1
    thread = threading.Thread(target=counter)
    thread.start()
    time.sleep(0.05)
    before = count[0]
    result = program(x)
    ready, during = result.is_ready(), count[0] - before
    done.set()
    thread.join()
    print(json.dumps({'choice': choice, 'ready_on_return': ready, 'counted_during_call': during}))
""")


@pytest.mark.parametrize('environ, inline', [({}, True), ({'JFT_CPU_DISPATCH': 'inline'}, True),
                                             ({'JFT_CPU_DISPATCH': 'async'}, False)])
def test_cpu_programs_run_inline_with_the_gil_released(environ, inline):
  env = {key: value for key, value in os.environ.items() if key != host_memory.DISPATCH_VARIABLE}
  result = subprocess.run([sys.executable, '-c', _DISPATCH_SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**env, 'JAX_PLATFORMS': 'cpu', **environ}, check=True)
  line = json.loads(result.stdout.splitlines()[-1])
  assert line['choice'] == ('inline' if inline else 'async')
  # Inline, the call returns with the result computed (and its temporaries freed); asynchronously, at once.
  assert line['ready_on_return'] is inline, line
  if inline:  # the other thread ran while the program did: the threads that make programs ahead are not held up
    assert line['counted_during_call'] > 1000, line


def test_an_unknown_cpu_dispatch_is_an_error_that_names_the_choices():
  with pytest.raises(ValueError, match="JFT_CPU_DISPATCH='sync': use inline or async"):
    host_memory.cpu_dispatch({'JFT_CPU_DISPATCH': 'sync'})


def test_inline_programs_asked_for_too_late_is_an_error():
  jax.devices()  # this test process has made its clients
  with pytest.raises(RuntimeError, match='before anything asks jax about devices'):
    host_memory.run_programs_inline({})

