"""Write the README's results block and the result tables of docs/results.md from committed results.

    python scripts/write_results.py --collect runs/tiny_world_comparison   # after the comparison run: save its
                                                                          # per-model metrics, then write
    python scripts/write_results.py            # write the README block and docs/results.md tables
    python scripts/write_results.py --check    # exit 1 if they differ from what this script writes (a test runs it)

Inputs (committed, small JSON):

* ``experiments/results/comparison.json`` — every model's metrics of ``configs/tiny_world_comparison.yaml``
  (``--collect`` writes it from the run's ``05_evaluation/metrics.json``);
* ``benchmarks/results/stage00_worlds.json`` — the base model of ten world seeds
  (``benchmarks/bench_stage00_worlds.py``);
* ``experiments/results/recipe_search_worlds.jsonl`` — the recipe search across worlds
  (``experiments/recipe_search.py --spec experiments/recipe_search_worlds.yaml``), when it has run.

Each generated part sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers; everything
outside them is left as it is. No number in those parts is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from realign_lib.evaluation.stats import (answer_bias, condition_of, describe_differences, flat_metrics,  # noqa: E402
                                          format_table, paired_differences, summarize_conditions)

COMPARISON = ROOT / "experiments" / "results" / "comparison.json"
WORLDS = ROOT / "benchmarks" / "results" / "stage00_worlds.json"
SEARCH_WORLDS = ROOT / "experiments" / "results" / "recipe_search_worlds.jsonl"
README = ROOT / "README.md"
RESULTS_DOC = ROOT / "docs" / "results.md"
COLUMNS = {  # metric → column head
    "pope/random/accuracy": "POPE random acc", "pope/popular/accuracy": "POPE popular acc",
    "pope/adversarial/accuracy": "POPE adversarial acc", "pope/adversarial/f1": "adversarial F1",
    "pope/adversarial/yes_ratio": "adversarial yes %", "pope/adversarial/absent_partner_yes_rate": "yes to absent partner",
    "mme/perception": "MME-style perception", "chair/chair_i": "CHAIR_i",
}
NAMES = {"base": "base", "dpo": "DPO", "rdpo": "rDPO"}
COMPARISONS = [("rdpo", "base"), ("rdpo", "dpo"), ("dpo", "base")]


# ------------------------------------------------------------------------------------ collect
def collect(run: Path) -> dict:
    """The committed form of a finished comparison run: each model's flat metrics and what was asked."""
    m = json.loads((run / "05_evaluation" / "metrics.json").read_text())
    cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    first = next(iter(m["per_model"].values()))
    return {
        "config": Path(cfg.get("config", "configs/tiny_world_comparison.yaml")).name,
        "worlds": m.get("worlds") or [],
        "eval_split": m["eval_split"],
        "pope_questions_per_split": {s: r["n"] for s, r in first["pope"].items()},
        "mme_questions": (first.get("mme") or {}).get("questions"),
        "chair_images": (first.get("chair") or {}).get("n"),
        "models": {name: {k: round(v, 4) for k, v in flat_metrics(r).items()} for name, r in m["per_model"].items()},
    }


# ------------------------------------------------------------------------------------ tables
def _rows(comp: dict) -> list[dict]:
    rows = []
    for name, metrics in comp["models"].items():
        world, _, model = name.rpartition("/")
        cond, seed = condition_of(model)
        rows.append({"condition": cond, "seed": seed, "group": world or None, "metrics": metrics})
    return rows


def _pm(mean: float, spread: float, digits: int = 1, sign: bool = False) -> str:
    head = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return head if spread != spread else f"{head} ± {spread:.{digits}f}"


def _se2(d: dict) -> float:
    return 2 * d["sd"] / math.sqrt(d["n"]) if d["n"] > 1 and d["sd"] == d["sd"] else float("nan")


