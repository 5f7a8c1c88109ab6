"""Train the small CNN on fashion (Fashion-MNIST) from scratch: the run that later configs fine-tune from.

python -m jft.main --config=configs/fashion_cnn.py --workdir=runs/fashion_cnn
`:quick` is a sub-minute smoke run of the same pipeline for tests.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, '', 'quick'):
    raise ValueError(f"unknown variant {arg!r} of fashion_cnn: the only one is 'quick' (or none)")
  quick = arg == 'quick'
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 128
  config.total_steps = 40 if quick else 3000
  config.log_every = 10 if quick else 100
  config.eval_every = 20 if quick else 1000
  config.checkpoint_every = 20 if quick else 1000
  config.checkpoint = dict(keep_latest=2, keep_best=1, best_metric='accuracy', best_mode='max')
  # Stop once validation `metric` has not improved by more than min_delta for `patience` evaluations (None: off);
  # the final test evaluates the best validation checkpoint ('best') or the last state ('last').
  config.early_stopping = dict(metric='accuracy', mode='max', patience=config_dict.placeholder(int), min_delta=0.0)
  config.test_on = 'best'
  # A step whose loss or gradient is NaN or inf is never applied; up to this many are skipped, one more stops the
  # run (exit 3, jft/divergence.py).
  config.skip_nonfinite = 0

  config.data = dict(
      name='fashion',
      data_dir=config_dict.placeholder(str),
      # The 60,000 training images: the first 5,000 held out to pick the best checkpoint.
      train_split='train[5000:]',
      validation_split='train[:500]' if quick else 'train[:5000]',
      test_split='test[:1000]' if quick else 'test',
      augment=('crop', 'flip'),
      crop_padding=2,
      max_shift=2,
      image_size=config_dict.placeholder(int),
  )
  config.init = config_dict.placeholder(str)  # None: from scratch
  config.init_skip = ('head/.*',)
  config.freeze = ()  # regexes of parameter paths that never change
  config.lr_mults = ()  # (regex, multiplier) pairs
  config.stages = ()  # see jft/stages.py
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
  # LoRA (jft/lora.py; rank 0 is off): low-rank factors beside the selected kernels train, the rest but `train` is
  # frozen; a convolution kernel [h, w, in, out] takes factors [h * w * in, rank] and [rank, out].
  config.lora = dict(rank=0, alpha=8.0, targets=(r'(conv_\d+|hidden)/kernel',), train=('head/.*',))
  config.model = dict(name='cnn', features=(32, 64), hidden=256, dropout=0.0, dtype='float32')
  config.optim = dict(name='adamw', lr=2e-3, weight_decay=1e-4, b1=0.9, b2=0.999, warmup_steps=100,
                      schedule='cosine', clip_norm=config_dict.placeholder(float), accumulate_steps=1)
  # Scale-out (jft/sharding.py): a (data, fsdp, model) device mesh, -1 the rest of the devices; parameters
  # of at least min_bytes are split over fsdp, after the (regex, partition spec) rules; 'pmap': data-parallel only.
  config.mesh = dict(data=-1, fsdp=1, model=1)
  config.sharding = dict(rules=(), min_bytes=2**20)
  config.backend = 'jit'
  return config
