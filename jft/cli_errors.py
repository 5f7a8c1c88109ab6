"""Command-line mistakes in plain words: a missing config file, an error inside a config, an unknown field.

absl and ml_collections report these with their own wording (a config's exception comes with the traceback of
the config loader; an unknown field only as `'name'`). These turn them into one paragraph that names the
problem and the fix; the command line prints it and exits 2.
"""

import difflib
import importlib.util
import os
import re

import ml_collections

CONFIG_DIR = 'configs'


def config_file_problem(argv: list[str]) -> str | None:
  """What is wrong with `--config=FILE[:ARG]` before absl loads it (a missing file), or None."""
  for arg in argv[1:]:
    if arg.startswith('--config='):
      path = arg.removeprefix('--config=').split(':', 1)[0]
      if not os.path.isfile(path):
        known = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith('.py')) if os.path.isdir(CONFIG_DIR) else []
        listing = f' ({", ".join(os.path.join(CONFIG_DIR, f) for f in known)} are here)' if known else ''
        return (f'the config file {path} does not exist: give --config=PATH.py[:ARG] of an existing file'
                f'{listing}; paths are relative to the current directory {os.getcwd()}')
  return None


def explain_flag_error(error: Exception, argv: list[str]) -> str:
  """One paragraph for an exception absl raised while parsing `argv`."""
  text = str(error)
  if 'Error whilst parsing config file' in text:  # the config's own exception, after the loader's traceback
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f'{lines[0].removesuffix(" Error whilst parsing config file:").rstrip(":")}: {lines[-1]}'
  field = _unknown_field(argv)
  if field is not None:
    return field
  return text.strip().strip('"').encode().decode('unicode_escape') if text.startswith(('"', "'")) else text


def _unknown_field(argv: list[str]) -> str | None:
  """'--config.a.b: the config has no field ...' for the first override naming a field the config lacks."""
  config_arg = next((arg for arg in argv[1:] if arg.startswith('--config=')), None)
  if config_arg is None:
    return None
  path, _, variant = config_arg.removeprefix('--config=').partition(':')
  try:  # loaded here as config_flags loads it (whose failed parse cannot be repeated in the same process)
    spec = importlib.util.spec_from_file_location('jft_config_for_the_message', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant) if variant else module.get_config()
  except Exception:  # the config itself does not load: the original message says why
    return None
  for arg in argv[1:]:
    match = re.fullmatch(r'--config\.([\w.]+)(=.*)?', arg)
    if not match:
      continue
    node, walked = config, []
    for name in match.group(1).split('.'):
      fields = list(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
      if name not in fields:
        where = 'config.' + '.'.join(walked) if walked else 'the config'
        close = difflib.get_close_matches(name, fields, n=3, cutoff=0.5)
        hint = f'did you mean {" or ".join(".".join(["--config", *walked, c]) for c in close)}? ' if close else ''
        return (f'{arg.split("=", 1)[0]}: {where} has no field {name!r}; {hint}its fields are: '
                f'{", ".join(sorted(fields))}')
      node, walked = node[name], [*walked, name]
  return None
