"""Does the main job need its 700 steps? Its validation curve over three seeds, and the same recipe in fewer steps.

python experiments/fewer_steps.py [--quick] [--steps=400] [--seeds=0,1,2]
The main job (configs/minilm_fortunes.py: 700 steps, 70 of warmup, the learning rate decaying linearly to 0 at the
last step) evaluates on validation every 100 steps; the curves of its seeds (the dense runs of compression.py,
experiments/runs/minilm_fortunes[_seedN]) show where accuracy stops rising. The shorter recipe is the same job with
`--config.total_steps=STEPS`: the same warmup, the schedule decaying to 0 at STEPS (a run of its own, not the
700-step run stopped early), in experiments/runs/minilm_fortunes_steps{STEPS}[_seedN]. Each seed's test accuracy is
paired with the 700-step run of the same seed on the same texts: McNemar, and the 95% interval over texts of the mean
gap over seeds (`jft.metrics.paired_difference_interval`); each run tests its best validation checkpoint, as the main
job does (`test_on='best'`). Finished runs are reused when their saved config is the one asked for. Writes
experiments/results/fewer_steps.md and fewer_steps.png.
"""

import argparse
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from common import (  # noqa: E402
  RESULTS,
  correct,
  evaluated,
  interval_cell,
  load_config,
  mcnemar_cells,
  mean_std,
  read_metrics,
)
from compression import CONFIG, dense_name, run  # noqa: E402

from jft import metrics  # noqa: E402


def short_name(steps: int, seed: int, quick: bool) -> str:
  return f'minilm_fortunes_steps{steps}' + ('_quick' if quick else '') + (f'_seed{seed}' if seed else '')


def curve(name: str) -> list[tuple[int, float]]:
  return [(line['step'], line['accuracy']) for line in read_metrics(name) if line['split'] == 'validation']


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='the :quick variants: checks the script, not the numbers')
  parser.add_argument('--steps', type=int, default=None, help='steps of the shorter recipe (default 400; quick: 6)')
  parser.add_argument('--seeds', default='0,1,2')
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  steps = args.steps or (6 if args.quick else 400)
  full_steps = load_config(CONFIG + (':quick' if args.quick else '')).total_steps
  rows = {}
  for seed in seeds:
    seed_override = [f'--config.seed={seed}'] if seed else []
    full = dense_name(seed, args.quick)
    short = short_name(steps, seed, args.quick)
    run(full, args.quick, seed_override)
    run(short, args.quick, [*seed_override, f'--config.total_steps={steps}'])
    rows[seed] = {'full': full, 'short': short}
  report(rows, steps, full_steps, args.quick)


def report(rows: dict, steps: int, full_steps: int, quick: bool):
  suffix = '_quick' if quick else ''
  results = {seed: {kind: evaluated(name) for kind, name in names.items()} for seed, names in rows.items()}
  accuracy = {kind: [results[s][kind]['float32']['accuracy'] for s in rows] for kind in ('full', 'short')}
  gaps = [a - b for a, b in zip(accuracy['short'], accuracy['full'], strict=True)]
  tests = [metrics.mcnemar(correct(results[s]['short']), correct(results[s]['full'])) for s in rows]
  interval = metrics.paired_difference_interval([correct(results[s]['short']) for s in rows],
                                                [correct(results[s]['full']) for s in rows])
  count = len(results[next(iter(rows))]['full']['predictions']['label'])
  title = f'# The main job in {steps} steps against {full_steps}' + (' (quick: checks the script)' if quick else '')
  command = 'python experiments/fewer_steps.py' + (' --quick' if quick else '')
  lines = [title, '', f'`{command}`. Test split ({count} texts), each run\'s best validation checkpoint (the tested '
           'step in brackets); seeds ' + ', '.join(map(str, rows)) + '. "Gap": the mean ± std over seeds of '
           f'({steps} steps - {full_steps} steps, same seed) and, in brackets, its 95% interval over texts (paired '
           'bootstrap); McNemar per seed: texts right only with the shorter run / only with the full one.', '',
           '| recipe | test accuracy per seed | mean ± std | gap | McNemar (per seed) |', '|---|---|---|---|---|']
  for kind, label in (('full', f'{full_steps} steps (the main job)'), ('short', f'{steps} steps')):
    tested = [read_metrics(rows[s][kind])[-1]['tested_step'] for s in rows]
    per_seed = ', '.join(f'{100 * a:.1f} ({step})' for a, step in zip(accuracy[kind], tested, strict=True))
    gap = (f'{mean_std(gaps)}{interval_cell(interval)}', mcnemar_cells(tests)) if kind == 'short' else ('', '')
    lines.append(f'| {label} | {per_seed} | {mean_std(accuracy[kind])} | {gap[0]} | {gap[1]} |')
  evaluated_steps = [step for step, _ in curve(rows[next(iter(rows))]['full'])]
  lines += ['', '## Validation accuracy (%) by step', '', '| seed (steps) | ' + ' | '.join(map(str, evaluated_steps))
            + ' |', '|---|' + '---|' * len(evaluated_steps)]
  for seed, names in rows.items():
    for kind, total in (('full', full_steps), ('short', steps)):
      points = dict(curve(names[kind]))
      cells = [f'{100 * points[step]:.1f}' if step in points else '' for step in evaluated_steps]
      lines.append(f'| {seed} ({total}) | ' + ' | '.join(cells) + ' |')
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, f'fewer_steps{suffix}.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))

  fig, ax = plt.subplots(figsize=(6, 4))
  for i, (seed, names) in enumerate(rows.items()):
    for kind, style in (('full', '-'), ('short', '--')):
      xs, ys = zip(*curve(names[kind]), strict=True)
      ax.plot(xs, 100 * np.array(ys), style, color=f'C{i}', marker='o', markersize=3,
              label=f'seed {seed}, {full_steps if kind == "full" else steps} steps')
  ax.set_xlabel('training step')
  ax.set_ylabel('validation accuracy (%)')
  ax.set_title('MiniLM on fortunes8: validation accuracy by step')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(RESULTS, f'fewer_steps{suffix}.png'), dpi=120)


if __name__ == '__main__':
  main()
