"""The PyTorch + transformers counterpart of jft's main job (configs/minilm_fortunes.py), for the end-to-end mode
of benchmarks/vs_pytorch.py. Runs only in the PyTorch virtual environment.

python pytorch_fortunes.py --data=SPLITS.json --model_dir=DIR --steps=700 --warmup_steps=70 --eval_every=100
                           [--autocast=bfloat16]
SPLITS.json: {"train": {"texts": [...], "labels": [...]}, "validation": {...}, "test": {...}}, written by
vs_pytorch.py from jft's own fortunes8 builder, so both read the same texts. The recipe is jft's: the MiniLM
tokenizer (tokenizer.json, truncation at 128 tokens), batch 32, length-grouped batches (shuffled, sorted by length
within windows of 64 batches, padded to the longest text of the batch: as transformers' `group_by_length`),
mean pooling, a new head, dropout 0.1, AdamW (lr 1e-4, weight decay 0.01 but not on biases and LayerNorm),
linear warmup and decay, clipping at norm 1.0; validation every `eval_every` steps and test at the end, of the
weights `--test_on` names as jft's `config.test_on` does: `best`, those of the best validation accuracy (the
first of equals: a copy is kept in memory at each new best, timed as `checkpoint`), or `last`.
`--autocast=bfloat16`: the forward passes (and the loss) under `torch.autocast`, as jft's `model.dtype='bfloat16'`.
Prints one JSON line: the wall time from start to the test metrics (and, as `seconds`, how it splits into setup,
training, validation, checkpoint and test, as jft's test record does), the test accuracy of `--test_on`, and as
`tests` both the best and the last weights' test accuracy with their steps: where they differ, the other one is
tested after the timed run (`seconds['other_test']`, not in `total`), for comparisons under either rule.
"""

import argparse
import json
import time

START = time.perf_counter()

import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
from pytorch_minilm import MeanPoolClassifier, autocast_context, make_optimizer  # noqa: E402

BATCH = 32
SORT_WINDOW = 64


def tokenize(texts: list[str], model_dir: str, max_len: int) -> list[list[int]]:
  tokenizer = tokenizers.Tokenizer.from_file(f'{model_dir}/tokenizer.json')
  tokenizer.no_padding()
  tokenizer.enable_truncation(max_len)
  return [encoding.ids for encoding in tokenizer.encode_batch(texts)]


def pad(ids: list[list[int]]) -> dict[str, torch.Tensor]:
  length = max(len(row) for row in ids)
  input_ids = torch.zeros((len(ids), length), dtype=torch.long)
  for i, row in enumerate(ids):
    input_ids[i, :len(row)] = torch.tensor(row)
  return {'input_ids': input_ids, 'attention_mask': (input_ids != 0).long(),
          'token_type_ids': torch.zeros_like(input_ids)}


def epoch_batches(lengths: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
  order = rng.permutation(len(lengths))[:len(lengths) // BATCH * BATCH]
  window = SORT_WINDOW * BATCH
  for start in range(0, len(order), window):
    chunk = order[start:start + window]
    order[start:start + window] = chunk[np.argsort(lengths[chunk], kind='stable')]
  batches = order.reshape(-1, BATCH)
  return [batches[i] for i in rng.permutation(len(batches))]


def accuracy(model, ids: list[list[int]], labels: np.ndarray, autocast: str | None = None) -> float:
  model.eval()
  order = np.argsort([len(row) for row in ids], kind='stable')
  correct = 0
  with torch.inference_mode(), autocast_context('cpu', autocast):
    for start in range(0, len(order), BATCH):
      chunk = order[start:start + BATCH]
      logits = model(**pad([ids[i] for i in chunk]))
      correct += int((logits.argmax(-1).numpy() == labels[chunk]).sum())
  model.train()
  return correct / len(labels)


def main():
  parser = argparse.ArgumentParser()
  for name, kind in (('data', str), ('model_dir', str), ('steps', int), ('warmup_steps', int), ('eval_every', int),
                     ('lr', float), ('weight_decay', float), ('seed', int), ('max_len', int), ('autocast', str)):
    parser.add_argument(f'--{name}', type=kind)
  parser.add_argument('--test_on', choices=('best', 'last'), default='last')
  parser.set_defaults(lr=1e-4, weight_decay=0.01, seed=0, max_len=128)
  args = parser.parse_args()
  torch.manual_seed(args.seed)
  with open(args.data) as f:
    splits = json.load(f)
  ids = {name: tokenize(split['texts'], args.model_dir, args.max_len) for name, split in splits.items()}
  labels = {name: np.asarray(split['labels']) for name, split in splits.items()}
  model = MeanPoolClassifier(args.model_dir, int(labels['train'].max()) + 1, 0.1)
  optimizer, schedule = make_optimizer(model, args.lr, args.weight_decay, args.warmup_steps, args.steps)
  model.train()
  lengths = np.asarray([len(row) for row in ids['train']])
  rng, batches, step, curve = np.random.default_rng(args.seed), [], 0, []
  best_accuracy, best_step, best_weights = None, None, None
  # as jft's test record splits its run
  seconds = {'setup': time.perf_counter() - START, 'validation': 0.0, 'checkpoint': 0.0}
  while step < args.steps:
    if not batches:
      batches = epoch_batches(lengths, rng)
    chunk = batches.pop()
    optimizer.zero_grad(set_to_none=True)
    with autocast_context('cpu', args.autocast):
      logits = model(**pad([ids['train'][i] for i in chunk]))
      loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(labels['train'][chunk]))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    step += 1
    if step % args.eval_every == 0 or step == args.steps:
      start = time.perf_counter()
      validation = accuracy(model, ids['validation'], labels['validation'], args.autocast)
      curve.append({'step': step, 'validation_accuracy': validation})
      seconds['validation'] += time.perf_counter() - start
      if best_accuracy is None or validation > best_accuracy:  # strictly better, as jft's early_stopping.Best
        start = time.perf_counter()
        best_accuracy, best_step = validation, step
        best_weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        seconds['checkpoint'] += time.perf_counter() - start
  # Both rules' tests, the last weights first (loading the best ones replaces them); where they differ, the test of
  # the rule not asked for is timed apart and left out of the run's time.
  tested_steps, tests = {'last': step, 'best': best_step}, {}
  for which in ('last', 'best'):
    start = time.perf_counter()
    if which == 'best' and best_step == step:
      tests['best'] = tests['last']
      continue
    if which == 'best':
      model.load_state_dict(best_weights)
    test_accuracy = accuracy(model, ids['test'], labels['test'], args.autocast)
    tests[which] = {'step': tested_steps[which], 'accuracy': test_accuracy}
    seconds['test' if which == args.test_on or best_step == step else 'other_test'] = time.perf_counter() - start
  seconds['total'] = time.perf_counter() - START - seconds.get('other_test', 0.0)
  seconds['train'] = (seconds['total'] - seconds['setup'] - seconds['validation'] - seconds['checkpoint']
                      - seconds['test'])
  print(json.dumps({'wall_s': seconds['total'], 'test_accuracy': tests[args.test_on]['accuracy'],
                    'test_on': args.test_on, 'tests': tests, 'steps': step, 'seconds': seconds,
                    'validation': curve, 'torch': torch.__version__, 'threads': torch.get_num_threads()}))


if __name__ == '__main__':
  main()
