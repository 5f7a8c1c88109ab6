"""What to train when fine-tuning MiniLM on fortunes8: linear probe, top 2 layers + head, everything,
a linear probe then everything (staged), and everything with layer-wise learning-rate decay.

python experiments/freezing.py [--quick]
Each row is `python -m jft.main --config=configs/minilm_fortunes.py:VARIANT` in experiments/runs/ (a finished
run is reused). Trainable parameters and optimizer-state bytes come from the resolved rules (the largest
over a run's stages); the step time is the median over the run's logging windows of 1 / steps_per_sec
(training only; batches are length-grouped, so this is the average over the buckets the data needs).
Writes experiments/results/freezing.md and freezing.png.
"""

import argparse
import os
import statistics

import jax
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from common import RESULTS, load_config, read_metrics, run_jft  # noqa: E402

from jft import components, optim, tree_paths  # noqa: E402
from jft import stages as stages_lib  # noqa: E402

VARIANTS = {
    'linear probe': 'probe',
    'top 2 layers + head': 'top2',
    'full fine-tuning': '',
    'linear probe, then full (staged)': 'staged',
    'full, layer-wise lr decay 0.8': 'llrd',
}


def footprint(config) -> tuple[int, int]:
  """(most trainable parameters, most optimizer-state bytes) over the stages of `config`."""
  model = components.build_model(config)
  params = jax.eval_shape(model.init_variables, jax.random.PRNGKey(0))[0]
  trainable, state_bytes = 0, 0
  for stage in stages_lib.plan(config, params):
    flat = tree_paths.flatten(stage.labels.trainable)
    trainable = max(trainable, sum(leaf.size for path, leaf in tree_paths.flatten(params).items() if flat[path]))
    tx = optim.make_optimizer(stage.optim, stage.steps, stage.labels)
    opt_state = jax.eval_shape(tx.init, params)
    state_bytes = max(state_bytes, sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(opt_state)))
  return trainable, state_bytes


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true', help='the :quick variants: checks the script, not the numbers')
  args = parser.parse_args()
  suffix = '_quick' if args.quick else ''
  os.makedirs(RESULTS, exist_ok=True)
  rows = {}
  for label, variant in VARIANTS.items():
    variant = ','.join(v for v in (variant, 'quick' if args.quick else '') if v)
    name = 'minilm_fortunes' + ('_' + variant.replace(',', '_') if variant else '')  # full: the main job's run
    test = run_jft(name, f'configs/minilm_fortunes.py{":" + variant if variant else ""}')
    lines = read_metrics(name)
    step_s = statistics.median(1 / line['steps_per_sec'] for line in lines if line['split'] == 'train')
    trainable, state_bytes = footprint(load_config('configs/minilm_fortunes.py' + (f':{variant}' if variant else '')))
    rows[label] = dict(accuracy=test['accuracy'], macro_f1=test['macro_f1'], trainable=trainable,
                       state_bytes=state_bytes, step_s=step_s)

  table = ['# Freezing: what to train when fine-tuning MiniLM on fortunes8', '',
           'Produced by `python experiments/freezing.py`' + (' --quick (smoke run: not results)' if args.quick else '')
           + '; one seed (0); 700 steps of batch 32 each (the staged run: 175 probe + 525 full); test split, '
           '458 texts.', '',
           '| what trains | test accuracy | test macro-F1 | trainable parameters | optimizer state | step time |',
           '|---|---|---|---|---|---|']
  for label, r in rows.items():
    table.append(f"| {label} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['trainable']:,} | "
                 f"{r['state_bytes'] / 2**20:.2f} MiB | {r['step_s'] * 1e3:.0f} ms |")
  with open(os.path.join(RESULTS, f'freezing{suffix}.md'), 'w') as f:
    f.write('\n'.join(table) + '\n')
  print('\n'.join(table))

  figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
  labels = list(rows)
  short = ['probe', 'top 2', 'full', 'probe->full', 'full+LLRD']
  left.bar(short, [rows[k]['accuracy'] for k in labels], color='tab:blue')
  left.set_ylim(0, 1)
  left.set_ylabel('test accuracy')
  left.set_title('fortunes8 test accuracy')
  right.bar(short, [rows[k]['step_s'] * 1e3 for k in labels], color='tab:orange')
  right.set_ylabel('median step time (ms)')
  right.set_title('training step time (2 CPU cores)')
  figure.tight_layout()
  figure.savefig(os.path.join(RESULTS, f'freezing{suffix}.png'), dpi=120)


if __name__ == '__main__':
  main()
