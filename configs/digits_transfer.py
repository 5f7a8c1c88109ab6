"""Fine-tune the fashion CNN on digits: every layer from the fashion run except a new 10-way head.

python -m jft.main --config=configs/fashion_cnn.py --workdir=runs/fashion_cnn      # first, once
python -m jft.main --config=configs/digits_transfer.py --workdir=runs/digits_transfer
`--config.init` names another fashion run (its work directory, checkpoints/ root or checkpoints/STEP);
`--config.init=` (empty) trains the same CNN from scratch. The data and model are those of
configs/digits_cnn.py: digits scaled to [0, 1] and resized to 28x28, the fashion CNN's input.
"""

import importlib.util
import os

import ml_collections


def _digits_cnn_config(arg: str | None) -> ml_collections.ConfigDict:
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'digits_cnn.py')
  spec = importlib.util.spec_from_file_location('digits_cnn', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  quick = arg == 'quick'
  config = _digits_cnn_config(arg)
  config.init = 'runs/fashion_cnn'
  config.init_skip = ('head/.*',)  # fashion's 10 classes are not digits: a new head
  # The checkpoint fits only the architecture of configs/fashion_cnn.py, which digits_cnn shares.
  config.model = dict(name='cnn', features=(32, 64), hidden=256, dropout=0.0, dtype='float32')
  # Starting close to a good solution: fewer steps and a lower peak learning rate than from scratch.
  config.total_steps = 30 if quick else 300
  config.checkpoint_every = 15 if quick else 100
  config.optim.lr = 5e-4
  config.optim.warmup_steps = 20
  return config
