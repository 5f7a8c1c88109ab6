"""Accuracy vs sparsity: magnitude pruning of the fine-tuned MiniLM (fortunes8) and of the fashion CNN.

python experiments/sparsity_sweep.py [--models=minilm,fashion] [--quick]
Every method starts from the dense trained run (experiments/runs/minilm_fortunes, experiments/runs/fashion_cnn,
made by experiments/transfer.py if missing), except the ft+ ones, and prunes the dense and convolution kernels
(not embeddings, biases, normalisation or the head). The MiniLM rows below the first five are the recipes tried
to bring 80% within a point of the dense model:
  oneshot        pruned once, evaluated at once (no training)
  oneshot+ft     pruned once at the first step, then fine-tuned (recovery) for the same number of steps
  gradual        the cubic schedule of Zhu & Gupta over the first 70% of the steps, every 10 (MiniLM) or 25
                 (fashion) steps, then recovery at the final sparsity
  gradual-global the same with one magnitude threshold over all pruned tensors instead of one per tensor
  2:4            oneshot+ft with 2 of every 4 consecutive input weights kept (50%)
  gradual-long   (MiniLM) gradual from the dense fine-tuned model over as many steps as its fine-tuning (700),
                 at its learning rate
  ft+gradual     (MiniLM) gradual pruning during fine-tuning from the pretrained MiniLM (700 steps): the
                 dense fine-tuning run with pruning added; ft+gradual-global the same with global scope;
                 ft+gradual-2x the same over twice the steps (1,400); ft+gradual-erk with the Erdos-Renyi-Kernel
                 distribution of sparsity over the tensors; ft+gradual-3xlr at three times the learning rate;
                 ft+gradual-erk-3xlr both
  METHOD+kd      (MiniLM) METHOD with knowledge distillation from the dense fine-tuned run (jft/distill.py:
                 weight 0.9 on the teacher's soft targets at temperature 2, 0.1 on the labels)
  METHOD+kd+unlabeled  the same, with the other categories of the Debian fortunes as unlabelled training
                 texts that only the teacher labels (data.unlabeled)
The recovery and gradual runs are `python -m jft.main` runs in experiments/runs/ (a finished run is reused).
Writes experiments/results/sparsity_sweep.md and sparsity_sweep.png.
"""

import argparse
import os

import jax
import matplotlib
import optax

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from common import RESULTS, RUNS, load_config, read_metrics, run_jft  # noqa: E402

from jft import components, data, init, pruning, sharding  # noqa: E402
from jft import step as step_lib  # noqa: E402
from jft.apply_fn import linen_apply_fn  # noqa: E402
from jft.data.fortunes import FORTUNES8_CLASSES, FortunesBuilder, available_categories  # noqa: E402
from jft.state import create_train_state  # noqa: E402

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
# The other categories of the Debian fortunes (not fortunes8's, not ascii-art, translate-me); their train split
# by content hash holds no fortunes8 validation or test text. The report counts its texts.
UNLABELED_CATEGORIES = tuple(sorted(
    set(available_categories(FortunesBuilder.SOURCE_DIR)) - set(FORTUNES8_CLASSES) - {'ascii-art', 'translate-me'}))
MODELS = {
    # config, dense run, recovery steps, lr, mask update every, the sparsities of gradual-global, 2:4's exclude
    'minilm': dict(config='configs/minilm_fortunes.py', dense='minilm_fortunes', steps=300, lr=5e-5, every=10,
                   global_at=(0.8, 0.9), n_m_exclude=None,
                   # the longer recipes: as many steps as the dense fine-tuning, at its learning rate
                   long=dict(steps=700, lr=1e-4, pretrained='minilm')),
    # conv_0 has one input channel: no groups of 4 along its input axis, so 2:4 leaves it dense.
    'fashion': dict(config='configs/fashion_cnn.py', dense='fashion_cnn', steps=500, lr=5e-4, every=25,
                    global_at=SPARSITIES, n_m_exclude=('head/.*', 'conv_0/.*'), long=None),
}


LONG_METHODS = ('gradual-long', 'ft+gradual', 'ft+gradual-global', 'ft+gradual-erk', 'ft+gradual-2x', 'ft+gradual-3xlr',
                'gradual-long+kd', 'ft+gradual+kd', 'gradual-long+kd+unlabeled', 'ft+gradual-3xlr+kd',
                'ft+gradual-erk-3xlr')
METHODS = ('oneshot', 'oneshot+ft', 'gradual', 'gradual-global', '2:4', *LONG_METHODS)


