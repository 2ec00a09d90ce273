import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests import their helpers as tests.support.* whatever the launcher
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A small tiny world built once per test session."""
    from realign_lib.tinyworld.settings import WorldConfig
    from realign_lib.tinyworld.world import build_world

    out = tmp_path_factory.mktemp("world")
    return build_world(out, WorldConfig(seed=3, n_train=400, n_test=60, n_mme=8, n_val=40))
