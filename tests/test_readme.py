"""The README's Python API script runs as written and learns."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_api_script_runs(tmp_path):
  with open(os.path.join(ROOT, 'README.md')) as f:
    (script,) = re.findall(r'```python\n(.*?)```', f.read(), flags=re.DOTALL)
  env = {**os.environ, 'TFDS_DATA_DIR': str(tmp_path)}
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  accuracy = float(re.search(r'test accuracy ([0-9.]+)', result.stdout).group(1))
  assert accuracy > 0.8  # chance is 0.1
