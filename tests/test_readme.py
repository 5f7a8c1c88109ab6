"""The README's Python snippets run as written; the training script learns."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_snippets():
  with open(os.path.join(ROOT, 'README.md')) as f:
    return re.findall(r'```python\n(.*?)```', f.read(), flags=re.DOTALL)


def test_readme_pretrained_snippet_runs():
  (script,) = [s for s in readme_snippets() if 'pretrained.load' in s]
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split('\n')[-2] == '(1, 128, 384) (1, 384)'


def test_readme_python_api_script_runs(tmp_path):
  (script,) = [s for s in readme_snippets() if 'train_step' in s]
  env = {**os.environ, 'TFDS_DATA_DIR': str(tmp_path)}
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  accuracy = float(re.search(r'test accuracy ([0-9.]+)', result.stdout).group(1))
  assert accuracy > 0.4  # 8 classes, the largest 19% of the test texts
