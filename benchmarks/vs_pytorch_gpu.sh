#!/bin/bash
# benchmarks/vs_pytorch.py on a GPU machine: jft (jax with CUDA) against PyTorch + transformers (CUDA), same GPU.
#
# bash benchmarks/vs_pytorch_gpu.sh [CONFIG_JSON] [OUT_DIR] [RUN ...]
# Needs one python3 that holds jax with CUDA, flax, optax, ml_collections, torch and transformers (PyTorch runs
# in that same interpreter here, not in a CPU venv). CONFIG_JSON: a BERT config.json (default: the installed
# MiniLM's); weights are drawn at random by transformers from it and saved once, and both frameworks load that
# same file, so the pretrained package need not be on the GPU machine (a step's time does not depend on the
# weights' values). RUN: which of the runs below (default: all), e.g. b256_bf16 for bf16 mixed precision in both
# (jft's model.dtype, torch.autocast) at 256 x 128. Prints each run's table; logs go to OUT_DIR/vs_pytorch_RUN.log
# (default OUT_DIR: the current directory).
set -o pipefail
config=${1:-$(python3 -c "from jft import model_files; print(model_files.pretrained_file('minilm', 'config.json'))")}
config=$(realpath "$config")
out=$(realpath "${2:-.}")
runs=("${@:3}")
[ ${#runs[@]} -eq 0 ] && runs=(b32_tf32 b32_float32 b256_tf32 b256_float32 b32_bf16 b256_bf16)
cd "$(dirname "$0")" || exit 1
export PYTHONPATH=$PWD/..${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false HF_HUB_OFFLINE=1
model=$(mktemp -d)
venv=$(mktemp -d)
trap 'rm -rf "$model" "$venv"' EXIT
python3 -c "import sys, transformers as t
t.BertModel(t.BertConfig.from_json_file(sys.argv[1]), add_pooling_layer=False).save_pretrained(sys.argv[2])" \
  "$config" "$model" >/dev/null 2>&1 || { echo "could not write random BERT weights from $config" >&2; exit 2; }
# vs_pytorch.py runs its PyTorch worker with VENV/bin/python: point that at this python3.
mkdir -p "$venv/bin" && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" >"$venv/bin/python" && chmod +x "$venv/bin/python"
run() {
  name=$1; shift
  echo "=== $name: $*"
  python3 vs_pytorch.py --torch_venv="$venv" --model="$model" "$@" 2>&1 | grep --line-buffered -v '^[WI][0-9]' | tee "$out/$name.log" | tail -9
}
for name in "${runs[@]}"; do
  case $name in
    b32_tf32) args=(--rounds=10 --round_size=10) ;;
    b32_float32) args=(--matmul_precision=float32 --rounds=10 --round_size=10) ;;
    b32_bf16) args=(--dtype=bfloat16 --rounds=10 --round_size=10) ;;
    b256_tf32) args=(--batch_size=256 --lengths=128 --rounds=8 --round_size=5) ;;
    b256_float32) args=(--matmul_precision=float32 --batch_size=256 --lengths=128 --rounds=8 --round_size=5) ;;
    b256_bf16) args=(--dtype=bfloat16 --batch_size=256 --lengths=128 --rounds=8 --round_size=5) ;;
    *) echo "unknown run $name (b32_tf32, b32_float32, b32_bf16, b256_tf32, b256_float32, b256_bf16)" >&2; exit 2 ;;
  esac
  run "vs_pytorch_$name" "${args[@]}"
done
