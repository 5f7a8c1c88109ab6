"""jft: fine-tune pretrained JAX/Flax models, freeze, prune and recover them; config-driven and pure-functional.

The public pieces a user's own script needs, in the order a batch meets them:
`jft.data` (tfds builders + grain pipelines), `jft.models`, `jft.pretrained` (Hugging Face BERT weights),
`jft.init` (parameters from a pretrained model or an earlier run), `jft.apply_fn` (linen / NNX -> apply
function), `jft.rules` (regex rules over parameter paths), `jft.stages`, `jft.optim`, `jft.state`, `jft.step`
(the pure, jitted train and eval steps), `jft.checkpoint`, `jft.metrics`.
"""

from jft import apply_fn, checkpoint, init, metrics, optim, pretrained, rules, sharding, stages, state, step
from jft.errors import UserError

__all__ = ['UserError', 'apply_fn', 'checkpoint', 'init', 'metrics', 'optim', 'pretrained', 'rules', 'sharding',
           'stages', 'state', 'step']
