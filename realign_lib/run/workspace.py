"""Where a run folder is, and what to do when a notebook is opened before the stages it needs have run.

A notebook's kernel may start anywhere: in ``notebooks/`` (JupyterLab), in ``/content`` (Colab), in the
repository root (``realign run``). A relative ``run_dir`` therefore never means "relative to the kernel's
working directory": :func:`resolve_run_dir` puts it under ``$REALIGN_HOME`` when that is set, else under
the repository root (the folder holding ``realign_lib/`` and ``notebooks/``), else the working directory
(a kit installed without its repository). ``realign run`` resolves ``run_dir`` the same way, so the CLI
and a notebook opened by hand find the same folder.

:func:`ensure_stages` is each notebook's "needs" line: it checks the earlier stages' outputs and, when
some are missing, builds them in the small setting (``configs/tiny_world_smoke.yaml``, a few minutes on a
laptop) with one ``realign run`` call, so any notebook can be opened first. Inside a ``realign run``
chain it never builds: a missing input there is an error that names the stage to run.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["repo_root", "resolve_run_dir", "model_dir", "TINY_VLM", "stage_present", "ensure_stages", "STAGE_OUTPUTS",
           "CHAIN_ENV", "quiet_notebook"]

CHAIN_ENV = "REALIGN_CHAIN"  # set by `realign run` for the notebooks it executes
HOME_ENV = "REALIGN_HOME"
TINY_VLM = Path("model") / "tiny_vlm"  # where stage 00 saves the tiny VLM, inside the run folder

# the file (glob, relative to the run folder) that shows a stage has produced its outputs
STAGE_OUTPUTS = {
    "00": "data/samples.jsonl",
    "01": "01_retrieval/neighbours.jsonl",
    "02": "02_masking/masked.jsonl",
    "03": "03_induction/preferences.jsonl",
    "04": "04_training/*/adapter_config.json",
}
STAGE_NAMES = {"00": "00_tiny_world", "01": "01_retrieval", "02": "02_masking", "03": "03_induction",
               "04": "04_training"}


def repo_root() -> Path | None:
    """The repository this ``realign_lib`` was imported from (a checkout or an editable install), or None
    for a kit installed into site-packages without its notebooks and configs."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "notebooks").is_dir() and (root / "configs").is_dir() else None


def resolve_run_dir(run_dir: str | os.PathLike) -> Path:
    """``run_dir`` as an absolute path: unchanged if absolute, else under ``$REALIGN_HOME``, else under
    :func:`repo_root`, else under the working directory. ``~`` is expanded."""
    p = Path(run_dir).expanduser()
    if p.is_absolute():
        return p
    base = os.environ.get(HOME_ENV) or repo_root() or Path.cwd()
    return (Path(base).expanduser() / p).resolve()


def model_dir(run: str | os.PathLike, model_path: str | os.PathLike = "") -> Path:
    """The model a stage uses: ``model_path`` when given (a folder; a hub id is passed on as it is),
    else the tiny VLM that stage 00 trained into the run folder (``<run>/model/tiny_vlm``)."""
    return Path(model_path) if model_path else Path(run) / TINY_VLM


def stage_present(run: Path, number: str) -> bool:
    """Whether stage ``number`` ("00" … "04") has outputs in ``run``: its finished-stage marker (written by
    ``realign run``) or its main output file (a notebook run by hand writes no marker)."""
    run = Path(run)
    if any(run.glob(f"{number}_*/.done.json")) or any(run.glob(f"{number}_*/*/.done.json")):
        return True
    return any(run.glob(STAGE_OUTPUTS[number]))


def ensure_stages(run: str | os.PathLike, needs: list[str], config: str | os.PathLike | None = None,
                  log=print) -> list[str]:
    """Make sure the stages ``needs`` (numbers such as ``["00", "01"]``) have outputs in ``run``; build the
    missing ones — and every later one they feed, up to the last needed — in the small setting with one
    ``realign run --config configs/tiny_world_smoke.yaml --set run_dir=<run> --stage ...`` call.
    Returns the stage numbers it built (empty when all were there).

    Inside a ``realign run`` chain (environment variable ``REALIGN_CHAIN``) nothing is built: a missing
    stage raises :class:`FileNotFoundError` naming it, because the chain itself decides what runs."""
    run = Path(run)
    missing = [n for n in sorted(needs) if not stage_present(run, n)]
    if not missing:
        return []
    names = ", ".join(STAGE_NAMES[n] for n in missing)
    if os.environ.get(CHAIN_ENV):
        raise FileNotFoundError(f"{run} has no outputs of {names}: run that stage first "
                                f"(realign run --config <your config> --stage {int(missing[0])})")
    root = repo_root()
    if config is None:
        if root is None:
            raise FileNotFoundError(f"{run} has no outputs of {names}, and the kit's configs/ is not here to build "
                                    f"them: run the earlier notebooks first")
        config = root / "configs" / "tiny_world_smoke.yaml"
    build = [n for n in sorted(STAGE_NAMES) if missing[0] <= n <= max(needs)]
    log(f"{run} has no outputs of {names}: building stages {', '.join(build)} in the small setting "
        f"({Path(config).name}), a few minutes on a laptop ...")
    cmd = [sys.executable, "-m", "realign_lib.run.cli", "run", "--config", str(config), "--set", f"run_dir={run}"]
    for n in build:
        cmd += ["--stage", str(int(n))]
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
               TOKENIZERS_PARALLELISM="false")
    res = subprocess.run(cmd, cwd=root or Path.cwd(), env=env, text=True, capture_output=True)
    if res.returncode != 0:
        raise RuntimeError(f"building {names} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    log(res.stdout.strip().splitlines()[-1] if res.stdout.strip() else "built")
    return build


def quiet_notebook() -> None:
    """Keep a notebook's outputs to what it prints and plots: no progress bars (tqdm, the hub's, datasets',
    transformers' "Loading weights"), no library deprecation warnings, no tqdm "IProgress not found".

    Call it first in a notebook's import cell, before transformers is imported (it imports nothing heavy
    itself and only changes this process's settings). Errors are never hidden.
    """
    import warnings

    for key in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ[key] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message="IProgress not found")
    for module in ("transformers", "peft", "trl", "accelerate", "datasets", "torch"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    if "transformers" in sys.modules:  # already imported: switch its bars off directly
        sys.modules["transformers"].utils.logging.disable_progress_bar()

