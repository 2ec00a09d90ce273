"""The whole tiny-world chain on this machine: wall time per stage and in total (target ≤ 10 min),
and optionally the test suite's time (target ≤ 15 min).

    python benchmarks/bench_chain.py                 # run configs/tiny_world.yaml into a fresh folder, time it
    python benchmarks/bench_chain.py --from runs/tiny_world   # only read the stage times of a finished run
    python benchmarks/bench_chain.py --tests         # also time `bash scripts/test.sh`

Stage times come from the ``.done.json`` markers ``realign run`` writes (papermill wall time of
each notebook, kernel start included). Figures go to ``benchmarks/results/chain.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stage_times(run: Path) -> dict[str, float]:
    out = {}
    for marker in sorted(run.glob("**/.done.json")):
        stage = marker.parent.relative_to(run).as_posix()
        out[stage] = json.loads(marker.read_text())["seconds"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny_world.yaml"))
    ap.add_argument("--from", dest="from_run", default="", help="read a finished run instead of running one")
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "bench_chain"))
    ap.add_argument("--tests", action="store_true", help="also time the README's test command")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "chain.json"))
    args = ap.parse_args(argv)

    summary = {"benchmark": "chain", "config": args.config, "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    if args.from_run:
        run, wall = Path(args.from_run), None
    else:
        run = Path(args.run_dir)
        if run.exists():
            shutil.rmtree(run)
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "realign_lib.run.cli", "run", "--config", args.config,
                              "--set", f"run_dir={run}"], cwd=ROOT)
        wall = time.perf_counter() - t0
        if res.returncode:
            return res.returncode
    times = stage_times(run)
    summary.update({"run_dir": str(run), "stages_s": times, "stages_total_s": round(sum(times.values()), 1),
                    "wall_s": round(wall, 1) if wall else None, "target_s": 600})
    for k, v in times.items():
        print(f"{k:<28} {v:7.1f} s")
    print(f"{'stages in all':<28} {sum(times.values()):7.1f} s" + (f"   (wall {wall:.0f} s)" if wall else ""))
    if args.tests:
        t0 = time.perf_counter()
        res = subprocess.run(["bash", "scripts/test.sh"], cwd=ROOT)
        summary["tests_s"] = round(time.perf_counter() - t0, 1)
        summary["tests_passed"] = res.returncode == 0
        print(f"test suite {summary['tests_s']:.0f} s (exit {res.returncode})")
    from realign_lib.files import write_json

    print(f"wrote {write_json(args.out, summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
