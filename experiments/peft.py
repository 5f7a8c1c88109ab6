"""Parameter-efficient fine-tuning of MiniLM on fortunes8: full fine-tuning vs LoRA at rank 4, 8 and 16 vs a linear
probe, each trained to the end and with early stopping.

python experiments/peft.py [--quick] [--only=NAME,...] [--seeds=0,1,2]
Each row is `python -m jft.main --config=configs/minilm_fortunes.py:VARIANT [overrides]` in experiments/runs/NAME
(a finished run is reused when its saved config is the one asked for; else it is an error). LoRA runs use
alpha = 2 x rank and the `lora` variant's learning rate. Early stopping: patience 2 evaluations (every 100 steps)
on validation accuracy, then the test of the best validation checkpoint. A run with early stopping trains exactly
as the same run without it (same seed, data order and learning-rate schedule) up to the evaluation it stops at,
so its row is found by feeding the full run's validation curve to jft's own `EarlyStopping`: where that stop leaves
the tested checkpoint unchanged, the full run's test is its test; otherwise the run is trained for real. A real
early-stopping run found in experiments/runs is checked against the replay. Trainable parameters and optimizer-state
bytes come from the resolved rules; the step time is measured here, the variants' steps interleaved on one batch
of 32 x 64 tokens. Writes experiments/results/peft.md and peft.png.
"""

import argparse
import os
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from common import (  # noqa: E402
  RESULTS,
  check_reused,
  correct,
  evaluated,
  interval_cell,
  load_config,
  mcnemar_cells,
  mean_std,
  read_metrics,
  run_jft,
)
from freezing import footprint  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
from minilm_setup import MiniLMSetup, median_step_times  # noqa: E402
from timing import machine  # noqa: E402

from jft import early_stopping, lora, metrics  # noqa: E402

# label -> (config variant, overrides)
VARIANTS = {
    'linear probe': ('probe', ()),
    'LoRA rank 4': ('lora', ('--config.lora.rank=4', '--config.lora.alpha=8.0')),
    'LoRA rank 8': ('lora', ()),
    'LoRA rank 16': ('lora', ('--config.lora.rank=16', '--config.lora.alpha=32.0')),
    'full fine-tuning': ('', ()),
}
EARLY_STOPPING = ('--config.early_stopping.patience=2',)
# The claim (LoRA rank 8 within 2 points of full fine-tuning) rests on these two rows: they also run with the
# other seeds (--config.seed; the seed sets the new weights' initialisation, dropout and the data order).
CLAIM = ('LoRA rank 8', 'full fine-tuning')
SEEDS = (0, 1, 2)


def run_name(variant: str, overrides: tuple[str, ...], quick: bool, early: bool, seed: int = 0) -> str:
  parts = ['minilm_fortunes', variant] + [o.split('=')[0].split('.')[-1] + o.split('=')[1] for o in overrides
                                          if 'rank' in o] + (['early'] if early else []) + (['quick'] if quick else [])
  return '_'.join(p for p in parts if p) + (f'_seed{seed}' if seed else '')


def config_spec(variant: str, quick: bool) -> str:
  variants = ','.join(v for v in (variant, 'quick' if quick else '') if v)
  return 'configs/minilm_fortunes.py' + (f':{variants}' if variants else '')


def replay_early_stopping(name: str, config) -> dict | None:
  """The test line the run NAME would end with had `config.early_stopping` been on, from its validation curve;
  None when the stop would test another checkpoint than NAME tested (then only a real run tells)."""
  lines = read_metrics(name)
  test = [line for line in lines if line['split'] == 'test'][-1]
  stopper = early_stopping.from_config(config)
  best = early_stopping.Best(config.checkpoint.best_metric, config.checkpoint.best_mode)
  for line in lines:
    if line['split'] != 'validation':
      continue
    best.update(line['step'], line)
    stopper.update(line['step'], line)
    if stopper.stop:
      break
  if stopper.stop and line['step'] < test['step'] and best.step != test['tested_step']:
    return None
  return dict(test, step=line['step'] if stopper.stop else test['step'], replayed_from=name)


