"""tfds builders of quotations from the Debian package `fortunes`, labelled by category (TASKS.md: fortunes8)."""

import collections
import dataclasses
import hashlib
import pathlib
import re
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds

from jft.errors import UserError

FORTUNES8_CLASSES = ('art', 'computers', 'law', 'politics', 'science', 'songs-poems', 'startrek', 'work')

_SEPARATOR = re.compile(r'^%$', re.MULTILINE)  # A line holding only '%'.
_MAX_CONFIG_NAME = 100  # Longer class lists are named by a hash, to keep the directory name short.


def _sha256(text: str) -> str:
  return hashlib.sha256(text.encode('utf-8')).hexdigest()


def split_of(text: str) -> str:
  """The split of `text` by content: the first 8 hex digits of its sha256 mod 10 are 0: 'test', 1: 'validation'."""
  h = int(_sha256(text)[:8], 16) % 10
  return {0: 'test', 1: 'validation'}.get(h, 'train')


def available_categories(source_dir: pathlib.Path) -> list[str]:
  """The category files in `source_dir`: plain files other than the `.dat` indexes and `.u8` links."""
  if not source_dir.is_dir():
    return []
  return sorted(p.name for p in source_dir.iterdir() if p.is_file() and not p.is_symlink() and p.suffix != '.dat')


def read_category(path: pathlib.Path) -> list[str]:
  """The distinct texts of a fortune file, in file order: blocks between '%' lines, stripped, empty ones dropped."""
  blocks = _SEPARATOR.split(path.read_bytes().decode('utf-8', errors='replace'))
  return list(dict.fromkeys(text for text in (block.strip() for block in blocks) if text))


def read_splits(source_dir: pathlib.Path, classes: Sequence[str]) -> dict[str, list[tuple[str, int]]]:
  """(text, label) records per split, ordered by the sha256 of the text; texts under two classes are dropped."""
  missing = [name for name in classes if not (source_dir / name).is_file()]
  if missing:
    available = available_categories(source_dir)
    raise UserError(f'fortunes categories {", ".join(map(repr, missing))} not found in {source_dir}. They come from '
                    'the Debian package fortunes: run `apt-get install fortunes`, and choose data.classes among '
                    f'the installed categories: {", ".join(available) or "(none installed)"}.')
  texts = [read_category(source_dir / name) for name in classes]
  class_count = collections.Counter(text for category in texts for text in category)
  splits = {'train': [], 'validation': [], 'test': []}
  for label, category in enumerate(texts):
    for text in category:
      if class_count[text] == 1:
        splits[split_of(text)].append((text, label))
  # A fixed order that mixes the classes, so that a slice such as 'test[:64]' holds all of them.
  return {split: sorted(records, key=lambda record: _sha256(record[0])) for split, records in splits.items()}


@dataclasses.dataclass(eq=False)
class FortunesConfig(tfds.core.BuilderConfig):
  """The categories of a `fortunes` dataset, label = position in `classes`."""

  classes: tuple[str, ...] = ()


# The configs made so far, by name: tfds warns on every use of a config its builder does not know.
_CONFIGS: dict[str, FortunesConfig] = {}


def fortunes_config(classes: Sequence[str] | None) -> FortunesConfig:
  """The config of the `fortunes` dataset over `classes`: each class list is a dataset of its own."""
  if classes is None or isinstance(classes, str) or not classes:
    raise UserError(f'data.classes is {classes!r}: the dataset fortunes needs a tuple of category names, such '
                    f'as {FORTUNES8_CLASSES[:3]!r} (files under {FortunesBuilder.SOURCE_DIR}).')
  classes = tuple(classes)
  bad = [name for name in classes if not isinstance(name, str) or not re.fullmatch(r'[\w\-.]+', name)]
  if bad or len(set(classes)) != len(classes):
    raise UserError(f'data.classes {classes!r} must be distinct category file names (letters, digits, _ - .): '
                    f'fix {bad or "the repeated names"}.')
  name = '+'.join(classes)
  if len(name) > _MAX_CONFIG_NAME:
    name = f'{len(classes)}classes-{hashlib.sha256(name.encode()).hexdigest()[:16]}'
  return _CONFIGS.setdefault(name, FortunesConfig(name=name, classes=classes,
                                                  description=f'Categories {", ".join(classes)}.'))


class FortunesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder of `text` (utf-8) and `label` examples from fortune files; subclasses give the class list."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  SOURCE_DIR = pathlib.Path('/usr/share/games/fortunes')
  url_infos = None  # Nothing is downloaded: see ImageBuilder.

  @property
  def class_names(self) -> tuple[str, ...]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            # Stored as utf-8 bytes and read back as bytes; encoding it needs no TensorFlow.
            'text': tfds.features.Text(),
            'label': tfds.features.ClassLabel(names=self.class_names),
        }),
        supervised_keys=('text', 'label'),
        disable_shuffling=True,  # Records stay in the order of `read_splits`, the same everywhere.
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data comes from a Debian package.
    # tfds cannot write an empty split (a few small categories may leave one empty): it is left out.
    return {split: self._generate_examples(records)
            for split, records in read_splits(self.SOURCE_DIR, self.class_names).items() if records}

  def _generate_examples(self, records: list[tuple[str, int]]) -> Iterator[tuple[int, dict]]:
    for i, (text, label) in enumerate(records):
      yield i, {'text': text, 'label': label}


class Fortunes8(FortunesBuilder):
  """fortunes8 (TASKS.md): quotations of 8 categories of the Debian package `fortunes`, split by sha256."""

  name = 'fortunes8'

  @property
  def class_names(self) -> tuple[str, ...]:
    return FORTUNES8_CLASSES


class Fortunes(FortunesBuilder):
  """Quotations of the categories `classes` (its config) of the Debian package `fortunes`, split by sha256."""

  name = 'fortunes'

  @classmethod
  def get_builder_config(cls, name: str, version=None) -> FortunesConfig | None:
    del version  # One version.
    return _CONFIGS.get(name)

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.builder_config.classes