def oneshot_accuracy(spec: dict, sparsity: float) -> dict:
  """Test metrics of the dense run's final parameters pruned at `sparsity` (layer scope), without training."""
  config = load_config(spec['config'])
  model = components.build_model(config)
  params, _ = init.load_params(os.path.join(RUNS, spec['dense']))
  if sparsity > 0:
    masks = pruning.compute_masks(params, pruning.prunable(params), sparsity, 'layer', 'unstructured')
    params = pruning.apply_masks(params, masks)
  _, model_state = jax.eval_shape(model.init_variables, jax.random.PRNGKey(0))
  if model_state:
    raise SystemExit('oneshot evaluation reads only params: use a model without batch statistics')
  mesh = sharding.make_mesh()
  state = sharding.put_replicated(create_train_state(params, {}, optax.identity(), jax.random.PRNGKey(0)), mesh)
  eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(linen_apply_fn(model.module), model.num_classes), mesh)
  return step_lib.evaluate(eval_step, state, data.eval_batches(config.data, config.data.test_split,
                                                                config.batch_size), mesh)


def pruned_run(model: str, spec: dict, method: str, sparsity: float, quick: bool, launch: bool = True) -> dict | None:
  """The test metrics of a pruning run (run now if `launch` and not finished; None if neither)."""
  base, kd, unlabeled = method.split('+kd')[0], '+kd' in method, method.endswith('+unlabeled')
  long = base.startswith(('gradual-long', 'ft+'))
  steps = 20 if quick else spec['long']['steps'] * (2 if base.endswith('-2x') else 1) if long else spec['steps']
  lr = (spec['long']['lr'] if long else spec['lr']) * (3 if '-3xlr' in base else 1)
  schedule = 'gradual' if 'gradual' in method else 'oneshot'
  from_pretrained = method.startswith('ft+')
  source = spec['long']['pretrained'] if from_pretrained else os.path.join(RUNS, spec['dense'])
  # From the dense run: all of it, head included; from the pretrained model: a new head.
  init_skip = "--config.init_skip=('head/.*',)" if from_pretrained else '--config.init_skip=()'
  name = f'sweep_{model}_{method.replace(":", "of").replace("+", "_")}_{int(round(sparsity * 100))}' + (
      '_quick' if quick else '')
  every = max(1, spec['every'] // (10 if quick else 1))
  overrides = [
      f'--config.init={source}', init_skip,
      f'--config.total_steps={steps}', f'--config.optim.lr={lr}', f'--config.optim.warmup_steps={steps // 10}',
      f'--config.eval_every={steps}', f'--config.checkpoint_every={steps}', f'--config.log_every={max(steps // 20, 1)}',
      f'--config.prune.sparsity={sparsity}', f'--config.prune.schedule={schedule}', '--config.prune.start_step=1',
      f'--config.prune.end_step={int(steps * 0.7)}', f'--config.prune.every={every}',
      f'--config.prune.scope={"global" if "-global" in base else "erk" if "-erk" in base else "layer"}',
      f'--config.prune.structure={"2:4" if method == "2:4" else "unstructured"}',
  ]
  if kd:
    overrides += [f'--config.distill.teacher={os.path.join(RUNS, spec["dense"])}', '--config.distill.weight=0.9',
                  '--config.distill.temperature=2.0']
  if unlabeled:
    overrides += ['--config.data.unlabeled.name=fortunes', f'--config.data.unlabeled.classes={UNLABELED_CATEGORIES!r}']
  if method == '2:4' and spec['n_m_exclude']:
    overrides.append(f'--config.prune.exclude={spec["n_m_exclude"]!r}')
  if not launch:
    tests = [line for line in read_metrics(name) if line['split'] == 'test']
    return tests[-1] if tests else None
  return run_jft(name, spec['config'] + (':quick' if quick else ''), *overrides)


def run_plan(spec: dict) -> list[tuple[str, float]]:
  """(method, sparsity) of every training run of a model, the headline (gradual at 80% and 90%) first."""
  plan = [('gradual', s) for s in (0.8, 0.9)] + [('gradual', s) for s in SPARSITIES if s not in (0.8, 0.9)]
  if spec['long']:
    # The recipes tried to close the gap at 80% (and two of them at 90%).
    plan += [(method, 0.8) for method in LONG_METHODS] + [('ft+gradual', 0.9), ('ft+gradual-erk', 0.9)]
  plan += [('oneshot+ft', s) for s in SPARSITIES] + [('gradual-global', s) for s in spec['global_at']]
  return plan + [('2:4', 0.5)]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--models', default='minilm,fashion')
  parser.add_argument('--quick', action='store_true', help='20-step runs: checks the script, not the numbers')
  parser.add_argument('--report_only', action='store_true', help='train nothing: tabulate the finished runs')
  parser.add_argument('--only', help='METHOD:SPARSITY of one model: run just that, e.g. gradual-long:0.8')
  args = parser.parse_args()
  suffix = '_quick' if args.quick else ''
  os.makedirs(RESULTS, exist_ok=True)
  models = args.models.split(',')
  for model in models:
    if not os.path.isdir(os.path.join(RUNS, MODELS[model]['dense'])):
      raise SystemExit(f'no dense run {MODELS[model]["dense"]} in {RUNS}: run experiments/transfer.py first')
  plans = {model: run_plan(MODELS[model]) for model in models}
  if args.only:
    method, sparsity = args.only.rsplit(':', 1)
    for model in models:
      print(model, pruned_run(model, MODELS[model], method, float(sparsity), args.quick))
    return
  # The headline first (MiniLM, gradual, 80% and 90%), then the cheap fashion runs, then the rest of MiniLM.
  minilm = [('minilm', *p) for p in plans.get('minilm', [])]
  order = minilm[:2] + [(m, *p) for m in models if m != 'minilm' for p in plans[m]] + minilm[2:]
  results = {model: {'dense': {0.0: oneshot_accuracy(MODELS[model], 0.0)},
                     'oneshot': {s: oneshot_accuracy(MODELS[model], s) for s in SPARSITIES}} for model in models}
  for model, method, sparsity in order:
    finished = pruned_run(model, MODELS[model], method, sparsity, args.quick, launch=not args.report_only)
    if finished is not None:
      results[model].setdefault(method, {})[sparsity] = finished

  lines = ['# Sparsity sweep: magnitude pruning and recovery', '',
           'Produced by `python experiments/sparsity_sweep.py`' + (' --quick (smoke run: not results)'
                                                                   if args.quick else '')
           + '; one seed; test accuracy (macro-F1 in brackets); sparsity of the pruned kernels (the head, '
           'embeddings, biases and normalisation stay dense). Each method is described at the top of the script; '
           'the rows below 2:4 are the recipes tried at 80% to come within a point of the dense model.', '']
  if 'minilm' in results:
    unlabeled = data.data_source('fortunes', 'train', None, UNLABELED_CATEGORIES)
    lines += [f'The +unlabeled rows add the {len(unlabeled):,} texts of the train split of {len(UNLABELED_CATEGORIES)} '
              'other fortunes categories, unlabelled (those that fortunes8 also labels keep their label).', '']
  for model, rows in results.items():
    dense = rows['dense'][0.0]
    lines += [f'## {model} (dense: {dense["accuracy"]:.3f} [{dense["macro_f1"]:.3f}])', '',
              '| method | ' + ' | '.join(f'{int(s * 100)}%' for s in SPARSITIES) + ' |',
              '|---|' + '---|' * len(SPARSITIES)]
    for method in METHODS:
      if method not in rows and not any(m == method for m, _ in run_plan(MODELS[model])):
        continue
      done = rows.get(method, {})
      cells = [f"{done[s]['accuracy']:.3f} [{done[s]['macro_f1']:.3f}]" if s in done else
               ('not run yet' if (method, s) in run_plan(MODELS[model]) else '') for s in SPARSITIES]
      lines.append(f'| {method} | ' + ' | '.join(cells) + ' |')
    lines.append('')
  with open(os.path.join(RESULTS, f'sparsity_sweep{suffix}.md'), 'w') as f:
    f.write('\n'.join(lines))
  print('\n'.join(lines))

  figure, axes = plt.subplots(1, len(results), figsize=(8.5 * len(results), 4.5), squeeze=False)
  for axis, (model, rows) in zip(axes[0], results.items(), strict=True):
    axis.axhline(rows['dense'][0.0]['accuracy'], color='gray', linestyle='--', label='dense')
    for method, marker in zip(METHODS, 'xso^DvP*dp<>h8HX', strict=True):
      if method not in rows:
        continue
      points = sorted(rows[method].items())
      axis.plot([100 * s for s, _ in points], [m['accuracy'] for _, m in points], marker=marker, label=method)
    axis.set_xlabel('sparsity of the pruned kernels (%)')
    axis.set_ylabel('test accuracy')
    axis.set_title(model)
    axis.legend(fontsize='small', loc='center left', bbox_to_anchor=(1.0, 0.5))
  figure.tight_layout()
  figure.savefig(os.path.join(RESULTS, f'sparsity_sweep{suffix}.png'), dpi=120)


if __name__ == '__main__':
  main()
