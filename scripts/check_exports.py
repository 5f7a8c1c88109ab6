"""Load jft's `hf` and `peft` exports of a LoRA run with transformers and peft (PyTorch), and compare outputs.

    python scripts/check_exports.py --workdir=RUN [--torch_venv=~/.cache/jft/torch-venv]
                                    [--out=experiments/results/export_check.json]

RUN is a finished LoRA run of a BERT classifier with mean pooling (e.g. `configs/minilm_fortunes.py:lora`, or
`:quick,lora` for a minute's check). In jft's environment the script exports RUN with `python -m jft.export` as
`hf` and as `peft` into a temporary directory, and computes jft's logits (the LoRA-wrapped classifier of the run,
unmerged, eval mode, float32) and last hidden states on the first 16 texts of the test split. Then it runs its
second half in the PyTorch environment (created on first use: torch==2.13.0 CPU, transformers, peft), which
computes the same with
  hf:   `BertModel.from_pretrained(HF, add_pooling_layer=False)` + the head of `head.safetensors`;
  peft: `PeftModel.from_pretrained(BertModel.from_pretrained(BASE, add_pooling_layer=False), PEFT)` + the head,
        and again after `merge_and_unload()`,
and writes the largest absolute differences from jft's to --out (JSON), with the versions that produced them.
PyTorch, transformers and peft are never jft dependencies: they live only in that environment.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
TORCH_PACKAGES = ('torch==2.13.0', 'transformers', 'peft', 'numpy', 'safetensors')
TORCH_INDEX = 'https://download.pytorch.org/whl/cpu'
TEXTS = 16


def torch_python(venv: str) -> str:
  """The python of `venv`, created with TORCH_PACKAGES if it does not exist (peft added if it lacks it)."""
  venv = pathlib.Path(venv).expanduser()
  python = venv / 'bin' / 'python'
  if not python.exists():
    print(f'creating the PyTorch environment {venv} (once) ...', flush=True)
    subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  if subprocess.run([str(python), '-c', 'import torch, transformers, peft'], capture_output=True).returncode:
    subprocess.run([str(python), '-m', 'pip', 'install', '-q', '--extra-index-url', TORCH_INDEX, *TORCH_PACKAGES],
                   check=True)
  return str(python)


def jft_half(workdir: str, scratch: str) -> dict:
  """Exports RUN as hf and peft under `scratch`, and saves jft's inputs and outputs there; returns the paths."""
  sys.path.insert(0, str(ROOT))
  import jax
  import ml_collections

  from jft import data, init, lora, models, pretrained
  from jft.apply_fn import linen_apply_fn

  paths = {name: os.path.join(scratch, name) for name in ('hf', 'peft')}
  for name, path in paths.items():
    subprocess.run([sys.executable, '-m', 'jft.export', f'--workdir={workdir}', f'--format={name}', f'--out={path}'],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
  run = init.read_run(workdir, items=('params', 'model_state'))
  config = ml_collections.ConfigDict(run.config)
  if config.model.get('pooling') != 'mean':
    raise SystemExit('this check is written for mean pooling (the head beside a BertModel)')
  batch = next(iter(data.eval_batches(config.data, f'{config.data.test_split.split("[")[0]}[:{TEXTS}]', TEXTS)))
  inputs = {k: np.asarray(batch[k]) for k in ('input_ids', 'attention_mask', 'token_type_ids') if k in batch}
  num_classes = run.params['head']['bias'].shape[0]
  module = models.get_model(config.model, num_classes)
  settings = lora.settings(config)
  apply_fn = lora.wrap_apply_fn(linen_apply_fn(module), settings.scale)
  logits, _ = apply_fn(run.params, run.model_state, inputs, False, jax.random.PRNGKey(0))
  encoder = pretrained.load(paths['hf'])
  hidden = encoder.module.apply(encoder.variables, inputs['input_ids'], inputs['attention_mask'],
                                inputs.get('token_type_ids')).last_hidden_state
  arrays = os.path.join(scratch, 'jft_outputs.npz')
  np.savez(arrays, logits=np.asarray(logits), last_hidden_state=np.asarray(hidden), **inputs)
  with open(os.path.join(paths['peft'], 'adapter_config.json')) as f:
    base = json.load(f)['base_model_name_or_path']
  return {**paths, 'arrays': arrays, 'base': base, 'workdir': workdir, 'texts': TEXTS}


def torch_half(job: dict) -> dict:
  """In the PyTorch environment: the exports' outputs, and their largest differences from jft's."""
  import importlib.metadata

  import peft
  import torch
  import transformers
  from safetensors.torch import load_file

  torch.set_grad_enabled(False)
  saved = np.load(job['arrays'])
  inputs = {k: torch.tensor(saved[k], dtype=torch.long) for k in ('input_ids', 'attention_mask', 'token_type_ids')
            if k in saved}
  head_tensors = load_file(os.path.join(job['hf'], 'head.safetensors'))
  head = torch.nn.Linear(*reversed(head_tensors['weight'].shape))
  head.load_state_dict(head_tensors)

  def outputs(encoder):
    hidden = encoder.eval()(**inputs).last_hidden_state
    weights = inputs['attention_mask'].unsqueeze(-1).to(hidden.dtype)
    return hidden, head((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0))

  def differences(encoder):
    hidden, logits = outputs(encoder)
    mask = saved['attention_mask'][..., None].astype(bool)  # padded positions are no one's output
    return {'logits': float(np.max(np.abs(logits.numpy() - saved['logits']))),
            'last_hidden_state': float(np.max(np.abs(np.where(mask, hidden.numpy() - saved['last_hidden_state'], 0))))}

  result = {'hf': differences(transformers.BertModel.from_pretrained(job['hf'], add_pooling_layer=False))}
  base = transformers.BertModel.from_pretrained(job['base'], add_pooling_layer=False)
  adapted = peft.PeftModel.from_pretrained(base, job['peft'])
  result['peft'] = differences(adapted)
  result['peft_merged'] = differences(adapted.merge_and_unload())
  result['versions'] = {name: importlib.metadata.version(name) for name in ('torch', 'transformers', 'peft')}
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', help='a finished LoRA run of a BERT classifier')
  parser.add_argument('--torch_venv', default='~/.cache/jft/torch-venv')
  parser.add_argument('--out', default=str(ROOT / 'experiments' / 'results' / 'export_check.json'))
  parser.add_argument('--torch_half', help=argparse.SUPPRESS)  # the JSON job, in the PyTorch environment
  args = parser.parse_args()
  if args.torch_half:
    print(json.dumps(torch_half(json.loads(args.torch_half))))
    return
  with tempfile.TemporaryDirectory() as scratch:
    job = jft_half(args.workdir, scratch)
    answer = subprocess.run([torch_python(args.torch_venv), __file__, f'--torch_half={json.dumps(job)}'],
                            capture_output=True, text=True, env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    if answer.returncode:
      raise SystemExit(answer.stderr[-4000:])
    result = {'workdir': args.workdir, 'texts': TEXTS, **json.loads(answer.stdout.strip().splitlines()[-1])}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  main()
