"""jft: fine-tune pretrained JAX/Flax models, freeze, prune and recover them; config-driven and pure-functional.

The public pieces a user's own script needs, in the order a batch meets them:
`jft.data` (tfds builders + grain pipelines), `jft.models`, `jft.pretrained` (Hugging Face BERT weights),
`jft.init` (parameters from a pretrained model or an earlier run), `jft.apply_fn` (linen / NNX -> apply
function), `jft.rules` (regex rules over parameter paths), `jft.stages`, `jft.optim`, `jft.state`, `jft.step`
(the pure, jitted train and eval steps), `jft.checkpoint`, `jft.metrics`.
"""

import importlib

from jft.errors import UserError

_SUBMODULES = ('apply_fn', 'checkpoint', 'init', 'metrics', 'optim', 'pretrained', 'rules', 'sharding', 'stages',
               'state', 'step')
__all__ = ['UserError', *_SUBMODULES]


def __getattr__(name: str):
  """`jft.optim` and the like, imported on first use: `import jft.rules` alone loads no models, orbax or
  safetensors."""
  if name in _SUBMODULES:
    return importlib.import_module(f'jft.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return sorted({*globals(), *_SUBMODULES})
