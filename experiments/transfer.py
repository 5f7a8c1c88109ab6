"""What pretraining is worth: fortunes8 from MiniLM vs from random init vs TF-IDF + logistic regression, and
digits from the fashion CNN vs from scratch with 10, 50 and all training examples per class.

python experiments/transfer.py [--quick]
Every neural run is the command line a user would type (`python -m jft.main ...`) in its own work directory
under experiments/runs/ (a finished run is reused, a killed one resumes); the numbers are the final
`split == "test"` lines of their metrics.jsonl. Writes experiments/results/transfer.md and transfer.png.
"""

import argparse
import os

import matplotlib
import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from common import RESULTS, RUNS, run_jft  # noqa: E402

from jft import data  # noqa: E402

SHOTS = (10, 50, None)  # training examples per class; None: all 1,300


def texts_and_labels(split: str) -> tuple[list[str], np.ndarray]:
  source = data.data_source('fortunes8', split)
  examples = source.__getitems__(list(range(len(source))))
  return [e['text'].decode('utf-8') for e in examples], np.array([e['label'] for e in examples])


def tfidf_baseline() -> dict:
  """Word + character n-gram TF-IDF and logistic regression; C chosen on the validation split."""
  (train_x, train_y), (val_x, val_y), (test_x, test_y) = map(texts_and_labels, ('train', 'validation', 'test'))
  vectorizer = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=1)
  features = vectorizer.fit_transform(train_x)
  best = None
  for c in (1.0, 3.0, 10.0, 30.0, 100.0):
    model = LogisticRegression(C=c, max_iter=3000).fit(features, train_y)
    score = accuracy_score(val_y, model.predict(vectorizer.transform(val_x)))
    if best is None or score > best[0]:
      best = (score, c, model)
  _, c, model = best
  predicted = model.predict(vectorizer.transform(test_x))
  return {'accuracy': accuracy_score(test_y, predicted), 'macro_f1': f1_score(test_y, predicted, average='macro'),
          'C': c, 'count': len(test_y)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true', help='the :quick configs: checks the script, not the numbers')
  args = parser.parse_args()
  variant = ':quick' if args.quick else ''
  suffix = '_quick' if args.quick else ''
  os.makedirs(RESULTS, exist_ok=True)

  fortunes = {
      'MiniLM (pretrained), fine-tuned': run_jft(f'minilm_fortunes{suffix}', f'configs/minilm_fortunes.py{variant}'),
      'same BERT from random init': run_jft(
          f'minilm_fortunes_scratch{suffix}', 'configs/minilm_fortunes.py:scratch' + (',quick' if args.quick else '')),
      'TF-IDF + logistic regression': tfidf_baseline(),
  }

  fashion = os.path.join(RUNS, f'fashion_cnn{suffix}')
  run_jft(f'fashion_cnn{suffix}', f'configs/fashion_cnn.py{variant}')
  digits = {}
  for shots in SHOTS:
    shot_flags = [f'--config.data.examples_per_class={shots}'] if shots else []
    label = f'{shots}' if shots else 'all'
    digits[label] = {
        'from fashion': run_jft(f'digits_transfer_{label}{suffix}', f'configs/digits_transfer.py{variant}',
                                f'--config.init={fashion}', *shot_flags),
        'from scratch': run_jft(f'digits_scratch_{label}{suffix}', f'configs/digits_transfer.py{variant}',
                                '--config.init=', *shot_flags),
    }

  lines = ['# Transfer: what pretraining is worth', '',
           'Produced by `python experiments/transfer.py`' + (' --quick (smoke run: not results)' if args.quick else '')
           + '; one seed (0) per row; test split of each task, every example counted.', '',
           '## fortunes8 (8 classes, 458 test texts)', '', '| model | test accuracy | test macro-F1 |', '|---|---|---|']
  lines += [f"| {name} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} |" for name, m in fortunes.items()]
  lines += ['', '## digits (10 classes, 360 test images): the fashion CNN vs the same CNN from scratch', '',
            '| training examples per class | from fashion: accuracy | macro-F1 | from scratch: accuracy | macro-F1 |',
            '|---|---|---|---|---|']
  for label, pair in digits.items():
    t, s = pair['from fashion'], pair['from scratch']
    lines.append(f"| {label} | {t['accuracy']:.3f} | {t['macro_f1']:.3f} | {s['accuracy']:.3f} | {s['macro_f1']:.3f} |")
  with open(os.path.join(RESULTS, f'transfer{suffix}.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))

  figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  names = list(fortunes)
  x = np.arange(len(names))
  left.bar(x - 0.2, [fortunes[n]['accuracy'] for n in names], 0.4, label='accuracy')
  left.bar(x + 0.2, [fortunes[n]['macro_f1'] for n in names], 0.4, label='macro-F1')
  left.set_xticks(x, ['MiniLM\npretrained', 'random\ninit', 'TF-IDF +\nlog. reg.'])
  left.set_ylim(0, 1)
  left.set_title('fortunes8 test')
  left.legend()
  labels = list(digits)
  for kind, marker in (('from fashion', 'o'), ('from scratch', 's')):
    right.plot(labels, [digits[s][kind]['accuracy'] for s in labels], marker=marker, label=kind)
  right.set_xlabel('training examples per class')
  right.set_ylabel('test accuracy')
  right.set_title('digits test: fashion CNN transfer')
  right.legend()
  figure.tight_layout()
  figure.savefig(os.path.join(RESULTS, f'transfer{suffix}.png'), dpi=120)


if __name__ == '__main__':
  main()
