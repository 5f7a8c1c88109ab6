"""Compression of the fine-tuned MiniLM on fortunes8, with error bars: pruning to 80% and 90%, int8, both, over
three seeds, each paired with the dense run of its seed on the same test texts.

python experiments/compression.py [--seeds=0,1,2] [--quick] [--report_only] [--only=RECIPE:SPARSITY:SEED]

Runs (each `python -m jft.main` in experiments/runs/NAME; a finished run is reused only when its saved config is
the one asked for, a killed one resumes):
  dense           configs/minilm_fortunes.py with --config.seed=SEED (seed 0 is the README's main job,
                  runs/minilm_fortunes); the seed sets the head's initialisation, dropout and the data order
  gmp*            GMP* (Kurtic & Alistarh 2022) from the dense run of the same seed, all of it (head included):
                  700 steps; magnitude; 50% at step 50, then cubic to the target by step 500 with a mask update
                  every 50 steps and the learning rate rewound to its peak (1e-4) at each; 200 steps with the
                  mask fixed; distillation from that dense run as the only signal (weight 1.0, temperature 2)
  ft+gradual-erk  the best recipe of experiments/sparsity_sweep.py: pruning while fine-tuning the pretrained
                  MiniLM (the main job's 700 steps and learning rate), cubic from step 1 to the target at step
                  490, a mask update every 10 steps, sparsity spread over the tensors by Erdos-Renyi-Kernel
  gmp*-fisher     gmp* with weights ranked by the diagonal-Fisher criterion (prune.criterion='fisher')
Pruned: the encoder's dense kernels (jft's default `prune.include`); embeddings, biases, LayerNorm and the head
stay dense. Order: every recipe at 80% on seed 0; the one with the best validation accuracy there at its final
sparsity (chosen on validation, never on test) then runs at 80% and 90% on every seed, after the dense runs of
seeds 1 and 2.

Every run's tested checkpoint is evaluated again by `jft.quantize.evaluate_run` with float32 and int8 weights
(per-channel, every kernel and embedding: post-training quantization), keeping each test text's prediction
(RUN/quantized.json, as `python -m jft.quantize` writes it); the float32 evaluation must reproduce the run's own
test accuracy. Pairs: each pruned run against the dense run of its seed, each int8 model against its float32
one, by the exact McNemar test on the 458 test texts. Sizes: `jft.export.size_table` of the seed-0 checkpoints
(what `python -m jft.export [--int8]` writes: a bitmask plus the kept values for pruned tensors, int8 values
plus float32 per-channel scales), per top-level module.

Writes experiments/results/compression.md and compression.png (accuracy vs bytes, with LoRA rank 8 from
experiments/peft.py where it has run).
"""

import argparse
import os

