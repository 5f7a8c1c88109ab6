"""How a text job's training batches pad: batches and tokens per bucket, against padding each batch to its longest.

python benchmarks/padding.py [--config=configs/minilm_fortunes.py] [--config.FIELD=VALUE]
Replays the job's own batch plan (`jft.data.text.epoch_plan`: shuffled, sorted by length within windows of
`data.sort_window` batches) for `total_steps` batches and prints, per bucket (`data.buckets`, or the
`data.num_buckets` lengths chosen from the training texts), the batches that pad to it and their share of the
padded tokens, then the padded tokens against those of batches padded to their own longest text (what PyTorch's
script in benchmarks/pytorch_fortunes.py does), then the pad lengths of one evaluation pass over the validation and
test splits. Tokenizes the splits; trains nothing. E.g.
`--config.data.buckets='(16,32,48,64,96,128)' --config.data.num_buckets=0` for six lengths given by hand.
"""

import numpy as np
from absl import app
from ml_collections import config_flags

from jft.data import text

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/minilm_fortunes.py', 'the text job')


def main(_):
  config = _CONFIG.value
  lengths_N = text._training_split(config.data).lengths_N
  buckets = np.asarray(text.bucket_lengths(config.data))
  num_batches = len(lengths_N) // config.batch_size
  longest = []
  for epoch in range(-(-config.total_steps // num_batches)):
    plan = text.epoch_plan(lengths_N, config.batch_size, config.data.sort_window, config.seed, epoch)
    longest += [lengths_N[batch].max() for batch in plan]
  longest = np.asarray(longest[:config.total_steps])
  padded = buckets[np.searchsorted(buckets, longest)]
  print(f'{config.data.name}, {config.total_steps} batches of {config.batch_size}; texts: median '
        f'{np.median(lengths_N):.0f} tokens, {np.mean(lengths_N >= config.data.max_len):.1%} cut at '
        f'{config.data.max_len}; buckets {tuple(buckets.tolist())}'
        f'{" (chosen from the training texts)" if config.data.num_buckets else ""}\n')
  print('| bucket | batches | share of batches | share of padded tokens |')
  print('|---|---|---|---|')
  for bucket in buckets:
    count = int(np.sum(padded == bucket))
    print(f'| {bucket} | {count} | {count / len(padded):.1%} | {bucket * count / padded.sum():.1%} |')
  print(f'\npadded tokens: {padded.sum() * config.batch_size:,} to buckets, {longest.sum() * config.batch_size:,} '
        f'to each batch\'s longest text: {padded.sum() / longest.sum():.3f}x')
  for split in (config.data.validation_split, config.data.test_split):
    # Every eval batch runs at the full batch shape, the part-filled one too (its empty rows reread a text).
    pad_lengths = [batch['input_ids'].shape[1] for batch in text.eval_batches(config.data, split, config.batch_size,
                                                                                slice(None))]
    print(f'\n{split}: one evaluation pass pads its {len(pad_lengths)} batches of {config.batch_size} to '
          f'{tuple(pad_lengths)}: {sum(pad_lengths) * config.batch_size:,} tokens')


if __name__ == '__main__':
  app.run(main)
