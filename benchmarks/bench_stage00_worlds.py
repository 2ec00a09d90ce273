"""Stage 00 on several world seeds: is the base tiny VLM healthy on every world, and how long does it take?

    python benchmarks/bench_stage00_worlds.py                      # world seeds 0-9, the main config's recipe
    python benchmarks/bench_stage00_worlds.py --seeds 3,4 --keep   # some seeds; keep the run folders

Each seed is the main command's stage 00 exactly as a user runs it (``realign run --config
configs/tiny_world.yaml --stage 0 --set seed=S``) in its own run folder, with the health check set to
warn instead of stop so that a failing world is recorded too. Per seed it records the health check's
validation figures (POPE accuracy / recall / yes-ratio per split on ``n_health`` questions), the test
POPE and CHAIR the notebook reports, the stage's wall time and its parts (world, training, evaluation),
and whether the model meets the bounds below. Figures go to ``benchmarks/results/stage00_worlds.json``
(one record per seed, replaced when a seed is run again); ``scripts/write_results.py`` writes the table
in docs/results.md from it.

The bounds a base model must meet on every seed (validation images; ``health.TARGET``, which stage 00
trains towards with warm restarts, and a CHAIR_i floor): POPE accuracy >= 75 % on random
and >= 60 % on adversarial, recall >= 70 % on every split, and descriptions that still hallucinate
(CHAIR_i >= 20 % on the test images: the method needs something to fix).
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
sys.path.insert(0, str(ROOT))
from realign_lib.run.stages import TinyWorldStage  # noqa: E402
from realign_lib.evaluation.health import TARGET  # noqa: E402

# the stage's own target (health.TARGET, in percent) and descriptions that still hallucinate
BOUNDS = {"min_random_accuracy": 100 * TARGET.min_accuracy, "min_adversarial_accuracy": 100 * TARGET.min_adversarial_accuracy,
          "min_recall": 100 * TARGET.min_recall, "min_chair_i": 20.0}


def meets_bounds(rec: dict) -> list[str]:
    """The bounds ``rec`` (one seed's record) misses; ``[]`` when it meets them all."""
    v, out = rec["validation"], []
    if v["random"]["accuracy"] < BOUNDS["min_random_accuracy"]:
        out.append("random accuracy")
    if v["adversarial"]["accuracy"] < BOUNDS["min_adversarial_accuracy"]:
        out.append("adversarial accuracy")
    if any(v[s]["recall"] < BOUNDS["min_recall"] for s in v):
        out.append("recall")
    if rec["test"]["chair_i"] < BOUNDS["min_chair_i"]:
        out.append("CHAIR_i")
    return out


def record(seed: int, run: Path, wall: float, rc: int) -> dict:
    m = json.loads((run / "00_tiny_world" / "metrics.json").read_text())
    pct = lambda d: {k: round(100 * d[k], 1) for k in ("accuracy", "recall", "yes_ratio")}  # noqa: E731
    marker = json.loads((run / "00_tiny_world" / ".done.json").read_text())
    params = {**TinyWorldStage.defaults(), **marker["parameters"]}
    rec = {
        "seed": seed,
        "settings": {k: params[k] for k in ("n_train", "existence_per_image", "partner_negatives",
                                                          "tower_steps", "sft_steps", "sft_lr", "sft_restarts",
                                                          "sft_restart_steps", "n_health") if k in params},
        "warm_restarts": (m["health"] or {}).get("restarts", 0),  # cycles stage 00 added to reach health.TARGET
        "checks": (m["health"] or {}).get("checks", []),
        "validation": {s: pct(x) for s, x in m["health"]["pope_val"].items()},
        "n_validation_questions": {s: x["n"] for s, x in m["health"]["pope_val"].items()},
        "health_problems": m["health"]["problems"],
        "test": {"pope": {s: pct(x) for s, x in m["pope"].items()},
                 "chair_i": round(100 * m["chair"]["chair_i"], 1), "chair_recall": round(100 * m["chair"]["recall"], 1)},
        "seconds": {**m["seconds"], "stage_wall": marker["seconds"], "command_wall": round(wall, 1),
                    "training_parts": (m.get("model") or {}).get("seconds"),
                    "load_avg_1min": round(os.getloadavg()[0], 2)},  # > ~2.5: something else ran beside it
        "rc": rc,
    }
    rec["misses"] = meets_bounds(rec)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny_world.yaml"))
    ap.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "stage00_worlds"))
    ap.add_argument("--keep", action="store_true", help="keep each seed's run folder (a world is ~80 MB)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stage00_worlds.json"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.is_file() else {"records": []}
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        run = Path(args.runs) / f"seed{seed}"
        t0 = time.time()
        res = subprocess.run([sys.executable, "-m", "realign_lib.run.cli", "run", "--config", args.config,
                              "--stage", "0", "--set", f"seed={seed}", "--set", f"run_dir={run}",
                              "--set", "00_tiny_world.health_check=false"], cwd=ROOT, capture_output=True, text=True)
        wall = time.time() - t0
        if res.returncode != 0:
            print(res.stdout[-2000:] + res.stderr[-2000:], file=sys.stderr)
            return res.returncode
        rec = record(seed, run, wall, res.returncode)
        done["records"] = [r for r in done["records"] if r["seed"] != seed] + [rec]
        done["records"].sort(key=lambda r: r["seed"])
        done.update(bounds=BOUNDS, config=os.path.relpath(args.config, ROOT),
                    machine={"cpus": os.cpu_count(), "platform": platform.platform(terse=True)})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(done, indent=1) + "\n")
        v = rec["validation"]
        print(f"seed {seed}: validation POPE acc " + "/".join(f"{v[s]['accuracy']:.1f}" for s in v)
              + " recall " + "/".join(f"{v[s]['recall']:.1f}" for s in v)
              + f"; test CHAIR_i {rec['test']['chair_i']:.1f}; {rec['seconds']['stage_wall']:.0f} s; "
              + ("meets the bounds" if not rec["misses"] else "MISSES " + ", ".join(rec["misses"])), flush=True)
        if not args.keep:
            shutil.rmtree(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
