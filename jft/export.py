"""A run's model for use elsewhere: `python -m jft.export --workdir=DIR --out=OUT [--format=F] [--step=N]`.

`--format=hf` (a BERT run's default) and `--format=peft` (a LoRA run's adapters) write directories that
`transformers` and `peft` load (jft/hf_export.py). `--format=jft-pruned` (the default for pruned runs and for
other models) writes the one safetensors file below.

The pruned model, compressed:
Reads the parameters and pruning masks of a jft checkpoint with plain orbax (`jft.init.read_run`), strips the
masks, and writes one safetensors file: each pruned tensor as a bitmask of its kept weights (`PATH::bitmask`,
uint8, one bit per weight) plus the kept values in order (`PATH::values`), every other tensor as it is (`PATH`).
The metadata says which is which and each tensor's shape and dtype. `load(OUT)` gives back the dense parameters,
bit-identical to the masked ones. With `--int8` (the default for a run trained with quantization, jft/int8.py)
the quantized weights are stored as int8 values (`PATH::int8`, all of them or the kept ones after the bitmask) and
float32 per-channel scales (`PATH::scale`), and `load(OUT)` gives float32(q) * scale, bit-identical to the weights
the quantized model computes with. Prints dense vs compressed bytes, overall and per top-level module.
"""

import json
import os
import sys
from typing import Any

import ml_collections
import numpy as np
from absl import flags
from safetensors.numpy import load_file, save_file

from jft import hf_export, int8, lora, pruning, tree_paths
from jft import init as init_lib
from jft.errors import UserError

PyTree = Any
FORMAT = 'jft-pruned-v1'

_WORKDIR = flags.DEFINE_string('workdir', None, 'a jft work directory (its latest checkpoint unless --step)')
_OUT = flags.DEFINE_string('out', None, 'the .safetensors file to write')
_STEP = flags.DEFINE_integer('step', None, 'the checkpoint step to export (default: the latest)')
FORMATS = ('jft-pruned', 'hf', 'peft')
_INT8 = flags.DEFINE_bool('int8', None, 'store the quantized weights as int8 values + per-channel scales '
                          '(jft/int8.py; default: on for a run trained with config.quantize.mode=qat)')
_FORMAT = flags.DEFINE_enum('format', None, FORMATS, 'what to write (default: jft-pruned for pruned runs and '
                            'non-BERT models, else hf)')
USAGE = 'usage: python -m jft.export --workdir=DIR --out=OUT [--format=jft-pruned|hf|peft] [--int8] [--step=N]'


def read_params_and_masks(workdir: str, step: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """({path: parameter}, {path: mask} of the pruned ones) of a checkpoint, as host numpy arrays; LoRA adapters
  are merged into the weights they adapt."""
  run = init_lib.read_run(workdir, items=('params', 'masks'), step=step)
  if run is None:
    raise UserError(f'{workdir} has no checkpoint; give the work directory of a jft run')
  return params_and_masks(run)


def params_and_masks(run: init_lib.Run) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  params = lora.merged_for_run(run.params, run.config)
  return tree_paths.flatten(params), tree_paths.flatten(run.masks or {})  # the unpruned (None) drop out


def compress(params: dict[str, np.ndarray], masks: dict[str, np.ndarray],
             quantized: dict[str, int8.Quantized] | None = None) -> tuple[dict[str, np.ndarray], dict]:
  """(tensors to save, metadata): a bitmask and the kept values for each masked parameter, the rest dense; with
  `quantized` ({path: its int8 form}), those as int8 values (all, or the kept ones) and per-channel scales."""
  quantized = quantized or {}
  tensors, layout = {}, {}
  for path, value in params.items():
    value = np.asarray(value)
    entry = {'shape': list(value.shape), 'dtype': str(value.dtype)}
    values = value
    if path in quantized:
      values = quantized[path].values
      tensors[f'{path}::scale'] = np.ascontiguousarray(quantized[path].scales.reshape(-1))
      entry['axis'] = quantized[path].axis
    if path in masks:
      mask = np.asarray(masks[path], bool)
      if mask.shape != value.shape:
        raise UserError(f'the mask of {path} is {mask.shape} but the parameter is {value.shape}: a broken checkpoint')
      tensors[f'{path}::bitmask'] = np.packbits(mask.reshape(-1))
      tensors[f'{path}::{"int8" if path in quantized else "values"}'] = np.ascontiguousarray(
          values.reshape(-1)[mask.reshape(-1)])
      layout[path] = {**entry, 'format': 'bitmask-int8' if path in quantized else 'bitmask'}
    elif path in quantized:
      tensors[f'{path}::int8'] = np.ascontiguousarray(values)
      layout[path] = {**entry, 'format': 'int8'}
    else:
      tensors[path] = np.ascontiguousarray(value)
      layout[path] = {**entry, 'format': 'dense'}
  return tensors, layout


def decompress(tensors: dict[str, np.ndarray], layout: dict[str, dict]) -> dict[str, np.ndarray]:
  """{path: dense parameter}: pruned weights are exactly 0, the others the stored values (int8 ones dequantized
  to float32(q) * scale, the values the quantized model computed with)."""
  params = {}
  for path, entry in layout.items():
    shape, dtype, form = tuple(entry['shape']), np.dtype(entry['dtype']), entry['format']
    if form == 'dense':
      params[path] = tensors[path].astype(dtype, copy=False).reshape(shape)
      continue
    quantized = form.endswith('int8')
    stored = tensors[f'{path}::{"int8" if quantized else "values"}']
    if form.startswith('bitmask'):
      mask = np.unpackbits(tensors[f'{path}::bitmask'], count=int(np.prod(shape))).astype(bool)
      stored, kept = np.zeros(mask.size, stored.dtype), stored
      stored[mask] = kept
    if quantized:
      scale_shape = [shape[axis] if axis == entry['axis'] else 1 for axis in range(len(shape))]
      scales = tensors[f'{path}::scale'].reshape(scale_shape)
      params[path] = int8.dequantize(int8.Quantized(stored.reshape(shape), scales, entry['axis']), xp=np)
    else:
      params[path] = stored.reshape(shape)
  return params


def save(path: str, params: dict[str, np.ndarray], masks: dict[str, np.ndarray],
         quantized: dict[str, int8.Quantized] | None = None) -> dict[str, int]:
  """Writes the compressed file; returns {'dense_bytes', 'compressed_bytes'}."""
  tensors, layout = compress(params, masks, quantized)
  save_file(tensors, path, metadata={'format': FORMAT, 'layout': json.dumps(layout)})
  return {'dense_bytes': sum(np.asarray(p).nbytes for p in params.values()),
          'compressed_bytes': sum(t.nbytes for t in tensors.values())}


def load(path: str) -> PyTree:
  """The dense parameter tree of a file written by `save` (bit-identical to the masked parameters)."""
  with open(path, 'rb') as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), 'little')))
  metadata = header.get('__metadata__', {})
  if metadata.get('format') != FORMAT:
    raise UserError(f'{path} is not a jft pruned export (format {metadata.get("format")!r}); write one with '
                    '`python -m jft.export`')
  return tree_paths.unflatten(decompress(load_file(path), json.loads(metadata['layout'])))