def seed_run(label: str, seed: int, quick: bool) -> str:
  """The name of run LABEL with `--config.seed=SEED`, trained unless finished (seed 0: the table's own run)."""
  variant, overrides = VARIANTS[label]
  overrides = overrides + ((f'--config.seed={seed}',) if seed else ())
  name = run_name(variant, overrides, quick, False, seed)
  check_reused(name, load_config(config_spec(variant, quick), *overrides))
  run_jft(name, config_spec(variant, quick), *overrides)
  return name


def claim_table(claim: dict[str, dict[int, str]]) -> list[str]:
  """LoRA rank 8 against full fine-tuning per seed, paired on the same test texts (exact McNemar)."""
  lora, full = ({seed: evaluated(name) for seed, name in claim[label].items()} for label in CLAIM)
  accuracy = {CLAIM[0]: [r['float32']['accuracy'] for r in lora.values()],
              CLAIM[1]: [r['float32']['accuracy'] for r in full.values()]}
  gaps = [a - b for a, b in zip(*accuracy.values(), strict=True)]
  tests = [metrics.mcnemar(correct(lora[seed]), correct(full[seed])) for seed in lora]
  interval = metrics.paired_difference_interval([correct(lora[seed]) for seed in lora],
                                                [correct(full[seed]) for seed in lora])
  lines = ['', f'## {CLAIM[0]} vs {CLAIM[1]} over seeds', '',
           'Test accuracy (points) of the best validation checkpoint; McNemar: texts right only with LoRA / only '
           'with full fine-tuning, exact p; in brackets, the 95% interval over texts of the mean gap (paired '
           'bootstrap, `jft.metrics.paired_difference_interval`).', '',
           f'| seed | {CLAIM[0]} | {CLAIM[1]} | LoRA - full | McNemar |', '|---|---|---|---|---|']
  for seed, a, b, test in zip(lora, *accuracy.values(), tests, strict=True):
    lines.append(f'| {seed} | {100 * a:.1f} | {100 * b:.1f} | {100 * (a - b):+.1f} | {mcnemar_cells([test])} |')
  lines.append(f'| mean ± std | {mean_std(accuracy[CLAIM[0]])} | {mean_std(accuracy[CLAIM[1]])} | '
               f'{mean_std(gaps)}{interval_cell(interval)} | |')
  return lines


