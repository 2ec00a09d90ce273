"""Stage 3: induce hallucinations and build the dual-preference dataset (Algorithm 1, step 4).

For each sample, in rank order over its top-k retrieved images v_1..v_k, the hallucination-prone
VLM fills the ``[MASK]`` segments of the masked chosen response while looking at v_t; a
sentence-transformers model embeds the chosen response y_w and the candidate y_c; if
``cos(T(y_w), T(y_c)) < tau`` the candidate becomes the rejected response y_l and v_t the retrieved
image v_l, else the next rank is tried; no accepted candidate → the sample is skipped and counted.

This module is the method: the items and the resumable τ loop. The
masks are filled by a fill backend (:mod:`realign_lib.induction.fillers`: :class:`~realign_lib.induction.fillers.MaskFiller`,
slot or instruction filling with a local VLM; :class:`~realign_lib.induction.fillers.EndpointFiller`, a VLM
behind an endpoint) and the candidates scored by a sentence model (:mod:`realign_lib.induction.similarity`).

Rank passes are batched across samples: rank 1 for every pending sample of a chunk, then rank 2
for those still pending, and so on (:func:`induce`). Output is append-only JSON lines with one
record per sample id — accepted pairs in ``preferences.jsonl``, skipped samples with their reason
in a second file — so a killed run resumes where it stopped, and the final files are rewritten in
sample order, equal to an uninterrupted run (greedy decoding is deterministic, and
:class:`~realign_lib.induction.similarity.SentenceEncoder` gives each text the same embedding bit for bit
whatever it is batched with).

A preference record (loadable by ``datasets.load_dataset("json", ...)``, TRL's column names)::

    {"id", "prompt", "images": [image path relative to the run folder], "retrieved_image",
     "chosen", "rejected", "masked", "similarity", "rank", "similarities"}

``similarities`` lists the cosine of every candidate tried, by rank (the last is the accepted one).

The baseline pair sets of the ablations (random swap, corrupted images) write the same format:
:mod:`realign_lib.induction.baselines`. The masked-text helpers are in :mod:`realign_lib.induction.texts`,
the figures' helpers in :mod:`realign_lib.induction.analysis`.
"""
from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from realign_lib.cache import cache_key, file_digest, model_identity
from realign_lib.files import append_jsonl, check_settings, read_appended
from realign_lib.induction.texts import split_masked

__all__ = ["TOP_K", "MIN_LENGTH_RATIO", "too_short", "accept_rank", "induction_settings", "Candidate", "Item",
           "build_items", "item_digest", "induce"]

#: Retrieved images tried per sample (the paper's k), and the shortest candidate accepted as a share of the
#: chosen response's words (a cut-off reply is refused; 0: off). Stage 03's knobs take these defaults.
TOP_K = 5
MIN_LENGTH_RATIO = 0.5


# --------------------------------------------------------------------------------- the τ loop
@dataclass
class Candidate:
    """One image to fill under: its rank, path relative to the run folder, absolute path.

    ``make``: optional callable that writes the image file (corrupted copies are made lazily).
    """

    rank: int
    image: str
    path: str
    make: Callable[[], None] | None = None


@dataclass
class Item:
    """One sample entering the τ loop."""

    id: str
    prompt: str
    image: str                      # relative to the run folder (or absolute)
    chosen: str
    masked: str
    candidates: list[Candidate] = field(default_factory=list)


def _rel(root: str, image: str) -> str:
    return (Path(root) / image).as_posix()


def build_items(samples: Sequence[dict], masked: Sequence[dict], neighbours: Sequence[dict], run_dir,
                top_k: int = TOP_K, limit: int = 0) -> tuple[list[Item], dict]:
    """Join stage-0 samples, stage-2 masked texts and stage-1 neighbours by id (sample order).

    Items are made for the first ``limit`` samples (0 = all); the rest still resolve neighbour
    image paths. Returns ``(items, missing)``: ``missing`` counts samples without a masked record
    or neighbours (they are left out). Candidate paths: ``image_root`` of the neighbour's own
    sample (else of the query) joined with its image, relative to ``run_dir`` unless absolute.
    ``top_k`` above the number of neighbours stage 01 kept is an error (it names both), not a
    silently shorter list.
    """
    kept = max((len(n["neighbours"]) for n in neighbours), default=0)
    if neighbours and top_k > kept:
        raise ValueError(f"top_k={top_k}, but stage 01 kept at most {kept} neighbours per image: run stage 01 "
                         f"with top_k={top_k} too (set top_k once, at the top level of the config)")
    run = Path(run_dir)
    by_id = {s["id"]: s for s in samples}
    m_by = {m["id"]: m for m in masked}
    n_by = {n["id"]: n for n in neighbours}
    items, missing = [], {"no_masked_record": 0, "no_neighbours": 0}
    for s in samples[:limit] if limit else samples:
        m, n = m_by.get(s["id"]), n_by.get(s["id"])
        if m is None:
            missing["no_masked_record"] += 1
            continue
        if n is None:
            missing["no_neighbours"] += 1
            continue
        cands = []
        for nb in sorted(n["neighbours"], key=lambda x: x["rank"])[:top_k]:
            root = by_id.get(nb["id"], s)["image_root"]
            rel = _rel(root, nb["image"])
            cands.append(Candidate(int(nb["rank"]), rel, str(run / rel)))
        chosen = m.get("chosen", s["chosen"])
        items.append(Item(s["id"], s["prompt"], _rel(s["image_root"], s["image"]), chosen, m["masked"], cands))
    return items, missing


