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


@pytest.fixture(scope="session")
def smoke_chain(tmp_path_factory):
    """One uninterrupted run of the smoke chain (stages 00-05), shared by the tests that start from it."""
    import subprocess

    from tests.support.chain import chain_cmd

    run_dir = tmp_path_factory.mktemp("chain") / "run"
    res = subprocess.run(chain_cmd(run_dir), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run_dir
