"""Shared by the tests: one tfds data directory for the whole session (each dataset built on first use), and one
compilation cache for the command-line runs of the session (not the user's ~/.cache/jft/xla)."""

import os
import shutil
import tempfile

import pytest


def pytest_configure(config):
  if 'JFT_COMPILATION_CACHE' not in os.environ:
    config.jft_cache = os.environ['JFT_COMPILATION_CACHE'] = tempfile.mkdtemp(prefix='jft-tests-xla-')


def pytest_unconfigure(config):
  if getattr(config, 'jft_cache', None):
    shutil.rmtree(config.jft_cache, ignore_errors=True)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp('tfds'))