def comparison_block(comp: dict, per_world_table: bool = True) -> str:
    """The comparison's tables and generated reading (``per_world_table=False``: without the per-world table,
    for the README)."""
    rows = _rows(comp)
    summary = summarize_conditions(rows)
    worlds = comp["worlds"] or [None]
    n_pairs = sum(1 for r in rows if r["condition"] == "rdpo")
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None})
    q = comp["pope_questions_per_split"]
    head = "| condition | " + " | ".join(COLUMNS.values()) + " |\n| --- |" + " ---: |" * len(COLUMNS)
    level = format_table(summary, list(COLUMNS), [c for c in ("base", "dpo", "rdpo") if c in summary],
                         heads=COLUMNS, names=NAMES)
    comps = [(a, b) for a, b in COMPARISONS if a in summary and b in summary]
    diffs = {f"{a} - {b}": paired_differences(rows, a, b) for a, b in comps}
    pooled = [head.replace("| condition |", "| paired |")]
    for (a, b), (label, d) in zip(comps, diffs.items()):
        cells = []
        for k in COLUMNS:
            x = d.get(k)
            cell = "–" if x is None else _pm(x["mean"], _se2(x), 2, sign=True) + f" ({x['same_sign']}/{x['n']})"
            cells.append(f"**{cell}**" if x and x["clear"] else cell)
        pooled.append(f"| {NAMES[a]} − {NAMES[b]} | " + " | ".join(cells) + " |")
    per_world = [head.replace("| condition |", "| world: paired |")]
    by_world = {}
    for w in (w for w in worlds if w is not None):
        wrows = [r for r in rows if r["group"] == w]
        for a, b in comps:
            d = paired_differences(wrows, a, b)
            by_world[(w, a, b)] = d
            per_world.append(f"| {w}: {NAMES[a]} − {NAMES[b]} | " + " | ".join(
                _pm(d[k]["mean"], d[k]["sd"], 2, sign=True) if k in d else "–" for k in COLUMNS) + " |")
    unit = "(world, seed) pairs" if comp["worlds"] else "seeds"
    reading = [describe_differences(f"{NAMES[a]} − {NAMES[b]}", diffs[f"{a} - {b}"], list(COLUMNS),
                                    {k: v["mean"] for k, v in summary[b].items()}, unit=unit) for a, b in comps]
    for a, b in [c for c in comps if c[0] == "rdpo"]:
        for k in ("pope/adversarial/f1", "chair/chair_i"):
            means = [by_world[(w, a, b)][k]["mean"] for w in worlds if w is not None and k in by_world[(w, a, b)]]
            if means:
                better = sum((m > 0) == (k != "chair/chair_i") and m != 0 for m in means)
                reading.append(f"- {NAMES[a]} − {NAMES[b]}, {COLUMNS[k]}: better in {better} of {len(means)} worlds "
                               f"(world means " + ", ".join(f"{m:+.2f}" for m in means) + ").")
    biased = {w: answer_bias({k: v for k, v in comp["models"][f"{w}/base" if w else "base"].items()})
              for w in worlds}
    for w, b in biased.items():
        if b:
            reading.append(f"- Caution: the base model of {w or 'the world'} says yes far from the label balance "
                           f"({', '.join(b)}): its F1 moves with its answer bias.")
    intro = (f"`configs/{comp['config']}`: {len(comp['worlds']) or 1} world(s) × {len(seeds)} training seeds of DPO "
             f"and rDPO ({n_pairs} (world, seed) pairs per condition); every model answers its own world's "
             f"{comp['eval_split']} images: {', '.join(f'{v:,} {s}' for s, v in q.items())} POPE questions, "
             f"CHAIR on {comp.get('chair_images') or '–'} images. Levels: mean ± sd over the models of a condition "
             f"(the base: one per world). Accuracy and rates in %, MME-style perception out of 800, CHAIR_i the "
             f"share of named objects that are absent (lower is better).")
    return "\n\n".join([
        intro, level,
        f"Paired differences over the {n_pairs} {unit} (mean ± 2 standard errors; in brackets the pairs agreeing "
        f"in sign; **bold**: all agree and the mean is beyond 2 se):", "\n".join(pooled),
        *(["Per world (mean ± sd over its seeds):", "\n".join(per_world)] if per_world_table and len(per_world) > 1
          else ["Per world: [docs/results.md](docs/results.md#the-comparison-base-dpo-and-rdpo-over-worlds-and-seeds)."] if len(per_world) > 1 else []),
        "Reading (generated from the tables above):", "\n".join(reading)])


