"""Data: tfds builders of the named image tasks and the grain pipelines that batch them."""

from jft.data.builders import BUILDERS, Digits, Fashion, ImageBuilder
from jft.data.image_ops import make_augment, random_crop, random_flip, random_shift, resize_bilinear, translate
from jft.data.pipeline import Batch, data_source, default_image_config, eval_batches, num_classes, train_iterator

__all__ = [
    'BUILDERS', 'Batch', 'Digits', 'Fashion', 'ImageBuilder', 'data_source', 'default_image_config',
    'eval_batches', 'make_augment', 'num_classes', 'random_crop', 'random_flip', 'random_shift',
    'resize_bilinear', 'train_iterator', 'translate',
]
