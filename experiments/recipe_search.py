"""Recipe search on the tiny world's validation images; resumable; every candidate's figures kept.

    python experiments/recipe_search.py                      # every candidate of recipe_search.yaml
    python experiments/recipe_search.py --only steps_20 lr_2e-4
    python experiments/recipe_search.py --report             # table + dose-response plot from the results

Stages 00-03 (world, tiny VLM, retrieval, masking, pairs) run once into ``<root>/_base`` (or are copied
from the finished run ``base_from`` names, when its settings match: a stage whose settings differ runs
again); each candidate's folder starts as a copy of it (:func:`realign_lib.run.cli.seed_run`), so only the stages its settings
touch run again, then training (DPO and rDPO per seed) and evaluation on the validation images. One
JSON line per candidate goes to the results file: its settings, the mean ± sd per condition and the
paired differences (rDPO − base, rDPO − DPO, DPO − base) of the key validation metrics, the seconds
it took. Candidates already in the file are skipped. The test images are never evaluated here.

A config with ``worlds`` searches across worlds: ``_base`` and every candidate hold one folder per world
(``world<k>``, stages 00-04 each), stage 05 evaluates all of them and pairs conditions within each world,
so each paired difference runs over the (world, seed) pairs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEY_METRICS = ("pope/adversarial/f1", "pope/adversarial/accuracy", "pope/adversarial/yes_ratio",
               "pope/adversarial/absent_partner_yes_rate", "pope/random/f1", "pope/popular/f1",
               "chair/chair_i", "chair/recall")
COMPARISONS = ("rdpo - base", "rdpo - dpo", "dpo - base")
PAIR_KEYS = ("mean", "sd", "n", "same_sign", "clear", "diffs", "groups")  # kept of each paired difference


def _realign(config: Path, run_dir: Path, sets: dict, extra=()) -> None:
    cmd = [sys.executable, "-m", "realign_lib.run.cli", "run", "--config", str(config), "--set", f"run_dir={run_dir}"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={json.dumps(v) if isinstance(v, bool) else v}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    res = subprocess.run(cmd + list(extra), cwd=ROOT, env=env, text=True, capture_output=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")


def _summary(run_dir: Path) -> dict:
    m = json.loads((run_dir / "05_evaluation" / "metrics.json").read_text())
    if m.get("eval_split") != "validation":
        raise RuntimeError(f"{run_dir}: evaluated on {m.get('eval_split')!r}, not the validation images")
    trained = {}
    for name in m["models"]:  # "dpo_seed0", or "world1/dpo_seed0" in a config with worlds
        world, _, model = name.rpartition("/")
        result = run_dir / world / "04_training" / model / "train_result.json"
        if result.is_file():
            r = json.loads(result.read_text())
            trained[name] = {"steps": r["steps"], "pairs_seen": r["steps"] * r["global_batch"], "records": r["records"]}
    return {"eval_split": m["eval_split"], "models": m["models"], "trained": trained,
            "pairs_seen": max((t["pairs_seen"] for t in trained.values()), default=0),
            "per_condition": {c: {k: v for k, v in s.items() if k in KEY_METRICS} for c, s in m["summary"].items()},
            "paired_differences": {c: {k: {x: d[k][x] for x in PAIR_KEYS if x in d[k]} for k in KEY_METRICS if k in d}
                                   for c, d in m["paired_differences"].items()}}


def search(spec_path: Path, only: list[str] | None) -> None:
    import yaml

    from realign_lib.files import append_jsonl, read_appended
    from realign_lib.run.cli import seed_run
    from realign_lib.run.config import load_config

    spec = yaml.safe_load(spec_path.read_text())
    config = (spec_path.parent / spec["config"]).resolve()
    root, results = ROOT / spec["root"], ROOT / spec["results"]
    candidates = spec["candidates"]
    unknown = [c for c in only or [] if c not in candidates]
    if unknown:
        raise SystemExit(f"unknown candidates {unknown}; known: {', '.join(candidates)}")
    for name, sets in candidates.items():  # every candidate's settings are checked before anything runs
        load_config(config, [f"{k}={v}" for k, v in (sets or {}).items()])
    done = {r["candidate"] for r in read_appended(results)} if results.is_file() else set()
    base = root / "_base"
    cfg = load_config(config)
    stages = list(cfg.stages)
    folders = [cfg.world_folder(w) for w in cfg.worlds] or [""]  # one folder per world, or run_dir itself
    before_05 = {"data", "model", "00_tiny_world", "01_retrieval", "02_masking", "03_induction", "config.json"}
    if not all((base / f / "03_induction" / ".done.json").is_file() for f in folders):
        if spec.get("base_from"):  # stages 00-03 of a finished run with the same settings: copied, not rebuilt
            source = (ROOT / spec["base_from"]).resolve()
            print(f"copying stages 00-03 from {source} into {base}", flush=True)
            for f in folders:
                if not (base / f).exists():
                    seed_run(source / f, base / f, stages, only=before_05, run_dir=str(base) if f else None)
        print(f"building stages 00-03 once in {base}" + (f" ({len(folders)} worlds)" if cfg.worlds else ""),
              flush=True)  # (a copied stage whose settings match is skipped)
        _realign(config, base, {}, ["--stage", "0", "--stage", "1", "--stage", "2", "--stage", "3"])
    for name, sets in candidates.items():
        if (only and name not in only) or name in done:
            continue
        run_dir = root / name
        if not run_dir.exists():
            for f in folders:
                seed_run(base / f, run_dir / f, stages, only=before_05, run_dir=str(run_dir) if f else None)
        t0 = time.time()
        print(f"[{name}] {sets or 'defaults'}", flush=True)
        _realign(config, run_dir, sets or {})
        rec = {"candidate": name, "settings": sets or {}, "config": os.path.relpath(config, ROOT),
               "seconds": round(time.time() - t0), **_summary(run_dir)}
        append_jsonl(results, [rec])
        d = rec["paired_differences"].get("rdpo - base", {}).get("pope/adversarial/f1")
        print(f"[{name}] done in {rec['seconds']} s; rDPO − base POPE-adv F1 {d['mean']:+.2f}{_pm(d)}" if d
              else f"[{name}] done", flush=True)


def _pm(d: dict) -> str:
    """``±sd`` of a paired difference; nothing for a single pair (no sd)."""
    sd = d.get("sd")
    return f"±{sd:.2f}" if sd is not None and sd == sd else ""


def report(spec_path: Path) -> None:
    """``<results>.md``: every candidate's validation figures; ``dose_response.png``: base, DPO and
    rDPO against pairs seen (the candidates that change nothing but ``max_steps``, and the default)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import yaml

    from realign_lib.files import read_appended

    spec = yaml.safe_load(spec_path.read_text())
    results = ROOT / spec["results"]
    recs = read_appended(results)
    rows = ["| candidate | settings | " + " | ".join(f"{c}: F1 adv / CHAIR_i" for c in COMPARISONS) + " |",
            "| --- | --- |" + " ---: |" * len(COMPARISONS)]
    for r in recs:
        cells = []
        for c in COMPARISONS:
            d = r["paired_differences"].get(c, {})
            f, ch = d.get("pope/adversarial/f1"), d.get("chair/chair_i")
            cells.append(" / ".join(f"{x['mean']:+.2f}{_pm(x)}{'*' if x['clear'] else ''}" if x else "–"
                                    for x in (f, ch)))
        rows.append(f"| {r['candidate']} | `{json.dumps(r['settings'])}` | " + " | ".join(cells) + " |")
    md = ("Validation paired differences, mean ± sd over seeds (* clear: every seed agrees and |mean| > 2 se). "
          "CHAIR_i: lower is better.\n\n" + "\n".join(rows) + "\n")
    results.with_suffix(".md").write_text(md)
    # dose-response: steps x batch = pairs seen
    pts = [(r["pairs_seen"], r) for r in recs if set(r["settings"]) <= {"04_training.max_steps"}]
    pts.sort(key=lambda x: x[0])
    if pts:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        for ax, m in zip(axes, ("pope/adversarial/f1", "pope/adversarial/yes_ratio", "chair/chair_i")):
            for cond, colour in (("base", "grey"), ("dpo", "tab:orange"), ("rdpo", "tab:blue")):
                xs = [p for p, r in pts if m in r["per_condition"].get(cond, {})]
                ys = [r["per_condition"][cond][m]["mean"] for p, r in pts if m in r["per_condition"].get(cond, {})]
                sd = [r["per_condition"][cond][m].get("sd") or 0 for p, r in pts if m in r["per_condition"].get(cond, {})]
                ax.errorbar(xs, ys, yerr=[s if s == s else 0 for s in sd], marker="o", capsize=3, color=colour,
                            label=cond)
            ax.set_xlabel("pairs seen (steps × batch)")
            ax.set_title(m.replace("pope/", "POPE ").replace("/", " "), fontsize=9)
        axes[0].legend(fontsize=8)
        fig.suptitle("Validation images: base, DPO and rDPO against pairs seen (mean ± sd over seeds)", fontsize=9)
        fig.tight_layout()
        fig.savefig(results.parent / "dose_response.png", dpi=90)
    print(md)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default=str(Path(__file__).with_name("recipe_search.yaml")))
    ap.add_argument("--only", nargs="*", help="run only these candidates")
    ap.add_argument("--report", action="store_true", help="write the table and the dose-response plot")
    a = ap.parse_args(argv)
    if a.report:
        report(Path(a.spec))
    else:
        search(Path(a.spec), a.only)


if __name__ == "__main__":
    main()