def step_times(labels, batch_size: int = 32, length: int = 64, steps: int = 6) -> dict[str, float]:
  """Median seconds of each variant's train step, interleaved on one batch (the probe freezes all but the head;
  LoRA freezes the encoder and trains adapters through the merge; full trains everything)."""
  setup = MiniLMSetup(batch_size, length)
  runs = {}
  for label in labels:
    variant, overrides = VARIANTS[label]
    config = load_config(config_spec(variant, False), *overrides)
    settings = lora.settings(config)
    runs[label] = setup.state_and_step(tuple(config.freeze), lora_settings=settings)
  return median_step_times(setup, runs, steps)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true', help='the :quick variants: checks the script, not the numbers')
  parser.add_argument('--only', default='', help='comma-separated labels to run (default: all)')
  parser.add_argument('--seeds', default=','.join(map(str, SEEDS)), help=f'the seeds of the rows {CLAIM}')
  args = parser.parse_args()
  labels = [label for label in VARIANTS if not args.only or label in args.only.split(',')]
  suffix = '_quick' if args.quick else ''
  os.makedirs(RESULTS, exist_ok=True)
  rows = {}
  for early in (False, True):
    for label in labels:
      variant, overrides = VARIANTS[label]
      full_name = run_name(variant, overrides, args.quick, False)
      overrides = overrides + (EARLY_STOPPING if early else ())
      name = run_name(variant, overrides, args.quick, early)
      config = load_config(config_spec(variant, args.quick), *overrides)
      check_reused(name, config)
      replayed = replay_early_stopping(full_name, config) if early else None
      done = [line for line in read_metrics(name) if line['split'] == 'test']
      if replayed and done:  # a real run with early stopping on: the replay must say what it did
        real = {key: done[-1][key] for key in ('step', 'tested_step', 'accuracy', 'macro_f1')}
        if real != {key: replayed[key] for key in real}:
          raise SystemExit(f'{name} ended with {real}, the replay of {full_name} says {replayed}')
        print(f'{name}: the real run agrees with the replay of {full_name}: {real}')
      test = done[-1] if done else replayed or run_jft(name, config_spec(variant, args.quick), *overrides)
      trainable, state_bytes = footprint(config)
      validation = [line for line in read_metrics(test.get('replayed_from', name)) if line['split'] == 'validation'
                    and line['step'] <= test['step']]
      rows[label, early] = dict(accuracy=test['accuracy'], macro_f1=test['macro_f1'], trainable=trainable,
                                state_bytes=state_bytes, tested_step=test.get('tested_step'), last_step=test['step'],
                                best_validation=max(line['accuracy'] for line in validation),
                                replayed='replayed_from' in test)
  seeds = [int(seed) for seed in args.seeds.split(',')]
  claim = {label: {seed: seed_run(label, seed, args.quick) for seed in seeds} for label in CLAIM if label in labels}
  times = step_times(labels)
  encoder = rows[labels[-1], False]['trainable'] if labels[-1] == 'full fine-tuning' else None

  header = ('| what trains | test accuracy | test macro-F1 | trainable parameters | optimizer state '
            '| step time, 32 x 64 | with early stopping: stopped at | its test step | its test accuracy |')
  table = ['# Parameter-efficient fine-tuning of MiniLM on fortunes8', '',
           'Produced by `python experiments/peft.py`' + (' --quick (smoke run: not results)' if args.quick else '')
           + '; seed 0 (the rows of the claim over more seeds below); up to 700 steps of batch 32; the test of the '
           "best validation checkpoint (test_on 'best'); test split, 458 texts (one seed's standard error is about 2 "
           'points). Early stopping: patience 2 '
           'evaluations of validation accuracy, every 100 steps. Step times: one process, the variants interleaved '
           'on one batch of 32 x 64 tokens. LoRA: alpha = 2 x rank on every attention and MLP kernel, lr 5e-4; '
           'the head trains fully.', '', header, '|---|---|---|---|---|---|---|---|---|']
  for label in labels:
    r, e = rows[label, False], rows[label, True]
    share = f" ({r['trainable'] / encoder:.2%})" if encoder else ''
    table.append(f"| {label} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['trainable']:,}{share} | "
                 f"{r['state_bytes'] / 2**20:.2f} MiB | {times[label] * 1e3:.0f} ms | {e['last_step']} | "
                 f"{e['tested_step']} | {e['accuracy']:.3f}{' *' if e['replayed'] else ''} |")
  table += ['', 'Early stopping: "stopped at" 700 is the end of the run (no stop before it). The results marked * '
            'are replays of the full run (the same run with early stopping on trains identically until it stops: '
            '`replay_early_stopping`); the others come from real runs with early stopping on (the probe\'s real run '
            'agrees with its replay).', '',
            f'Machine: {machine()}. Step times are for comparing within the column (the variants take turns).']
  if len(claim) == len(CLAIM):
    table += claim_table(claim)
  with open(os.path.join(RESULTS, f'peft{suffix}.md'), 'w') as f:
    f.write('\n'.join(table) + '\n')
  print('\n'.join(table))

  figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
  short = [label.replace('fine-tuning', 'FT').replace('linear ', '') for label in labels]
  left.bar(short, [rows[label, False]['accuracy'] for label in labels], color='tab:blue', label='700 steps')
  left.scatter(short, [rows[label, True]['accuracy'] for label in labels], color='tab:red', zorder=3,
               label='early stopping')
  left.set_ylim(0, 1)
  left.set_ylabel('test accuracy')
  left.legend(loc='lower right')
  left.set_title('fortunes8 test accuracy')
  right.bar(short, [rows[label, False]['trainable'] for label in labels], color='tab:green')
  right.set_yscale('log')
  right.set_ylabel('trainable parameters (log)')
  right.set_title('trainable parameters; step time (ms) on top')
  for x, label in enumerate(labels):
    right.annotate(f'{times[label] * 1e3:.0f} ms', (x, rows[label, False]['trainable']), ha='center',
                   va='bottom')
  figure.tight_layout()
  figure.savefig(os.path.join(RESULTS, f'peft{suffix}.png'), dpi=120)


if __name__ == '__main__':
  main()
