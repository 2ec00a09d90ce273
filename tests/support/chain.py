"""The smoke chain (configs/tiny_world_smoke.yaml) as tests run it: the command, and a run folder started
from a finished one. The finished run itself is the session fixture ``smoke_chain`` (tests/conftest.py)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "tiny_world_smoke.yaml"


def chain_cmd(run_dir) -> list[str]:
    """``realign run`` on the smoke config into ``run_dir``."""
    return [sys.executable, "-m", "realign_lib.run.cli", "run", "--config", str(SMOKE), "--set", f"run_dir={run_dir}"]


def copy_run(src, dest, only=None) -> Path:
    """:func:`realign_lib.run.cli.seed_run` with the smoke config's stages: the copied stages are skipped."""
    from realign_lib.run.cli import seed_run
    from realign_lib.run.config import load_config

    return seed_run(src, dest, list(load_config(SMOKE).stages), only)
