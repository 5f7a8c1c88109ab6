"""What to train when fine-tuning MiniLM on fortunes8: linear probe, top 2 layers + head, everything,
a linear probe then everything (staged), and everything with layer-wise learning-rate decay.

python experiments/freezing.py [--quick]
Each row is `python -m jft.main --config=configs/minilm_fortunes.py:VARIANT` in experiments/runs/ (a finished
run is reused). Trainable parameters and optimizer-state bytes come from the resolved rules (the largest
over a run's stages). Two step times: one measured here, with the steps of the probe, top-2 and full rules
interleaved on one batch of 32 x 64 tokens (the staged run weighted by its stages' steps), which compares
the rules fairly; and the run's own, the median over its logging windows of 1 / steps_per_sec, which also
depends on whatever else the machine was doing during that run.
Writes experiments/results/freezing.md and freezing.png.
"""

import argparse
import os
import statistics
import sys

import jax
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from common import RESULTS, load_config, read_metrics, run_jft  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
from minilm_setup import MiniLMSetup, median_step_times  # noqa: E402

from jft import components, optim, tree_paths  # noqa: E402
from jft import stages as stages_lib  # noqa: E402

# The frozen parameters of each variant's steady state; the staged run is a probe, then full.
STEP_RULES = {'probe': (r'(?!head/).*',), 'top2': ('embeddings/.*', 'encoder/layer_[0-3]/.*'), 'full': ()}
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
    state_bytes = max(state_bytes, tree_paths.tree_bytes(opt_state))
  return trainable, state_bytes


def controlled_step_times(batch_size: int = 32, length: int = 64, steps: int = 6) -> dict[str, float]:
  """Median seconds of the probe, top-2 and full MiniLM train steps, interleaved on the same batch."""
  setup = MiniLMSetup(batch_size, length)
  return median_step_times(setup, {name: setup.state_and_step(freeze) for name, freeze in STEP_RULES.items()},
                           steps)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true', help='the :quick variants: checks the script, not the numbers')
  args = parser.parse_args()
  suffix = '_quick' if args.quick else ''
  os.makedirs(RESULTS, exist_ok=True)
  rows = {}
  step_times = controlled_step_times()
  probe_steps = load_config('configs/minilm_fortunes.py:staged').stages[0]['steps']
  staged = (probe_steps * step_times['probe'] + (700 - probe_steps) * step_times['full']) / 700
  controlled = {'probe': step_times['probe'], 'top2': step_times['top2'], '': step_times['full'],
                'staged': staged, 'llrd': step_times['full']}
  for label, variant in VARIANTS.items():
    variant = ','.join(v for v in (variant, 'quick' if args.quick else '') if v)
    name = 'minilm_fortunes' + ('_' + variant.replace(',', '_') if variant else '')  # full: the main job's run
    test = run_jft(name, f'configs/minilm_fortunes.py{":" + variant if variant else ""}')
    lines = read_metrics(name)
    step_s = statistics.median(1 / line['steps_per_sec'] for line in lines if line['split'] == 'train')
    trainable, state_bytes = footprint(load_config('configs/minilm_fortunes.py' + (f':{variant}' if variant else '')))
    rows[label] = dict(accuracy=test['accuracy'], macro_f1=test['macro_f1'], trainable=trainable,
                       state_bytes=state_bytes, step_s=step_s, controlled_s=controlled[VARIANTS[label]])

  table = ['# Freezing: what to train when fine-tuning MiniLM on fortunes8', '',
           'Produced by `python experiments/freezing.py`' + (' --quick (smoke run: not results)' if args.quick else '')
           + '; one seed (0); 700 steps of batch 32 each (the staged run: 175 probe + 525 full); test split, '
           '458 texts. The step times of the runs overlapped with other jobs on this 2-core machine; the 32 x 64 '
           'column is measured in one process with the rules interleaved.', '',
           '| what trains | test accuracy | test macro-F1 | trainable parameters | optimizer state '
           '| step time, 32 x 64 | step time in its run |', '|---|---|---|---|---|---|---|']
  for label, r in rows.items():
    table.append(f"| {label} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['trainable']:,} | "
                 f"{r['state_bytes'] / 2**20:.2f} MiB | {r['controlled_s'] * 1e3:.0f} ms | "
                 f"{r['step_s'] * 1e3:.0f} ms |")
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
  right.bar(short, [rows[k]['controlled_s'] * 1e3 for k in labels], color='tab:orange')
  right.set_ylabel('median step time (ms)')
  right.set_title('training step time, batch 32 x 64 tokens (2 CPU cores)')
  figure.tight_layout()
  figure.savefig(os.path.join(RESULTS, f'freezing{suffix}.png'), dpi=120)


if __name__ == '__main__':
  main()
