"""Markdown table of experiments/results/stage00_health.jsonl:  python experiments/stage00_health_table.py"""
import json
from pathlib import Path

rows = [json.loads(l) for l in open(Path(__file__).parent / "results" / "stage00_health.jsonl")]
print("| seed | tag | n_train | tower | SFT steps | SFT lr | exchanges: desc / yes-no (existence share) | val POPE acc r/p/a % "
      "| recall r/p/a % | yes-ratio r/p/a % | CHAIR_i % | tower presence_exact | s: world / load / tower / SFT / POPE | curve: step → acc r/a |")
print("|" + "---|" * 14)
for r in rows:
    st, p, d = r["settings"], r["pope_val"], r["sft_data"]
    f = lambda k: "/".join(f"{100 * p[s][k]:.1f}" for s in ("random", "popular", "adversarial"))
    curve = "; ".join(f"{c['step']}→{100 * c['random']['accuracy']:.0f}/{100 * c['adversarial']['accuracy']:.0f}"
                      for c in r.get("curve", []))
    if r.get("restart"):  # a warm restart after instruction tuning: the figures before it, its curve
        rs, before = r["restart"], r["restart"]["pope_val_before"]
        curve += (("; " if curve else "") + f"end of SFT→{100 * before['random']['accuracy']:.0f}/"
                  f"{100 * before['adversarial']['accuracy']:.0f}; restart of {rs['steps']} steps: "
                  + "; ".join(f"+{c['step']}→{100 * c['random']['accuracy']:.0f}/{100 * c['adversarial']['accuracy']:.0f}"
                              for c in rs["curve"]))
    chair_i = f"{100 * r['chair_val']['chair_i']:.1f}" if r.get("chair_val") else "–"
    sec = r["seconds"]
    print(f"| {r['seed']} | {r['tag']} | {st['n_train']} | {st['tower_steps']} | {st['sft_steps']} | {st['sft_lr']:g} "
          f"| {d['exchanges']['description']} / {d['exchanges']['yes_no']} ({100 * d['share_existence']:.0f} %) "
          f"| {f('accuracy')} | {f('recall')} | {f('yes_ratio')} | {chair_i} "
          f"| {r['tower_end']['presence_exact']:.2f} | {sec['world']:.0f} / {sec['load_images']:.0f} / {sec['tower']:.0f} / "
          f"{sec['sft']:.0f}{' + ' + format(sec['restart'], '.0f') if 'restart' in sec else ''} / {sec['pope']:.0f} | {curve} |")
