"""Data: tfds builders of the named tasks and the grain pipelines that batch them (images, and text by length)."""

from jft.data.builders import BUILDERS, Digits, Fashion, ImageBuilder, class_names, data_source, is_text, num_classes
from jft.data.fortunes import FORTUNES8_CLASSES, Fortunes, Fortunes8, FortunesBuilder, fortunes_config, split_of
from jft.data.image_ops import make_augment, random_crop, random_flip, random_shift, resize_bilinear, translate
from jft.data.pipeline import Batch, batch_lengths, default_image_config, eval_batches, first_per_class, train_iterator
from jft.data.text import bucket_lengths, choose_buckets, default_text_config, epoch_plan, tokenize

__all__ = [
    'BUILDERS', 'FORTUNES8_CLASSES', 'Batch', 'Digits', 'Fashion', 'Fortunes', 'Fortunes8', 'FortunesBuilder',
    'ImageBuilder', 'batch_lengths', 'bucket_lengths', 'choose_buckets', 'class_names', 'data_source',
    'default_image_config', 'default_text_config', 'epoch_plan', 'eval_batches', 'first_per_class',
    'fortunes_config', 'is_text', 'make_augment', 'num_classes', 'random_crop', 'random_flip', 'random_shift',
    'resize_bilinear', 'split_of', 'tokenize', 'train_iterator', 'translate',
]
