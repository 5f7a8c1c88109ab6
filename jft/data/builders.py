"""tfds builders of the named tasks (see TASKS.md), written as array_record without TensorFlow, and their sources."""

import gzip
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jft.data import fortunes
from jft.errors import UserError

FASHION_CLASSES = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
    'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot',
)

_IDX_IMAGES_MAGIC = 0x803  # uint8 data, 3 dimensions
_IDX_LABELS_MAGIC = 0x801  # uint8 data, 1 dimension


def _read_idx(path: pathlib.Path, magic: int) -> np.ndarray:
  """Reads a gzipped IDX file of uint8 data into an array of the shape its header gives."""
  with gzip.open(path, 'rb') as f:
    data = f.read()
  header = np.frombuffer(data, dtype='>u4', count=1)[0]
  if header != magic:
    raise UserError(f'{path} is not an IDX file of the expected kind (magic {header:#x}, '
                    f'expected {magic:#x}): reinstall it with `apt-get install --reinstall '
                    'dataset-fashion-mnist`.')
  ndim = magic & 0xFF
  shape = tuple(int(d) for d in np.frombuffer(data, dtype='>u4', count=ndim, offset=4))
  return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class ImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder of uint8 `image` [H, W, C] and `label` examples, kept in the order of the source."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  IMAGE_SHAPE: tuple[int, int, int]
  CLASS_NAMES: tuple[str, ...]
  PIXEL_MAX: int  # The largest pixel value: preprocessing divides by it.
  VALIDATION_SIZE: int  # The default validation split is the first this many train examples.
  # Nothing is downloaded, so there is no checksums file to look up; looking for one makes tfds
  # import `importlib_resources`, which it does not install.
  url_infos = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            # A plain uint8 Tensor: tfds.features.Image encodes PNGs through TensorFlow.
            'image': tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=np.uint8),
            'label': tfds.features.ClassLabel(names=self.CLASS_NAMES),
        }),
        supervised_keys=('image', 'label'),
        # Records stay in source order, so a slice such as `train[:5000]` is the same images everywhere.
        disable_shuffling=True,
    )

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray) -> Iterator[tuple[int, dict]]:
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
      yield i, {'image': image, 'label': int(label)}


class Fashion(ImageBuilder):
  """Fashion-MNIST from the Debian package `dataset-fashion-mnist`: 60,000 train and 10,000 test images."""

  name = 'fashion'
  IMAGE_SHAPE = (28, 28, 1)
  CLASS_NAMES = FASHION_CLASSES
  PIXEL_MAX = 255
  VALIDATION_SIZE = 5000
  SOURCE_DIR = pathlib.Path('/usr/share/datasets/fashion-mnist')

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data comes from a Debian package.
    files = {split: (self.SOURCE_DIR / f'{stem}-images-idx3-ubyte.gz',
                     self.SOURCE_DIR / f'{stem}-labels-idx1-ubyte.gz')
             for split, stem in (('train', 'train'), ('test', 't10k'))}
    missing = [str(p) for pair in files.values() for p in pair if not p.exists()]
    if missing:
      raise UserError(f'fashion data files are missing: {", ".join(missing)}. They come from the '
                      'Debian package dataset-fashion-mnist: run `apt-get install dataset-fashion-mnist`.')
    return {split: self._generate_examples(_read_idx(images, _IDX_IMAGES_MAGIC)[..., None],
                                           _read_idx(labels, _IDX_LABELS_MAGIC))
            for split, (images, labels) in files.items()}


class Digits(ImageBuilder):
  """scikit-learn's `load_digits()`: 8x8 images with values 0..16; image i is `test` when i % 5 == 0."""

  name = 'digits'
  IMAGE_SHAPE = (8, 8, 1)
  CLASS_NAMES = tuple(str(d) for d in range(10))
  PIXEL_MAX = 16
  VALIDATION_SIZE = 300

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships with scikit-learn.
    from sklearn import datasets  # pylint: disable=g-import-not-at-top  # Slow import, needed only to build.
    digits = datasets.load_digits()
    images = digits.images.astype(np.uint8)[..., None]
    is_test = np.arange(len(images)) % 5 == 0
    return {
        'train': self._generate_examples(images[~is_test], digits.target[~is_test]),
        'test': self._generate_examples(images[is_test], digits.target[is_test]),
    }


BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    builder.name: builder for builder in (Fashion, Digits, fortunes.Fortunes8, fortunes.Fortunes)
}


def builder_class(name: str) -> type[tfds.core.GeneratorBasedBuilder]:
  if name not in BUILDERS:
    raise UserError(f'Unknown dataset {name!r} in data.name: use one of {", ".join(BUILDERS)}.')
  return BUILDERS[name]


def is_text(name: str) -> bool:
  """Whether dataset `name` holds `text` examples (else `image` ones)."""
  return issubclass(builder_class(name), fortunes.FortunesBuilder)


def make_builder(name: str, data_dir: str | None, classes: Sequence[str] | None = None) -> tfds.core.DatasetBuilder:
  """The builder of dataset `name`; `classes` chooses the categories of the dataset `fortunes`, and only of it."""
  cls = builder_class(name)
  if cls is fortunes.Fortunes:
    return cls(config=fortunes.fortunes_config(classes), data_dir=data_dir, file_format='array_record')
  if classes is not None:
    raise UserError(f'data.classes is set, but the classes of dataset {name!r} are fixed: set data.classes to None, '
                    'or use the dataset fortunes to choose categories.')
  return cls(data_dir=data_dir, file_format='array_record')


def data_source(name: str, split: str, data_dir: str | None = None,
                classes: Sequence[str] | None = None) -> Sequence[dict[str, Any]]:
  """The random-access tfds source of `split` (slices such as 'train[:5000]' work), built on first use."""
  builder = make_builder(name, data_dir, classes)
  builder.download_and_prepare()  # Does nothing once the data is there.
  try:
    return builder.as_data_source(split=split)
  except ValueError as e:
    raise UserError(f'Bad split {split!r} for dataset {name!r}: {e} Use one of '
                    f'{", ".join(builder.info.splits)}, optionally sliced as in "train[5000:]".') from e


def num_classes(name: str, data_dir: str | None = None, classes: Sequence[str] | None = None) -> int:
  """The number of classes of dataset `name` (of `classes`, for the dataset fortunes)."""
  return make_builder(name, data_dir, classes).info.features['label'].num_classes


def class_names(name: str, data_dir: str | None = None, classes: Sequence[str] | None = None) -> list[str]:
  """The names of the classes of dataset `name`, in label order."""
  return list(make_builder(name, data_dir, classes).info.features['label'].names)