def _fill_and_score(now: list[Item], cands: list[Candidate], fill, encoder,
                    stats: dict) -> tuple[list[str], np.ndarray]:
    """One batched fill of ``now`` under ``cands`` and the similarity of each non-empty candidate
    (NaN for an empty one); adds the fill count and seconds to ``stats``."""
    for c in cands:
        if c.make is not None:
            c.make()
    t1 = time.time()
    texts = fill([c.path for c in cands], [it.prompt for it in now], [it.masked for it in now])
    t2 = time.time()
    stats["fills"] += len(now)
    valid = [i for i, t in enumerate(texts) if t.strip()]
    sim = np.full(len(now), np.nan)
    if valid:
        sim[valid] = encoder.similarity([now[i].chosen for i in valid], [texts[i] for i in valid])
    stats["fill"], stats["similarity"] = stats["fill"] + t2 - t1, stats["similarity"] + time.time() - t2
    return texts, sim


def _words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def too_short(chosen: str, candidate: str, min_length_ratio: float = MIN_LENGTH_RATIO) -> bool:
    """True when ``candidate`` has fewer than ``min_length_ratio`` × the words of ``chosen`` (a reply
    cut off, or a refusal): its low similarity would come from its length, not from a hallucination."""
    return _words(candidate) < min_length_ratio * _words(chosen)


def accept_rank(similarities: Sequence[float | None], tau: float,
                too_short_flags: Sequence[bool] | None = None) -> int | None:
    """The τ rule over one sample's candidates in rank order: the index (0-based) of the first one accepted, or None.

    ``similarities[t]``: ``s(y_w, ŷ_t)``, the cosine of the chosen response and the candidate filled under
    retrieved image t+1 (None or NaN: no candidate, e.g. an empty fill); ``too_short_flags[t]``: that
    candidate is :func:`too_short` (None: no flags). Candidate t is accepted when its similarity is known,
    it is not too short, and ``s < tau`` (strictly: ``s == tau`` is refused). :func:`induce` applies this
    rule after every rank pass, so a sample stops at the first accepted rank.
    """
    for t, s in enumerate(similarities):
        short = bool(too_short_flags[t]) if too_short_flags is not None else False
        if s is not None and s == s and not short and s < tau:
            return t
    return None


def induction_settings(model: Any, inputs: Sequence[str | Path], fill_mode: str, sentence_model: str,
                       top_k: int, max_span_tokens: int | None = None, stop_margin: float | None = None,
                       max_new_tokens: int | None = None) -> dict:
    """What the induction output depends on, besides τ: :func:`induce` keeps it beside the output (``signature``)
    and reuses earlier results only while it is unchanged.

    ``model``: the filling model — a loaded model, recorded by :func:`realign_lib.cache.model_identity`, or a
    label (``openai:<model>@<url>`` for an endpoint); ``inputs``: the input files (stage 02's
    ``masked.jsonl``, stage 01's ``neighbours.jsonl``), each recorded by :func:`realign_lib.cache.file_digest`.
    Slot filling adds ``max_span_tokens`` and
    ``stop_margin``; instruction filling adds ``max_new_tokens``. Returns a JSON-ready dict (key order fixed:
    it is written to ``<output>.settings.json``).
    """
    settings = {"model": model if isinstance(model, str) else model_identity(model),
                "inputs": [file_digest(p) for p in inputs],
                "fill_mode": fill_mode, "sentence_model": sentence_model, "top_k": top_k}
    settings.update({"max_span_tokens": max_span_tokens, "stop_margin": stop_margin} if fill_mode == "slot" else
                    {"max_new_tokens": max_new_tokens})
    return settings