def worlds_block(data: dict) -> str:
    b = data["bounds"]
    recs = data["records"]
    st = next((r["settings"] for r in recs if "sft_restarts" in r["settings"]), recs[0]["settings"])
    before = [r["seed"] for r in recs if "sft_restarts" not in r["settings"]]  # measured before warm restarts existed
    head = ("| world seed | val acc random | val acc popular | val acc adversarial | val recall (min) | "
            "val yes % (r/p/a) | test acc adversarial | CHAIR_i | warm restarts | stage 00 (s) | meets bounds |\n"
            "| ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    lines = [head]
    for r in recs:
        v = r["validation"]
        lines.append(f"| {r['seed']} | {v['random']['accuracy']:.1f} | {v['popular']['accuracy']:.1f} | "
                     f"{v['adversarial']['accuracy']:.1f} | {min(x['recall'] for x in v.values()):.1f} | "
                     + "/".join(f"{v[s]['yes_ratio']:.0f}" for s in ("random", "popular", "adversarial"))
                     + f" | {r['test']['pope']['adversarial']['accuracy']:.1f} | {r['test']['chair_i']:.1f} | "
                     f"{r.get('warm_restarts', 0)}{'*' if r['seed'] in before else ''} | {r['seconds']['stage_wall']:.0f} | {'yes' if not r['misses'] else 'no: ' + ', '.join(r['misses'])} |")
    ok = sum(not r["misses"] for r in recs)
    walls = sorted(r["seconds"]["stage_wall"] for r in recs)
    quiet = [r for r in recs if (r["seconds"].get("load_avg_1min") or 99) < 2.5]  # nothing else ran beside it
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    parts = ""
    if quiet:
        sec = [r["seconds"] for r in quiet]
        tp = [s["training_parts"] for s in sec if s.get("training_parts")]
        parts = (f" On the {len(quiet)} seeds that ran with nothing beside them (load average < 2.5), stage 00 took a "
                 f"median {med([s['stage_wall'] for s in sec]):.0f} s: world {med([s['world'] for s in sec]):.0f} s, "
                 f"training {med([s['train'] for s in sec]):.0f} s"
                 + (f" (image loading {med([t['load_images'] for t in tp]):.0f}, tower {med([t['tower'] for t in tp]):.0f},"
                    f" instruction tuning {med([t['sft'] for t in tp]):.0f})" if tp else "")
                 + f", health check {med([s.get('health', 0) for s in sec]):.0f} s, test POPE {med([s['eval'] for s in sec]):.0f} s.")
    return (f"Stage 00 of `{data['config']}` on {len(recs)} world seeds (`benchmarks/bench_stage00_worlds.py`): "
            f"{st['n_train']:,} images, {st['existence_per_image']} extra existence turns per image, "
            f"{st['tower_steps']} tower + {st['sft_steps']} instruction-tuning steps at lr {st['sft_lr']:g}"
            + (f", then up to {st['sft_restarts']} warm restarts of {st['sft_restart_steps']} steps while the model "
               f"misses the bounds below on the validation images" if st.get("sft_restarts") else "") + ". "
            f"Validation figures: the health check's {recs[0]['n_validation_questions']['random']} POPE questions per "
            f"split on the validation images; test figures: every POPE question and CHAIR on 300 test images. "
            f"Bounds: accuracy ≥ {b['min_random_accuracy']:.0f} % on random and ≥ {b['min_adversarial_accuracy']:.0f} % "
            f"on adversarial, recall ≥ {b['min_recall']:.0f} % on every split, CHAIR_i ≥ {b['min_chair_i']:.0f} %.\n\n"
            + "\n".join(lines)
            + (f"\n\n\\* Measured before warm restarts existed (world seeds {', '.join(map(str, before))}). The first "
               "cycle's training is unchanged, so where such a model meets the bounds the current recipe checks it once, "
               "restarts nothing and makes the same model." if before else "")
            + f"\n\n{ok} of {len(recs)} worlds meet every bound. Stage 00's wall time (the whole notebook: world, "
              f"training, health check, test POPE and CHAIR) ranged {walls[0]:.0f}–{walls[-1]:.0f} s, median "
              f"{walls[len(walls) // 2]:.0f} s, on {data['machine']['cpus']} CPU cores (runs one after another; some "
              f"beside other jobs).{parts}")


def search_score(rec: dict) -> float:
    """The recipe search's rule (experiments/recipe_search.yaml): the smallest of rDPO−base F1, base−rDPO
    CHAIR_i, rDPO−DPO F1 and DPO−rDPO CHAIR_i (paired means, points; better is positive)."""
    d = rec["paired_differences"]
    return min(d["rdpo - base"]["pope/adversarial/f1"]["mean"], -d["rdpo - base"]["chair/chair_i"]["mean"],
               d["rdpo - dpo"]["pope/adversarial/f1"]["mean"], -d["rdpo - dpo"]["chair/chair_i"]["mean"])


def search_block(recs: list[dict]) -> str:
    """The candidates of a recipe search: paired differences (mean ± sd, * clear), the rule's score, the choice."""
    cols = [("rdpo - base", "pope/adversarial/f1"), ("rdpo - base", "chair/chair_i"), ("rdpo - dpo", "pope/adversarial/f1"),
            ("rdpo - dpo", "chair/chair_i"), ("dpo - base", "pope/adversarial/f1"), ("dpo - base", "chair/chair_i")]
    name = {"pope/adversarial/f1": "F1", "chair/chair_i": "CHAIR_i"}
    lines = ["| candidate | settings | " + " | ".join(f"{c.replace('rdpo', 'rDPO').replace('dpo', 'DPO').replace(' - ', ' − ')} "
                                                   f"{name[m]}" for c, m in cols) + " | score |",
             "| --- | --- |" + " ---: |" * (len(cols) + 1)]
    for r in recs:
        cells = []
        for c, m in cols:
            x = r["paired_differences"][c][m]
            sd = f" ± {x['sd']:.2f}" if x.get("sd") is not None and x["sd"] == x["sd"] else ""
            cells.append(f"{x['mean']:+.2f}{sd}{'*' if x['clear'] else ''}")
        lines.append(f"| `{r['candidate']}` | `{json.dumps(r['settings'])}` | " + " | ".join(cells)
                     + f" | {search_score(r):+.2f} |")
    best = max(recs, key=search_score)
    n = recs[0]["paired_differences"]["rdpo - base"]["pope/adversarial/f1"]["n"]
    worlds = sorted({m.split("/")[0] for m in recs[0]["models"] if "/" in m})
    return (f"Validation images of {len(worlds)} worlds ({', '.join(worlds)}), {n} (world, seed) pairs per difference; "
            "points, mean ± sd over the pairs (* every pair agrees and |mean| > 2 se); F1 higher is better, CHAIR_i "
            "lower is better; score: the smallest of the first four differences, signed so that better is positive.\n\n"
            + "\n".join(lines)
            + f"\n\n{len(recs)} candidate(s) run ({', '.join(r['candidate'] for r in recs)}). Highest score: "
              f"`{best['candidate']}` ({search_score(best):+.2f})"
            + (": not all four of its differences point the right way." if search_score(best) <= 0 else
               ": all four of its differences point the right way."))


# ------------------------------------------------------------------------------------ files
def replace_block(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"markers {begin} / {end} must appear exactly once")
    pre, rest = text.split(begin)
    return pre + begin + "\n" + body.strip() + "\n" + end + rest.split(end, 1)[1]


def render() -> dict[Path, str]:
    out = {}
    readme, doc = README.read_text(), RESULTS_DOC.read_text()
    if COMPARISON.is_file():
        comp = json.loads(COMPARISON.read_text())
        readme = replace_block(readme, "results", comparison_block(comp, per_world_table=False))
        doc = replace_block(doc, "comparison", comparison_block(comp))
    if WORLDS.is_file():
        doc = replace_block(doc, "stage00-worlds", worlds_block(json.loads(WORLDS.read_text())))
    if SEARCH_WORLDS.is_file():
        doc = replace_block(doc, "search-worlds", search_block(
            [json.loads(x) for x in SEARCH_WORLDS.read_text().splitlines() if x.strip()]))
    out[README], out[RESULTS_DOC] = readme, doc
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--collect", default="", help="a finished comparison run folder: save its metrics first")
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when a file would change")
    args = ap.parse_args(argv)
    if args.collect:
        COMPARISON.write_text(json.dumps(collect(Path(args.collect)), indent=1) + "\n")
    stale = []
    for path, text in render().items():
        if path.read_text() != text:
            stale.append(path)
            if not args.check:
                path.write_text(text)
    if args.check and stale:
        print("out of date (run python scripts/write_results.py): " + ", ".join(str(p.relative_to(ROOT)) for p in stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
