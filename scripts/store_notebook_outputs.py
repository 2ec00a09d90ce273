"""Regenerate the outputs stored in notebooks/*.ipynb from a reference run of the main command.

    python scripts/store_notebook_outputs.py               # run the main chain (finished stages are skipped), then store
    python scripts/store_notebook_outputs.py --no-run      # store from the run folder as it is

Each stage notebook of the main chain gets the outputs of its executed copy in the run folder
(``runs/tiny_world/<stage>/<stage>.ipynb``), with machine paths rewritten, and records the digest of its
cell sources (``metadata.realign.source_sha256``) so that tests/test_notebooks.py can tell when a
notebook was edited after its outputs were made. 00_real_data is stored from its run on the
kit's shipped sample (``configs/real_data_sample.yaml``, run here too).

Notebook 05 is stored from the comparison run (``--stage-from 05_evaluation=configs/tiny_world_comparison.yaml``,
the default: base, DPO and rDPO over worlds and seeds, the README's result), which must have finished
(``realign run --config configs/tiny_world_comparison.yaml``); ``--stage-from 05_evaluation=`` stores the
main run's instead.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nbformat  # noqa: E402

from realign_lib.run import nbstore  # noqa: E402
from realign_lib.run.config import load_config  # noqa: E402
from realign_lib.run.workspace import resolve_run_dir  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny_world.yaml", help="the reference run's config (main command)")
    ap.add_argument("--no-run", action="store_true", help="do not run the chain first")
    ap.add_argument("--stage-from", action="append", default=["05_evaluation=configs/tiny_world_comparison.yaml",
                                                              "00_real_data=configs/real_data_sample.yaml"],
                    metavar="STAGE=CONFIG", help="store STAGE from the finished run of CONFIG (empty: the main run)")
    args = ap.parse_args(argv)
    cfg = load_config(ROOT / args.config, [])
    run = resolve_run_dir(cfg.run_dir)
    other = {k: v for k, _, v in (x.partition("=") for x in args.stage_from)}  # the last one given wins
    if not args.no_run:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        for config in (args.config, "configs/real_data_sample.yaml"):  # (the comparison: run it yourself, an hour)
            subprocess.run([sys.executable, "-m", "realign_lib.run.cli", "run", "--config", config], cwd=ROOT, env=env,
                           check=True)
    for nb_path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        stage = nb_path.stem
        config = other.get(stage) or args.config
        stage_cfg = load_config(ROOT / config, []) if config != args.config else cfg
        run = resolve_run_dir(stage_cfg.run_dir)
        rel_run = os.path.relpath(run, ROOT) if run.is_relative_to(ROOT) else stage_cfg.run_dir
        replacements = {str(run): rel_run, str(ROOT) + os.sep: "", str(ROOT): ".", str(Path.home()) + os.sep: "~/"}
        source = json.loads(nb_path.read_text())
        for cell in source["cells"]:  # start from the sources alone
            if cell["cell_type"] == "code":
                cell["outputs"], cell["execution_count"] = [], None
        executed = run / stage / f"{stage}.ipynb"
        if stage in stage_cfg.stages and executed.is_file():
            nb = nbstore.with_outputs(source, json.loads(executed.read_text()), replacements,
                                      outputs_from=f"{config} ({rel_run}/{stage}/{stage}.ipynb)")
            left = nbstore.machine_paths(nb)
            if left:
                raise SystemExit(f"{stage}: machine paths left in the outputs: {left[:3]}")
            missing = [first for first, shown in nbstore.figure_cells(nb) if not shown]
            print(f"{stage}: outputs stored ({sum(len(c.get('outputs', [])) for c in nb['cells'] if c['cell_type'] == 'code')} "
                  f"outputs, {len(nbstore.figure_cells(nb)) - len(missing)} figures)"
                  + (f"; figure cells without an image: {missing}" if missing else ""))
        else:
            if stage in stage_cfg.stages:
                raise SystemExit(f"{executed} not found: run {config} first (or drop --no-run)")
            nb = source
            nb["metadata"]["realign"] = {"source_sha256": nbstore.source_digest(source), "outputs_from": None}
            print(f"{stage}: not part of {args.config}; stored without outputs")
        nb = nbformat.from_dict(nb)
        nbformat.validate(nb)  # a notebook any Jupyter opens
        nb_path.write_text(nbformat.writes(nb) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
