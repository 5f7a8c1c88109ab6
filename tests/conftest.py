"""Shared by the tests: one tfds data directory for the whole session (each dataset built on first use)."""

import pytest


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp('tfds'))