def _run_chunk(chunk: list[Item], fill, encoder, tau: float, stats: dict,
               min_length_ratio: float = MIN_LENGTH_RATIO) -> tuple[dict, dict]:
    """The rank passes over one chunk: rank 1 for every pending item in one batched call, then
    rank 2 for those not accepted, …; returns ``(accepted, skipped)`` records by id. A candidate
    :func:`too_short` is never accepted (counted in ``stats["too_short"]``)."""
    accepted: dict[str, dict] = {}
    skipped: dict[str, dict] = {}
    short: dict[str, int] = {it.id: 0 for it in chunk}
    sims: dict[str, list[float]] = {it.id: [] for it in chunk}
    short_flags: dict[str, list[bool]] = {it.id: [] for it in chunk}
    last: dict[str, str] = {}
    pending = []
    for it in chunk:
        if split_masked(it.masked)[1]:
            pending.append(it)
        else:
            skipped[it.id] = {"id": it.id, "reason": "no_mask", "ranks_tried": 0, "similarities": [],
                              "last_candidate": None}
    level = 0
    while pending:
        now = [it for it in pending if level < len(it.candidates)]
        for it in pending:
            if level >= len(it.candidates):
                reason = "none_below_tau" if it.candidates else "no_candidates"
                if it.candidates and short[it.id] == len(sims[it.id]):
                    reason = "too_short"  # every candidate was cut short
                if sims[it.id] and all(x is None for x in sims[it.id]):
                    reason = "fill_failed"  # the filler returned nothing (an endpoint down): retried on a rerun
                skipped[it.id] = {"id": it.id, "reason": reason, "ranks_tried": len(sims[it.id]),
                                  "similarities": sims[it.id], "last_candidate": last.get(it.id),
                                  **({"too_short": short[it.id]} if short[it.id] else {})}
        if not now:
            break
        cands = [it.candidates[level] for it in now]
        texts, sim = _fill_and_score(now, cands, fill, encoder, stats)
        pending = []
        for it, c, text, s in zip(now, cands, texts, sim):
            s = None if np.isnan(s) else round(float(s), 6)
            cut = bool(s is not None and min_length_ratio and too_short(it.chosen, text, min_length_ratio))
            sims[it.id].append(s)
            short_flags[it.id].append(cut)
            last[it.id] = text
            if cut:
                short[it.id] += 1
                stats["too_short"] += 1
            if accept_rank(sims[it.id], tau, short_flags[it.id]) == level:
                accepted[it.id] = {"id": it.id, "prompt": it.prompt, "images": [it.image],
                                   "retrieved_image": c.image, "chosen": it.chosen, "rejected": text,
                                   "masked": it.masked, "similarity": s, "rank": c.rank,
                                   "similarities": sims[it.id]}
            else:
                pending.append(it)
        level += 1
    return accepted, skipped


def item_digest(it: Item) -> str:
    """A digest of what an item's record is made from: sample, prompt, image, chosen, masked text and
    the candidate images in rank order. Stored in each record (``"input"``): a rerun reuses a record
    only while its item is unchanged."""
    return cache_key(it.id, it.prompt, it.image, it.chosen, it.masked, [(c.rank, c.image) for c in it.candidates])


def _reusable_ids(out_path: Path, skipped_path: Path, digests: dict[str, str], log) -> set[str]:
    """Ids whose finished record (pair or skip) was made from the current item; records of changed
    items are dropped from both files (they are computed again), and so are skips whose filler
    failed (retried)."""
    from realign_lib.files import write_jsonl

    keep: set[str] = set()
    dropped = 0
    for path in (out_path, skipped_path):
        recs = read_appended(path)
        good = [r for r in recs if r["id"] not in digests or (r.get("input") == digests[r["id"]]
                                                               and r.get("reason") != "fill_failed")]
        if len(good) != len(recs):
            dropped += len(recs) - len(good)
            write_jsonl(path, good)
        keep |= {r["id"] for r in good if r["id"] in digests}
    if dropped:
        log(f"{dropped} earlier record(s) made from other inputs, or whose filler failed, will be computed again")
    return keep


def _rewrite_canonical(out_path: Path, skipped_path: Path, order: dict[str, int]) -> tuple[int, int]:
    """Rewrite both files in canonical form: item order, one record per id (the first written),
    only the current items; returns the numbers of pairs and of skipped samples."""
    from realign_lib.files import write_jsonl

    acc: dict[str, dict] = {}
    skp: dict[str, dict] = {}
    for r in read_appended(out_path):
        if r["id"] in order:
            acc.setdefault(r["id"], r)
    for r in read_appended(skipped_path):
        if r["id"] in order and r["id"] not in acc:
            skp.setdefault(r["id"], r)
    write_jsonl(out_path, sorted(acc.values(), key=lambda r: order[r["id"]]))
    write_jsonl(skipped_path, sorted(skp.values(), key=lambda r: order[r["id"]]))
    return len(acc), len(skp)


