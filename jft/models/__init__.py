"""Models by name: each is a Flax module whose `__call__` takes the batch's input features and `train`."""

import flax.linen as nn
import ml_collections

from jft.errors import UserError
from jft.models.bert import BertClassifier, BertConfig, BertModel, BertOutput
from jft.models.cnn import ResidualBlock, ResNet, SmallCNN
from jft.models.precision import DTYPES, compute_dtype


def bert_classifier(num_classes: int, architecture: str | None = None, pooling: str = 'mean',
                    head_dropout: float | None = None, overrides: dict | None = None, dtype: str = 'float32',
                    remat: bool = False) -> BertClassifier:
  """A BERT classifier shaped like `architecture` (a pretrained name or Hugging Face directory) + `overrides`,
  computing in `dtype` (parameters stay float32), with each encoder layer rematerialised if `remat`."""
  if architecture is None:
    raise UserError("config.model.architecture is not set: name the BERT whose config.json gives the shape, "
                    "e.g. 'minilm' or a Hugging Face directory")
  config = BertConfig.from_source(architecture, **(overrides or {}))
  return BertClassifier(config, num_classes=num_classes, pooling=pooling, head_dropout=head_dropout, dtype=dtype,
                        remat=remat)


MODELS = {'cnn': SmallCNN, 'resnet': ResNet, 'bert': bert_classifier}


def get_model(model_config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """Builds the module named by `model_config.name`, passing its other fields as arguments."""
  kwargs = model_config.to_dict()
  name = kwargs.pop('name')
  if name not in MODELS:
    raise UserError(f'unknown model {name!r}; config.model.name must be one of {sorted(MODELS)}')
  compute_dtype(kwargs.get('dtype', 'float32'))  # a bad name fails here, before anything is built
  try:
    return MODELS[name](num_classes=num_classes, **kwargs)
  except TypeError as e:
    raise UserError(f'config.model does not fit model {name!r}: {e}') from None


__all__ = ['DTYPES', 'MODELS', 'BertClassifier', 'BertConfig', 'BertModel', 'BertOutput', 'ResNet', 'ResidualBlock',
           'SmallCNN', 'bert_classifier', 'compute_dtype', 'get_model']