def size_table(params: dict[str, np.ndarray], masks: dict[str, np.ndarray],
               quantized: dict[str, int8.Quantized] | None = None) -> list[dict[str, Any]]:
  """Dense and compressed bytes per top-level module and in all, as `save` stores them."""
  tensors, layout = compress(params, masks, quantized)
  rows: dict[str, dict[str, Any]] = {}
  for path in layout:
    module = path.split('/')[0]
    row = rows.setdefault(module, {'module': module, 'dense_bytes': 0, 'compressed_bytes': 0})
    row['dense_bytes'] += np.asarray(params[path]).nbytes
    row['compressed_bytes'] += sum(t.nbytes for name, t in tensors.items() if name.split('::')[0] == path)
  total = {'module': 'all', 'dense_bytes': sum(r['dense_bytes'] for r in rows.values()),
           'compressed_bytes': sum(r['compressed_bytes'] for r in rows.values())}
  return [*rows.values(), total]


def default_format(run_config: dict) -> str:
  """jft-pruned for pruned runs and for models without a Hugging Face form, else hf."""
  config = ml_collections.ConfigDict(run_config)
  return 'hf' if config.model.name == 'bert' and not pruning.is_on(config.get('prune')) else 'jft-pruned'


def main() -> None:
  try:
    flags.FLAGS(sys.argv)
  except flags.Error as e:
    print(f'jft: error: {e}\n{USAGE}', file=sys.stderr)
    sys.exit(2)
  if not _WORKDIR.value or not _OUT.value:
    print(f'jft: error: both --workdir=DIR and --out=OUT are required\n{USAGE}', file=sys.stderr)
    sys.exit(2)
  try:
    run = init_lib.read_run(_WORKDIR.value, items=('params', 'masks'), step=_STEP.value)
    if run is None:
      raise UserError(f'{_WORKDIR.value} has no checkpoint; give the work directory of a jft run')
    run_targets = int8.settings(ml_collections.ConfigDict(run.config))
    as_int8 = run_targets is not None if _INT8.value is None else _INT8.value
    chosen = _FORMAT.value or ('jft-pruned' if as_int8 else default_format(run.config))
    if chosen != 'jft-pruned':
      if as_int8:
        raise UserError(f'--format={chosen} stores float weights; int8 weights are stored by --format=jft-pruned '
                        '(or leave out --int8)')
      export = hf_export.export_hf if chosen == 'hf' else hf_export.export_peft
      print(json.dumps(export(run, _OUT.value)))
      return
    params, masks = params_and_masks(run)
    quantized = int8.quantize_flat(params, run_targets or int8.DEFAULT_TARGETS) if as_int8 else None
    save(_OUT.value, params, masks, quantized)
    rows = size_table(params, masks, quantized)
  except UserError as e:
    print(f'jft: error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'{"module":<14} {"dense bytes":>14} {"compressed":>14} {"ratio":>7}')
  for row in rows:
    print(f"{row['module']:<14} {row['dense_bytes']:>14,} {row['compressed_bytes']:>14,} "
          f"{row['compressed_bytes'] / row['dense_bytes']:>7.3f}")
  print(json.dumps({'out': _OUT.value, 'file_bytes': os.path.getsize(_OUT.value), 'sizes': rows}))


if __name__ == '__main__':
  main()
