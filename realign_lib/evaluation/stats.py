"""Comparing conditions over seeds (stage 05): a model's metrics as one flat table row, mean ± sd per
condition, seed-paired differences against a baseline with how many seeds agree in sign, and their
Markdown tables. Pure functions of numbers.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

from realign_lib.evaluation.mme import MME_COGNITION, MME_PERCEPTION

__all__ = ["flat_metrics", "condition_of", "summarize_conditions", "paired_differences", "format_table",
           "format_differences"]


# --------------------------------------------------------------------------- the comparison
def flat_metrics(m: dict) -> dict[str, float]:
    """One flat ``name → value`` dict from an evaluation's ``metrics.json`` (what the table shows).

    POPE figures in percent (``pope/<split>/accuracy`` …, yes-ratio, the absent-partner yes-rate, the
    share of answers that say neither yes nor no),
    MME scores (per subtask, perception total, compliance in percent), CHAIR in percent.
    """
    out: dict[str, float] = {}
    for split, r in (m.get("pope") or {}).items():
        for k in ("accuracy", "f1", "yes_ratio", "precision", "recall"):
            if k in r:
                out[f"pope/{split}/{k}"] = 100 * r[k]
        if "other_answers" in r and r.get("n"):  # answers saying neither yes nor no (scored "yes" officially)
            out[f"pope/{split}/neither_yes_no"] = 100 * r["other_answers"] / r["n"]
    for split, r in (m.get("pope_partner") or {}).items():
        for k in ("absent_partner_yes_rate", "absent_other_yes_rate"):
            if r.get(k) is not None and r[k] == r[k]:
                out[f"pope/{split}/{k}"] = 100 * r[k]
    mme = m.get("mme") or {}
    for task, r in (mme.get("tasks") or {}).items():
        out[f"mme/{task}"] = r["score"]
    for k in ("perception", "cognition"):
        if mme.get("tasks") and any(t in (MME_PERCEPTION if k == "perception" else MME_COGNITION)
                                    for t in mme["tasks"]):
            out[f"mme/{k}"] = mme[k]
    if "compliance" in mme:
        out["mme/compliance"] = 100 * mme["compliance"]
    for k in ("chair_i", "chair_s", "recall"):
        if (m.get("chair") or {}).get(k) is not None:
            out[f"chair/{k}"] = 100 * m["chair"][k]
    return out


def condition_of(name: str) -> tuple[str, int | None]:
    """``"rdpo_seed2"`` → ``("rdpo", 2)``; a name without a ``_seed<k>`` suffix → ``(name, None)``."""
    mt = re.fullmatch(r"(.+)_seed(\d+)", name)
    return (mt.group(1), int(mt.group(2))) if mt else (name, None)


def _mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if x == x]
    if not xs:
        return float("nan"), float("nan")
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return mean, sd


def summarize_conditions(rows: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """``rows``: ``{"condition", "seed", "metrics": flat}`` → ``condition → metric → {mean, sd, n}``."""
    by: dict[str, dict[str, list]] = {}
    for r in rows:
        for k, v in r["metrics"].items():
            by.setdefault(r["condition"], {}).setdefault(k, []).append(v)
    out = {}
    for cond, ms in by.items():
        out[cond] = {}
        for k, vs in ms.items():
            mean, sd = _mean_sd(vs)
            out[cond][k] = {"mean": mean, "sd": sd, "n": len(vs)}
    return out


def paired_differences(rows: Sequence[dict], condition: str, baseline: str) -> dict[str, dict]:
    """Per metric, ``condition − baseline`` paired by seed: mean, sd, n and seeds agreeing in sign.

    A baseline without seeds (the base model, evaluated once) pairs with every seed. ``clear`` is
    True when every paired difference has the same sign and the mean exceeds twice its standard
    error — a plain, conservative reading for 3–5 seeds, not a significance test.
    """
    base = {r["seed"]: r["metrics"] for r in rows if r["condition"] == baseline}
    out = {}
    for r in rows:
        if r["condition"] != condition:
            continue
        b = base.get(r["seed"], base.get(None))
        if b is None:
            continue
        for k, v in r["metrics"].items():
            if k in b:
                out.setdefault(k, []).append(v - b[k])
    res = {}
    for k, ds in out.items():
        mean, sd = _mean_sd(ds)
        n = len(ds)
        same_sign = max(sum(d > 0 for d in ds), sum(d < 0 for d in ds))
        se = sd / math.sqrt(n) if n > 1 and sd == sd else float("nan")
        res[k] = {"mean": mean, "sd": sd, "n": n, "same_sign": same_sign, "diffs": ds,
                  "clear": bool(n > 1 and same_sign == n and se == se and abs(mean) > 2 * se)}
    return res


def format_table(summary: dict[str, dict[str, dict]], metrics: Sequence[str], conditions: Sequence[str],
                 digits: int = 1) -> str:
    """A Markdown table: one row per condition, ``mean ± sd (n)`` per metric."""
    head = "| condition | " + " | ".join(metrics) + " |"
    rows = [head, "| --- |" + " ---: |" * len(metrics)]
    for c in conditions:
        cells = []
        for m in metrics:
            s = summary.get(c, {}).get(m)
            if s is None or s["mean"] != s["mean"]:
                cells.append("–")
            elif s["n"] > 1 and s["sd"] == s["sd"]:
                cells.append(f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}")
            else:
                cells.append(f"{s['mean']:.{digits}f}")
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(rows)



def format_differences(diffs: dict[str, dict[str, dict]], metrics: Sequence[str]) -> str:
    """A Markdown table of :func:`paired_differences` results: one row per comparison (``label →
    metric → difference``), ``mean ± sd (seeds agreeing in sign/seeds)`` per metric, **bold** when clear."""
    rows = ["| comparison | " + " | ".join(metrics) + " |", "| --- |" + " ---: |" * len(metrics)]
    for label, d in diffs.items():
        cells = []
        for m in metrics:
            x = d.get(m)
            if x is None:
                cells.append("–")
            else:
                sd = f" ± {x['sd']:.1f}" if x["n"] > 1 and x["sd"] == x["sd"] else ""
                cells.append(f"{'**' if x['clear'] else ''}{x['mean']:+.1f}{sd}{'**' if x['clear'] else ''} "
                             f"({x['same_sign']}/{x['n']})")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
