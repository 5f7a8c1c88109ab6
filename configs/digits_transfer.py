"""Fine-tune the fashion CNN on digits: every layer from the fashion run except a new 10-way head.

python -m jft.main --config=configs/fashion_cnn.py --workdir=runs/fashion_cnn      # first, once
python -m jft.main --config=configs/digits_transfer.py --workdir=runs/digits_transfer
`--config.init` names another fashion run (its work directory, checkpoints/ root or checkpoints/STEP).
Digits are scaled to [0, 1] and resized to 28x28 so that they fit the fashion CNN's input.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  quick = arg == 'quick'
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 64
  config.total_steps = 30 if quick else 300
  config.log_every = 10 if quick else 50
  config.eval_every = 15 if quick else 100
  config.checkpoint_every = 15 if quick else 100
  config.checkpoint = dict(keep_latest=2, keep_best=1, best_metric='accuracy', best_mode='max')

  config.data = dict(
      name='digits',
      data_dir=config_dict.placeholder(str),
      train_split='train[137:]',
      validation_split='train[:137]',
      test_split='test',
      augment=('shift',),
      crop_padding=2,
      max_shift=2,
      image_size=28,
      examples_per_class=config_dict.placeholder(int),  # None: all; e.g. 10 for a few-shot run
  )
  config.init = 'runs/fashion_cnn'
  config.init_skip = ('head/.*',)  # fashion's 10 classes are not digits: a new head
  # The architecture of configs/fashion_cnn.py, which the checkpoint must fit.
  config.model = dict(name='cnn', features=(32, 64), hidden=256, dropout=0.0)
  config.optim = dict(name='adamw', lr=5e-4, weight_decay=1e-4, b1=0.9, b2=0.999, warmup_steps=20,
                      schedule='cosine', clip_norm=config_dict.placeholder(float), accumulate_steps=1)
  return config