def induce(items: Sequence[Item], fill: Callable[[list, list, list], list[str]], encoder, tau: float,
           out_path, skipped_path, signature: dict | None = None, chunk_size: int = 1024,
           on_change: str = "error", log: Callable[[str], None] = print, progress: bool = True,
           min_length_ratio: float = MIN_LENGTH_RATIO, require_any: bool = True) -> dict:
    """Algorithm 1, step 4, batched across samples, resumable; returns a summary.

    ``fill(images_abs, prompts, masked) -> candidates`` (a :class:`~realign_lib.induction.fillers.MaskFiller`);
    ``encoder`` has ``similarity(a, b)`` (a :class:`~realign_lib.induction.similarity.SentenceEncoder`).
    Items are processed in chunks of ``chunk_size`` (fixed by position in ``items``): within a
    chunk, rank 1 for every pending item in one batched call, then rank 2 for those not accepted,
    …; then the chunk's records are appended (fsynced) to ``out_path`` (accepted) and
    ``skipped_path`` (``{"id", "reason", "ranks_tried", "similarities", "last_candidate"}``). A
    rerun skips ids found in either file whose record was made from the same item
    (:func:`item_digest`, stored as ``"input"``; changed items and skips whose filler failed are
    computed again); finally both files are rewritten in item order
    (atomically; records of ids not in ``items`` dropped). ``signature``: the settings, kept
    beside the output; a rerun with other settings raises, or with ``on_change="restart"``
    starts over. ``min_length_ratio``: a candidate with fewer words than this share of the chosen
    response's is refused whatever its similarity (:func:`too_short`; 0 turns the guard off);
    ``summary["too_short"]`` counts them. No pair at all raises, naming the skip reasons (a stage
    that did no work is not complete), unless ``require_any=False``.
    """
    out_path, skipped_path = Path(out_path), Path(skipped_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sig_path = out_path.with_name(out_path.stem + ".settings.json")
    check_settings(sig_path, {"tau": tau, "min_length_ratio": min_length_ratio, **(signature or {})},
                     [out_path, skipped_path], on_change, log)
    order = {it.id: i for i, it in enumerate(items)}
    if len(order) != len(items):
        raise ValueError("item ids must be unique")
    digests = {it.id: item_digest(it) for it in items}
    done = _reusable_ids(out_path, skipped_path, digests, log)
    todo_total = sum(it.id not in done for it in items)
    if done:
        log(f"resuming: {len(items) - todo_total} of {len(items)} samples already finished")
    t0, n_done = time.time(), 0
    stats = {"fills": 0, "fill": 0.0, "similarity": 0.0, "too_short": 0}
    for c0 in range(0, len(items), chunk_size):
        chunk = [it for it in items[c0:c0 + chunk_size] if it.id not in done]
        if not chunk:
            continue
        accepted, skipped = _run_chunk(chunk, fill, encoder, tau, stats, min_length_ratio)
        for rec in [*accepted.values(), *skipped.values()]:
            rec["input"] = digests[rec["id"]]
        key = lambda r: order[r["id"]]  # noqa: E731
        append_jsonl(out_path, sorted(accepted.values(), key=key))
        append_jsonl(skipped_path, sorted(skipped.values(), key=key))
        done.update(it.id for it in chunk)
        n_done += len(chunk)
        if progress:
            el = time.time() - t0
            log(f"{n_done}/{todo_total} samples, {el:.0f} s ({n_done / max(el, 1e-9):.0f} samples/s)")
    n_pairs, n_skipped = _rewrite_canonical(out_path, skipped_path, order)
    if require_any and items and not n_pairs:
        reasons = Counter(r["reason"] for r in read_appended(skipped_path))
        raise RuntimeError(f"no pair accepted from {len(items)} samples (skipped: "
                           f"{', '.join(f'{k} {v}' for k, v in reasons.most_common())}); nothing to train on. "
                           f"fill_failed: the filler's backend failed (a rerun retries those); none_below_tau: "
                           f"every candidate was too similar (a higher tau accepts more)")
    return {"n_items": len(items), "pairs": n_pairs, "skipped": n_skipped, "computed": n_done,
            "fills": stats["fills"], "too_short": stats["too_short"], "seconds": round(time.time() - t0, 2),
            "seconds_fill": round(stats["fill"], 2),
            "seconds_similarity": round(stats["similarity"], 2)}
