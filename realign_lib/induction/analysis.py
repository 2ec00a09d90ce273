"""What stage 03 produced, for its figures: acceptance by retrieval rank and the similarity histogram
(the tiny world's absent-object figures: :func:`realign_lib.tinyworld.benchmarks.absent_object_stats`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["acceptance_by_rank", "similarity_histogram"]


def acceptance_by_rank(records: Sequence[dict], skipped: Sequence[dict], top_k: int) -> list[dict]:
    """Per rank t: samples that reached it (``tried``), were accepted there, and the rate.

    A sample accepted at rank r was tried at ranks 1..r; a skipped one at ``ranks_tried`` ranks.
    ``cumulative`` is the share of all samples accepted at rank ≤ t.
    """
    tried = np.zeros(top_k, int)
    acc = np.zeros(top_k, int)
    for r in records:
        n = len(r.get("similarities") or [None] * int(r["rank"]))
        tried[:min(n, top_k)] += 1
        if 1 <= int(r["rank"]) <= top_k:
            acc[int(r["rank"]) - 1] += 1
    for s in skipped:
        tried[:min(int(s.get("ranks_tried", 0)), top_k)] += 1
    total = len(records) + len(skipped)
    cum = np.cumsum(acc)
    return [{"rank": t + 1, "tried": int(tried[t]), "accepted": int(acc[t]),
             "rate": float(acc[t] / tried[t]) if tried[t] else float("nan"),
             "cumulative": float(cum[t] / total) if total else float("nan")} for t in range(top_k)]


def similarity_histogram(records: Sequence[dict], skipped: Sequence[dict] = (), bins: int = 40,
                         range_: tuple[float, float] | None = None) -> dict:
    """Histogram data of every candidate's similarity (accepted and rejected by τ).

    Returns ``{"edges", "counts_accepted", "counts_refused", "n"}``: accepted = the similarity
    of each pair's accepted candidate; refused = every candidate at or above τ (earlier ranks of
    accepted samples and all ranks of skipped ones).
    """
    acc = [r["similarity"] for r in records if r.get("similarity") is not None]
    refused = [s for r in records for s in (r.get("similarities") or [])[:-1] if s is not None]
    refused += [s for r in skipped for s in (r.get("similarities") or []) if s is not None]
    allv = acc + refused
    if range_ is None:
        range_ = (min(allv), max(allv)) if allv else (0.0, 1.0)
        if range_[0] == range_[1]:
            range_ = (range_[0] - 0.01, range_[1] + 0.01)
    edges = np.linspace(range_[0], range_[1], bins + 1)
    return {"edges": edges.tolist(), "counts_accepted": np.histogram(acc, edges)[0].tolist(),
            "counts_refused": np.histogram(refused, edges)[0].tolist(), "n": len(allv)}

