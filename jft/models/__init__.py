"""Models by name: each is a Flax module whose `__call__` takes the batch's input features and `train`."""

import flax.linen as nn
import ml_collections

from jft.errors import UserError
from jft.models.cnn import ResidualBlock, ResNet, SmallCNN

MODELS = {'cnn': SmallCNN, 'resnet': ResNet}


def get_model(model_config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """Builds the module named by `model_config.name`, passing its other fields as arguments."""
  kwargs = model_config.to_dict()
  name = kwargs.pop('name')
  if name not in MODELS:
    raise UserError(f'unknown model {name!r}; config.model.name must be one of {sorted(MODELS)}')
  try:
    return MODELS[name](num_classes=num_classes, **kwargs)
  except TypeError as e:
    raise UserError(f'config.model does not fit model {name!r}: {e}') from None


__all__ = ['MODELS', 'ResNet', 'ResidualBlock', 'SmallCNN', 'get_model']