import matplotlib
import matplotlib.ticker
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from common import (  # noqa: E402
  RESULTS,
  RUNS,
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

from jft import export, int8, metrics  # noqa: E402

CONFIG = 'configs/minilm_fortunes.py'
SEEDS = (0, 1, 2)
SPARSITIES = (0.8, 0.9)
# How each recipe prunes. start: from the dense fine-tuned run of the same seed (all of it, head included) or
# from the pretrained MiniLM with a new head (pruning while fine-tuning); schedule: the steps of the first and
# the last mask update and the steps between them, in the 700-step runs (quick_schedule: in the 12-step ones).
GMP_STAR = dict(start='dense', criterion='magnitude', scope='layer', initial_sparsity=0.5, schedule=(50, 500, 50),
                quick_schedule=(2, 8, 2), rewind_lr=True, distill=True)
RECIPES = {
    'gmp*': GMP_STAR,
    'ft+gradual-erk': dict(start='pretrained', criterion='magnitude', scope='erk', initial_sparsity=0.0,
                           schedule=(1, 490, 10), quick_schedule=(1, 8, 1), rewind_lr=False, distill=False),
    'gmp*-fisher': dict(GMP_STAR, criterion='fisher'),
}
TEACHER_WEIGHT, TEMPERATURE = 1.0, 2.0
LORA_RUN = 'minilm_fortunes_lora'  # experiments/peft.py's LoRA rank 8 (seed 0; _seedN: the others)
MODULES = ('embeddings', 'encoder', 'head')  # the top-level modules of the sizes table


def dense_name(seed: int, quick: bool) -> str:
  return f'minilm_fortunes_quick_seed{seed}' if quick else 'minilm_fortunes' + (f'_seed{seed}' if seed else '')


def pruned_name(recipe: str, sparsity: float, seed: int, quick: bool) -> str:
  return (f'compress_{recipe.replace("*", "star")}_{int(round(sparsity * 100))}_seed{seed}'
          + ('_quick' if quick else ''))


def run_name(recipe: str, sparsity: float, seed: int, quick: bool) -> str:
  return dense_name(seed, quick) if recipe == 'dense' else pruned_name(recipe, sparsity, seed, quick)


def run(name: str, quick: bool, overrides: list[str]) -> dict:
  """The test line of run NAME (trained now unless finished; its config checked against a saved one)."""
  spec = CONFIG + (':quick' if quick else '')
  check_reused(name, load_config(spec, *overrides))
  return run_jft(name, spec, *overrides)


def dense_run(seed: int, quick: bool) -> dict:
  return run(dense_name(seed, quick), quick, [f'--config.seed={seed}'] if seed else [])


def pruned_run(recipe: str, sparsity: float, seed: int, quick: bool) -> dict:
  how = RECIPES[recipe]
  dense = os.path.join(RUNS, dense_name(seed, quick))
  first, last, every = how['quick_schedule' if quick else 'schedule']
  overrides = [*([f'--config.seed={seed}'] if seed else []), f'--config.prune.sparsity={sparsity}',
               f'--config.prune.criterion={how["criterion"]}', f'--config.prune.scope={how["scope"]}',
               f'--config.prune.initial_sparsity={how["initial_sparsity"]}', f'--config.prune.start_step={first}',
               f'--config.prune.end_step={last}', f'--config.prune.every={every}',
               f'--config.prune.rewind_lr={how["rewind_lr"]}']
  if how['start'] == 'dense':  # else the config's own: the pretrained MiniLM with a new head
    overrides += [f'--config.init={dense}', '--config.init_skip=()']
  if how['distill']:
    overrides += [f'--config.distill.teacher={dense}', f'--config.distill.weight={TEACHER_WEIGHT}',
                  f'--config.distill.temperature={TEMPERATURE}']
  return run(pruned_name(recipe, sparsity, seed, quick), quick, overrides)


def finished(name: str) -> bool:
  return any(line['split'] == 'test' for line in read_metrics(name))


def final_validation(recipe: str, name: str, quick: bool) -> float:
  """The best validation accuracy of a pruning run at its final sparsity (after the last mask update)."""
  last = RECIPES[recipe]['quick_schedule' if quick else 'schedule'][1]
  return max(line['accuracy'] for line in read_metrics(name) if line['split'] == 'validation' and line['step'] >= last)


def sizes(name: str) -> dict[str, list[dict]]:
  """`jft.export.size_table` of a run's tested checkpoint as stored in float32 and with int8 weights."""
  test = [line for line in read_metrics(name) if line['split'] == 'test'][-1]
  params, masks = export.read_params_and_masks(os.path.join(RUNS, name), test.get('tested_step'))
  return {'float32': export.size_table(params, masks),
          'int8': export.size_table(params, masks, int8.quantize_flat(params, int8.DEFAULT_TARGETS))}


def plan(seeds, quick: bool) -> list[tuple]:
  """('dense', seed) and (recipe, sparsity, seed) in the order they run: the recipe comparison on seed 0 first."""
  steps = [('dense', 0)] + [(recipe, 0.8, 0) for recipe in RECIPES]
  candidates = [pruned_name(recipe, 0.8, 0, quick) for recipe in RECIPES]
  if all(finished(name) for name in candidates):
    chosen = max(RECIPES, key=lambda recipe: final_validation(recipe, pruned_name(recipe, 0.8, 0, quick), quick))
    steps += [('dense', seed) for seed in seeds if seed] + [(chosen, sparsity, seed) for sparsity in SPARSITIES
                                                            for seed in seeds]
  return list(dict.fromkeys(steps))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--seeds', default=','.join(map(str, SEEDS)))
  parser.add_argument('--quick', action='store_true', help='12-step runs: checks the script, not the numbers')
  parser.add_argument('--report_only', action='store_true', help='train nothing: report the finished runs')
  parser.add_argument('--only', help='RECIPE:SPARSITY:SEED or dense:SEED: run just that')
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  if args.only:
    recipe, *rest = args.only.split(':')
    print(dense_run(int(rest[0]), args.quick) if recipe == 'dense' else
          pruned_run(recipe, float(rest[0]), int(rest[1]), args.quick))
    return
  ran = set()
  while not args.report_only and (todo := [step for step in plan(seeds, args.quick) if step not in ran]):
    for step in todo:  # the plan grows once the seed-0 comparison has finished
      dense_run(step[1], args.quick) if step[0] == 'dense' else pruned_run(*step, args.quick)
      ran.add(step)
  report(seeds, args.quick)


def report(seeds, quick: bool):
  suffix = '_quick' if quick else ''
  dense = {seed: evaluated(dense_name(seed, quick)) for seed in seeds if finished(dense_name(seed, quick))}
  rows = [('dense', 0.0, dense)]
  count = len(next(iter(dense.values()))['predictions']['label'])
  for recipe in RECIPES:
    for sparsity in SPARSITIES:
      names = {seed: pruned_name(recipe, sparsity, seed, quick) for seed in seeds}
      done = {seed: evaluated(name) for seed, name in names.items() if finished(name)}
      if done:
        rows.append((recipe, sparsity, done))

  lines = ['# Compression of MiniLM on fortunes8: pruning, int8 and both, with error bars', '',
           'Produced by `python experiments/compression.py`' + (' --quick (smoke run: not results)' if quick else '')
           + f'. Test split, {count} texts; accuracy in points, mean ± standard deviation over the seeds that have run '
           '(n); "vs dense": the mean ± std over seeds of (pruned - dense of the same seed) and, in brackets, its 95% '
           'interval over the choice of test texts (bootstrap: texts resampled, the same draw for every seed; '
           '`jft.metrics.paired_difference_interval`). McNemar: exact, on the '
           'same texts, per seed: texts right only for the compressed model / only for the reference, p. int8: '
           'post-training, per-channel symmetric, every kernel and embedding. The recipes are described at the top '
           'of the script.', '',
           '| model | sparsity | n | test accuracy per seed | mean ± std | vs dense | McNemar vs dense (per seed) '
           '| int8 mean ± std | int8 - float32 | McNemar int8 vs float32 (per seed) |',
           '|---|---|---|---|---|---|---|---|---|---|']
  points = {}
  for recipe, sparsity, done in rows:
    accuracy = [r['float32']['accuracy'] for r in done.values()]
    quantized = [r['int8']['accuracy'] for r in done.values()]
    paired = [seed for seed in done if seed in dense and recipe != 'dense']
    gaps = [done[s]['float32']['accuracy'] - dense[s]['float32']['accuracy'] for s in paired]
    tests = [metrics.mcnemar(correct(done[s], 'float32'), correct(dense[s], 'float32')) for s in paired]
    interval = (metrics.paired_difference_interval([correct(done[s]) for s in paired],
                                                   [correct(dense[s]) for s in paired]) if paired else None)
    int8_tests = [done[s]['mcnemar_int8_vs_float32'] for s in done]
    per_seed = ', '.join(f'{100 * a:.1f}' for a in accuracy)
    int8_gaps = [q - a for q, a in zip(quantized, accuracy, strict=True)]
    lines.append(f'| {recipe} | {sparsity:.0%} | {len(done)} | {per_seed} | {mean_std(accuracy)} | '
                 f'{mean_std(gaps) + interval_cell(interval) if gaps else ""} | {mcnemar_cells(tests)} | '
                 f'{mean_std(quantized)} | {mean_std(int8_gaps)} | {mcnemar_cells(int8_tests)} |')
    points[recipe, sparsity] = accuracy, quantized, sizes(run_name(recipe, sparsity, min(done), quick))

  lines += ['', '## Sizes of the seed-0 models (bytes as `python -m jft.export [--int8]` stores them; ratio to dense '
            'float32)', '',
            '| model | weights | ' + ' | '.join(MODULES) + ' | all |', '|---|---|' + '---|' * (len(MODULES) + 1)]
  reference = {row['module']: row['dense_bytes'] for row in points['dense', 0.0][2]['float32']}
  for (recipe, sparsity), (_, _, table) in points.items():
    for weights, size_rows in table.items():
      cells = {row['module']: row['compressed_bytes'] for row in size_rows}
      lines.append(f'| {recipe} {sparsity:.0%} | {weights} | ' + ' | '.join(
          f'{cells[m] / 1e6:.2f} MB ({cells[m] / reference[m]:.3f})' for m in (*MODULES, 'all')) + ' |')
  with open(os.path.join(RESULTS, f'compression{suffix}.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  plot(points, quick, suffix)


def plot(points: dict, quick: bool, suffix: str):
  figure, axis = plt.subplots(figsize=(10, 5))
  for color, ((recipe, sparsity), (accuracy, quantized, table)) in enumerate(points.items()):
    label = 'dense' if recipe == 'dense' else f'{recipe} {sparsity:.0%}'
    for weights, values, marker in (('float32', accuracy, 'o'), ('int8', quantized, 's')):
      axis.errorbar(table[weights][-1]['compressed_bytes'] / 1e6, 100 * np.mean(values),
                    yerr=100 * np.std(values, ddof=1) if len(values) > 1 else None, color=f'C{color}', marker=marker,
                    capsize=4, linestyle='none', label=f'{label}, {weights} (n={len(values)})')
  lora_runs = [LORA_RUN] + [f'{LORA_RUN}_seed{seed}' for seed in range(1, 10)] if not quick else []
  lora = [tests[-1]['accuracy'] for name in lora_runs
          if (tests := [line for line in read_metrics(name) if line['split'] == 'test'])]
  if lora:
    trainable, _ = footprint(load_config(CONFIG + ':lora'))
    axis.errorbar(trainable * 4 / 1e6, 100 * np.mean(lora), yerr=100 * np.std(lora, ddof=1) if len(lora) > 1 else None,
                  color='black', marker='^', capsize=4, linestyle='none',
                  label=f'LoRA rank 8: adapters + head in float32,\non a shared pretrained base (n={len(lora)})')
  axis.set_xscale('log')
  axis.set_xticks([1, 2, 5, 10, 20, 50, 100])
  axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
  axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  axis.set_xlabel('bytes to store (MB, log scale; circles float32, squares int8)')
  axis.set_ylabel('test accuracy (%)')
  axis.set_title('MiniLM on fortunes8: test accuracy (mean ± std over seeds) vs size')
  axis.legend(fontsize='small', loc='center left', bbox_to_anchor=(1.0, 0.5))
  figure.tight_layout()
  figure.savefig(os.path.join(RESULTS, f'compression{suffix}.png'), dpi=120)


if __name__ == '__main__':
  main()
