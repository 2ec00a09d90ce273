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
           "format_differences", "better_direction", "describe_differences", "answer_bias"]


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

    A baseline without seeds (the base model, evaluated once) pairs with every seed. Rows may carry a
    ``"group"`` (a world: its own base model and data); pairs are then made within each group only,
    on ``(group, seed)``. ``clear`` is
    True when every paired difference has the same sign and the mean exceeds twice its standard
    error — a plain, conservative reading for 3–5 seeds, not a significance test.
    """
    base = {(r.get("group"), r["seed"]): r["metrics"] for r in rows if r["condition"] == baseline}
    out = {}
    for r in rows:
        if r["condition"] != condition:
            continue
        g = r.get("group")
        b = base.get((g, r["seed"]), base.get((g, None)))
        if b is None:
            continue
        for k, v in r["metrics"].items():
            if k in b:
                out.setdefault(k, []).append((v - b[k], g))
    res = {}
    for k, pairs in out.items():
        ds = [d for d, _ in pairs]
        mean, sd = _mean_sd(ds)
        n = len(ds)
        same_sign = max(sum(d > 0 for d in ds), sum(d < 0 for d in ds))
        se = sd / math.sqrt(n) if n > 1 and sd == sd else float("nan")
        res[k] = {"mean": mean, "sd": sd, "n": n, "same_sign": same_sign, "diffs": ds, "groups": [g for _, g in pairs],
                  "clear": bool(n > 1 and same_sign == n and se == se and abs(mean) > 2 * se)}
    return res


def format_table(summary: dict[str, dict[str, dict]], metrics: Sequence[str], conditions: Sequence[str],
                 digits: int = 1, heads: dict[str, str] | None = None, names: dict[str, str] | None = None) -> str:
    """A Markdown table: one row per condition, ``mean ± sd`` per metric (``heads``: metric → column head,
    ``names``: condition → row name; default the keys themselves)."""
    heads, names = heads or {}, names or {}
    head = "| condition | " + " | ".join(heads.get(m, m) for m in metrics) + " |"
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
        rows.append(f"| {names.get(c, c)} | " + " | ".join(cells) + " |")
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


# --------------------------------------------------------------------------- the reading
_LOWER_IS_BETTER = ("absent_partner_yes_rate", "absent_other_yes_rate", "neither_yes_no", "chair_i", "chair_s")


def better_direction(metric: str) -> int:
    """+1 when a higher value of ``metric`` (a :func:`flat_metrics` name) is better, -1 when lower is,
    0 for the yes-ratio (best at the label balance: which way is better depends on where it starts)."""
    last = metric.split("/")[-1]
    if last == "yes_ratio":
        return 0
    return -1 if last in _LOWER_IS_BETTER else 1


def _verdict(metric: str, diff: float, base_level: float | None, balance: float = 50.0) -> str:
    sign = better_direction(metric)
    if sign:
        return "better" if diff * sign > 0 else "worse"
    if base_level is None or base_level != base_level:
        return "closer to or further from the label balance (base level unknown)"
    return "better (closer to the label balance)" if abs(base_level + diff - balance) < abs(base_level - balance) \
        else "worse (further from the label balance)"


def describe_differences(label: str, diffs: dict[str, dict], metrics: Sequence[str],
                         base_levels: dict[str, float] | None = None, unit: str = "seeds") -> str:
    """One line of the reading for a comparison ``label`` (``"rdpo - base"``): every clear difference
    among ``metrics`` with its mean change and whether it is better or worse, or that none is clear.

    ``diffs``: :func:`paired_differences` of the comparison; ``base_levels``: the baseline's mean per
    metric (needed to judge a yes-ratio change); ``unit``: what the pairs are ("seeds", "(world, seed) pairs").
    """
    base_levels = base_levels or {}
    n = max((x["n"] for m, x in diffs.items() if m in metrics), default=0)
    if n < 2:
        return f"- {label}: one pair only, no spread to compare with."
    verdicts = [(m, x["mean"], _verdict(m, x["mean"], base_levels.get(m)))
                for m, x in diffs.items() if m in metrics and x["clear"]]
    if not verdicts:
        return f"- {label}: no key metric differs beyond the spread ({n} {unit}): neither better nor worse."
    clear = [f"{m} {mean:+.2f} ({v})" for m, mean, v in verdicts]
    good = sum(v.startswith("better") for _, _, v in verdicts)
    bad = sum(v.startswith("worse") for _, _, v in verdicts)
    summary = "better on every clear metric" if not bad else "worse on every clear metric" if not good \
        else f"better on {good}, worse on {bad} clear metrics"
    return (f"- {label}: {summary} (all {n} {unit} agree in sign, |mean| > 2 se): " + ", ".join(clear)
            + "; every other key metric within the spread.")


def answer_bias(levels: dict[str, float], balance: float = 50.0, tolerance: float = 15.0) -> list[str]:
    """POPE splits whose yes-ratio (``levels``: flat metric → value, percent) is more than ``tolerance``
    points from the label balance: ``["adversarial 71.0 %", …]``. Such a model's F1 moves with its
    answer bias: a change that makes it say "yes" more (or less) often shifts F1 without better seeing."""
    out = []
    for k, v in levels.items():
        parts = k.split("/")
        if len(parts) == 3 and parts[0] == "pope" and parts[2] == "yes_ratio" and abs(v - balance) > tolerance:
            out.append(f"{parts[1]} {v:.1f} %")
    return out
