"""Stage 2 driver: run a masking backend over samples, check every output, resume after a kill.

:func:`run_masking` drives a backend (:mod:`realign_lib.masking.rule`) over samples into a resumable,
append-only ``masked.jsonl`` (one record per valid sample) and ``masking_failures.jsonl`` (one
per skipped sample, with reason). Every output passes the one check of the method,
:func:`realign_lib.masking.core.check_masking`; invalid outputs are counted, retried once with a
one-shot example where a retry can help (the LLM backends), then skipped — never passed on
(:func:`mask_texts`). :func:`evaluate_masker` measures a backend without writing anything, e.g.
on :data:`FREE_FORM_EXAMPLES`; :func:`evaluate_backends` does so for several backends with a cache;
:func:`summarize_results` and :func:`summarize_files` count; :func:`set_aside_other_backend` moves
another backend's output out of the way before a run.
"""
from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from realign_lib.cache import digest
from realign_lib.files import (append_jsonl, check_settings, iter_jsonl, read_appended, read_json, repair_jsonl_tail,
                               write_json, write_jsonl)
from realign_lib.masking.core import MAX_MASK_WORDS, BackendFailure, Masker, Span, validate_masking, word_count

__all__ = [
    "FREE_FORM_EXAMPLES", "MaskResult", "mask_texts", "summarize_results", "evaluate_masker", "evaluate_backends",
    "run_masking", "summarize_files", "set_aside_other_backend",
]

#: Twenty LLaVA-style detailed descriptions (written for this kit) to test the maskers off the tiny world.
FREE_FORM_EXAMPLES: tuple[str, ...] = (
    "The image shows a busy city street with several cars driving along the road. A red double-decker bus "
    "is stopped at the curb on the left, and a few pedestrians are waiting at the crosswalk in front of it.",
    "A young woman in a yellow raincoat is walking a small white dog along a wet sidewalk. Behind her, "
    "tall brick buildings line the street, and a green umbrella lies open next to a bench.",
    "In this kitchen, a wooden table sits in the middle of the room with four chairs around it. On top of "
    "the table there is a bowl of oranges, two glasses and a silver laptop.",
    "The picture captures a baseball game in progress. The batter, wearing a blue helmet, is swinging at "
    "the ball while the catcher crouches behind home plate and the umpire watches closely.",
    "A black cat is sitting on a windowsill above a radiator, looking out at the snowy garden. Three potted "
    "plants are arranged to the right of the cat.",
    "Two giraffes are standing near a tall acacia tree on a dry savanna. The larger giraffe is eating "
    "leaves from the upper branches, while the smaller one stands beside it.",
    "The bathroom has white tiled walls, a porcelain sink below a round mirror, and a blue towel hanging "
    "on a rack next to the shower.",
    "A man with a gray beard is riding a bicycle down a narrow cobblestone street. A brown leather bag is "
    "strapped to the back of the bicycle, and several pigeons are standing on the ground ahead of him.",
    "This is a close-up of a plate of food: a grilled salmon fillet sits on a bed of rice, with steamed "
    "broccoli on the left side and a slice of lemon on top.",
    "A group of children are playing soccer on a grassy field. One boy in a red shirt is about to kick the "
    "ball toward the goal, and a girl is running behind him.",
    "The living room features a large gray sofa with three orange cushions, a glass coffee table in front "
    "of it, and a flat-screen television mounted on the wall across from the sofa.",
    "An airplane is parked at the gate of an airport, and a baggage cart with several suitcases is waiting "
    "beneath its wing. A worker in an orange vest stands between the cart and the plane.",
    "Several boats are docked in a small harbor at sunset. The water reflects the pink and purple sky, and "
    "a lighthouse can be seen on a rocky hill in the distance.",
    "A skateboarder is performing a trick on a concrete ramp in a skate park. He is wearing a black "
    "t-shirt, and a few spectators are watching from behind a metal fence.",
    "The desk holds a computer monitor, a black keyboard, a wireless mouse and a cup of coffee. A small "
    "potted cactus sits to the left of the monitor.",
    "A herd of brown cows is grazing in a green pasture surrounded by a wooden fence. In the background, "
    "there is a red barn under a cloudy sky.",
    "Two people are sitting on a park bench under a large oak tree. The woman is reading a book, and the "
    "man next to her is feeding bread to a flock of ducks near the pond.",
    "A pizza with pepperoni, mushrooms and green peppers is sitting on a wooden cutting board. A knife and "
    "a bottle of olive oil are placed beside the board.",
    "The train is stopped at a platform where a few passengers are boarding. The train is painted yellow "
    "and blue, and a large clock hangs above the platform.",
    "A little girl is holding a red balloon while standing on a sandy beach. Behind her, the ocean waves "
    "are rolling in, and a white sailboat is visible near the horizon.",
)


# ------------------------------------------------------------------------------------ the driver
@dataclass
class MaskResult:
    """Outcome for one text: ``ok`` with the canonical ``masked`` text and spans, or the reason."""

    text: str
    ok: bool
    masked: str | None = None
    spans: list[Span] = field(default_factory=list)
    reason: str | None = None
    detail: str = ""
    output: str | None = None
    attempts: int = 0
    kind: str | None = None  # "invalid" | "backend_error" when not ok
    attempt_reasons: list[str] = field(default_factory=list)


def mask_texts(texts: Sequence[str], masker: Masker, max_attempts: int | None = None,
               max_mask_words: int = MAX_MASK_WORDS) -> list[MaskResult]:
    """Mask ``texts``, check every output with :func:`~realign_lib.masking.core.check_masking`, retry the invalid ones.

    ``max_attempts`` defaults to 2 for backends where a retry can help (LLMs: the second attempt
    adds a one-shot example) and 1 for the deterministic rule masker. Backend failures (API gave
    up after its own retries) are not retried here; a failure with another reason (a reply cut
    off by the token limit, ``truncated``) counts as an invalid output and is retried like one.
    ``max_mask_words``: the longest mask accepted (:func:`~realign_lib.masking.core.check_masking`).
    """
    attempts = max_attempts or (2 if masker.retry_useful else 1)
    results: list[MaskResult | None] = [None] * len(texts)
    history: list[list[str]] = [[] for _ in texts]
    todo = []
    for i, t in enumerate(texts):  # an empty or word-less response is not sent to the backend at all
        if word_count(t or ""):
            todo.append(i)
        else:
            results[i] = MaskResult(t, False, reason="empty_input", detail=f"chosen response {t!r}", attempts=0,
                                    kind="invalid", attempt_reasons=["empty_input"])
    for attempt in range(attempts):
        if not todo:
            break
        raws = masker.mask_batch([texts[i] for i in todo], attempt=attempt)
        if len(raws) != len(todo):
            raise RuntimeError(f"{masker.name} returned {len(raws)} outputs for {len(todo)} texts")
        again = []
        for i, raw in zip(todo, raws):
            if isinstance(raw, BackendFailure):
                history[i].append(raw.reason)
                kind = "backend_error" if raw.reason == "api_error" else "invalid"
                results[i] = MaskResult(texts[i], False, reason=raw.reason, detail=raw.detail, attempts=attempt + 1,
                                        kind=kind, attempt_reasons=history[i])
                if kind == "invalid":
                    again.append(i)
                continue
            chk = validate_masking(texts[i], raw, max_mask_words)
            if chk.ok:
                results[i] = MaskResult(texts[i], True, masked=chk.masked, spans=chk.spans, output=raw,
                                        attempts=attempt + 1, attempt_reasons=history[i])
            else:
                history[i].append(chk.reason)
                results[i] = MaskResult(texts[i], False, reason=chk.reason, detail=chk.detail, output=raw,
                                        attempts=attempt + 1, kind="invalid", attempt_reasons=history[i])
                if chk.reason != "original_has_mask":
                    again.append(i)
        todo = again
    return results  # type: ignore[return-value]


def summarize_results(results: Sequence[MaskResult]) -> dict:
    """Counts over :func:`mask_texts` results: tried, valid, invalid by reason, retried, rates."""
    valid = [r for r in results if r.ok]
    words = sum(word_count(r.text) for r in valid)
    masked_words = sum(word_count(s.text) for r in valid for s in r.spans)
    return {
        "tried": len(results),
        "valid": len(valid),
        "invalid": len(results) - len(valid),
        "invalid_by_reason": dict(Counter(r.reason for r in results if not r.ok)),
        "backend_errors": sum(r.kind == "backend_error" for r in results),
        "retried": sum(r.attempts > 1 for r in results),
        "recovered_by_retry": sum(r.ok and r.attempts > 1 for r in results),
        "invalid_attempts_by_reason": dict(Counter(x for r in results for x in r.attempt_reasons)),
        "validity_rate": len(valid) / len(results) if results else None,
        "mask_rate": masked_words / words if words else None,
        "masks_per_text": sum(len(r.spans) for r in valid) / len(valid) if valid else None,
    }


def evaluate_masker(masker: Masker, texts: Sequence[str], n_examples: int = 3,
                    max_mask_words: int = MAX_MASK_WORDS) -> dict:
    """Validity and mask rate of ``masker`` on ``texts`` (nothing written), with a few valid and
    invalid outputs as examples and the seconds it took."""
    t0 = time.time()
    results = mask_texts(texts, masker, max_mask_words=max_mask_words)
    out = summarize_results(results)
    out["seconds"] = round(time.time() - t0, 2)
    out["valid_examples"] = [{"chosen": r.text, "masked": r.masked} for r in results if r.ok][:n_examples]
    out["invalid_examples"] = [{"chosen": r.text, "output": r.output, "reason": r.reason}
                               for r in results if not r.ok][:n_examples]
    return out


def evaluate_backends(text_sets: dict[str, dict[str, Sequence[str]]], cache_path: str | os.PathLike, backend: str,
                      masker: Masker, summary: dict | None = None, *, hf_model: str = "", batch_size: int = 64,
                      stoplist: bool = True, max_mask_words: int = MAX_MASK_WORDS) -> dict:
    """Validity and mask rate of several backends on named sets of texts, each result cached.

    ``text_sets``: ``{backend: {set name: texts}}`` (backend names of
    :func:`realign_lib.masking.backends.make_masker`). ``backend``/``masker``: this run's backend and the
    masker built for it, used for its own entries; for it, ``summary`` (:func:`summarize_files` of
    the run's output) stands in for the set ``"tiny_world"``. Other backends are built here (and
    closed); one that cannot be loaded is reported as ``{"unavailable": why}``. Each
    :func:`evaluate_masker` result is stored in the JSON file ``cache_path`` under
    ``"<backend>|<hf_model for hf and constrained>|<set name>|max_mask_words=N[|stoplist]|<sha1 of the
    texts, 12 hex>"`` and reused by a rerun with the same settings (a changed ``max_mask_words`` or
    stop list evaluates again, and the results of these backends that this call did not use are
    dropped from the file). Returns ``{backend: {set name: {"n", "validity_rate", "mask_rate",
    "invalid_by_reason", "source", ...}}}``.
    """
    from realign_lib.masking.backends import make_masker

    cache_path = Path(cache_path)
    cache = read_json(cache_path) if cache_path.is_file() else {}
    evaluation, used = {}, set()
    for name, sets in text_sets.items():
        m = masker if name == backend else None
        res = {}
        if name == backend and summary is not None:
            res["tiny_world"] = {"n": summary["valid"] + summary["failed"], "validity_rate": summary["validity_rate"],
                                 "mask_rate": summary["mask_rate"], "invalid_by_reason": summary["failures_by_reason"],
                                 "source": "this run's output"}
        for set_name, texts in sets.items():
            if set_name in res:
                continue
            key = (f"{name}|{hf_model if name in ('hf', 'constrained') else ''}|{set_name}|"
                   f"max_mask_words={max_mask_words}{'|stoplist' if name == 'rule' and stoplist else ''}|"
                   + digest("\n".join(texts), 12))
            if key not in cache:
                if m is None:
                    try:
                        m = make_masker(name, hf_model=hf_model, batch_size=batch_size,
                                        **({"stoplist": stoplist} if name == "rule" else {}))
                    except (FileNotFoundError, OSError) as err:
                        res[set_name] = {"unavailable": str(err)[:200]}
                        continue
                cache[key] = {"backend": m.name, **evaluate_masker(m, texts, max_mask_words=max_mask_words)}
                write_json(cache_path, cache)
            r = cache[key]
            used.add(key)
            res[set_name] = {"n": r["tried"], "validity_rate": r["validity_rate"], "mask_rate": r["mask_rate"],
                             "invalid_by_reason": r["invalid_by_reason"], "seconds": r["seconds"],
                             "invalid_examples": r["invalid_examples"], "source": "evaluation subset"}
        evaluation[name] = res
        if m is not None and m is not masker:
            m.close()
    # results of these backends made with other settings or on other texts are dropped: the file holds
    # what a clean run with these settings would hold (other backends' results stay for a later call)
    stale = [k for k in cache if k.split("|", 1)[0] in text_sets and k not in used]
    if stale:
        write_json(cache_path, {k: v for k, v in cache.items() if k not in stale})
    return evaluation


def set_aside_other_backend(out_path: str | os.PathLike, failures_path: str | os.PathLike, backend: str,
                            now: float | None = None) -> tuple[Path | None, list[str]]:
    """Move the output of *another* backend out of the way before :func:`run_masking` (which refuses it).

    When the records of ``out_path`` (``masked.jsonl``) and ``failures_path`` name any backend other
    than ``backend`` (a masker's ``name``), both files go into a new folder
    ``previous_<their backends>_<unix time>`` beside ``out_path``; a half-written last line is cut
    first. Returns ``(that folder or None when nothing moved, the backends found)``.
    """
    out_path, failures_path = Path(out_path), Path(failures_path)
    previous = {r["backend"] for p in (out_path, failures_path) for r in read_appended(p)}
    if not previous or previous == {backend}:
        return None, sorted(previous)
    tag = "_".join(sorted(previous)).replace(":", "-").replace("/", "-")
    old = out_path.parent / f"previous_{tag}_{int(time.time() if now is None else now)}"
    old.mkdir()
    for p in (out_path, failures_path):
        if p.is_file():
            shutil.move(str(p), old / p.name)
    return old, sorted(previous)


def _failure_record(sid: str, r: MaskResult, backend: str) -> dict:
    return {"id": sid, "chosen": r.text, "reason": r.reason, "kind": r.kind, "detail": r.detail[:500],
            "output": None if r.output is None else r.output[:2000], "attempts": r.attempts, "backend": backend}


def _drop_stale(path: Path, texts: dict[str, str]) -> int:
    """Remove records whose sample's text changed since they were made (``chosen`` differs): they are
    masked again. Returns how many were removed."""
    if not path.is_file():
        return 0
    recs = list(iter_jsonl(path))
    keep = [r for r in recs if str(r["id"]) not in texts or r.get("chosen") == texts[str(r["id"])]]
    if len(keep) != len(recs):
        write_jsonl(path, keep)
    return len(recs) - len(keep)


def run_masking(samples: Sequence[dict], masker: Masker, out_path: str | os.PathLike,
                failures_path: str | os.PathLike | None = None, batch_size: int = 32, max_attempts: int | None = None,
                retry_failed: bool = False, text_key: str = "chosen", progress: bool = False,
                max_mask_words: int = MAX_MASK_WORDS, require_any: bool = True, log=print) -> dict:
    """Mask ``samples[i][text_key]`` into an append-only, resumable JSON-lines file.

    ``out_path`` (``masked.jsonl``) gets one record per valid sample — ``{"id", "chosen", "masked",
    "spans": [{"start", "end", "text"}], "backend"}`` — appended and fsynced batch by batch; ids
    already there are skipped on a rerun, and a half-written last line from a killed run is cut
    first. Skipped samples go to ``failures_path`` (default: ``masking_failures.jsonl`` beside it)
    with reason, detail and the rejected output; on a rerun, ids that failed as *invalid* are not
    tried again unless ``retry_failed``, ids that failed on *backend errors* are; records of a
    sample whose text has changed since are dropped and the sample is masked again. A file written
    by another backend is refused (move it away or use another run folder); one written by the same
    backend with other settings (``max_mask_words``, the masker's ``settings``: model, prompt,
    stoplist…; kept in ``masked.settings.json``) is discarded, saying so, and every sample masked again. When no sample has a
    valid masking at the end (a backend down for every request), it raises, naming the reasons: a
    stage that did no work is not complete (``require_any=False`` returns the counts instead).

    Returns this call's counts (see :func:`summarize_results`) plus ``skipped_done``,
    ``skipped_failed``, ``repaired_bytes`` and ``seconds``.
    """
    t0 = time.time()
    out_path = Path(out_path)
    failures_path = Path(failures_path) if failures_path else out_path.parent / "masking_failures.jsonl"
    ids = [str(s["id"]) for s in samples]
    dup = [k for k, c in Counter(ids).items() if c > 1]
    if dup:
        raise ValueError(f"duplicate sample ids (stage 3 joins on id): {dup[:5]}")
    repaired = repair_jsonl_tail(out_path) + repair_jsonl_tail(failures_path)
    texts = {str(s["id"]): str(s[text_key]) for s in samples}
    if out_path.is_file():
        for rec in iter_jsonl(out_path):
            if rec.get("backend") != masker.name:
                raise ValueError(f"{out_path} holds maskings by {rec.get('backend')!r}, not {masker.name!r}; move it "
                                 f"away (or use another run folder) to mask with another backend")
    check_settings(out_path.with_name(out_path.stem + ".settings.json"),
                   {"backend": masker.name, "max_mask_words": max_mask_words, **getattr(masker, "settings", {})},
                   [out_path, failures_path], on_change="restart", log=log)
    stale = _drop_stale(out_path, texts) + _drop_stale(failures_path, texts)
    done = {str(r["id"]) for r in iter_jsonl(out_path)} if out_path.is_file() else set()
    failed_invalid: set[str] = set()
    if failures_path.is_file() and not retry_failed:
        failed_invalid = {str(r["id"]) for r in iter_jsonl(failures_path)
                          if r.get("kind") == "invalid" and r.get("backend") == masker.name}
    todo = [s for s in samples if str(s["id"]) not in done and str(s["id"]) not in failed_invalid]
    all_results: list[MaskResult] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc=f"masking ({masker.name})")
    for b in range(0, len(todo), batch_size):
        chunk = todo[b:b + batch_size]
        results = mask_texts([str(s[text_key]) for s in chunk], masker, max_attempts=max_attempts,
                             max_mask_words=max_mask_words)
        good = [{"id": str(s["id"]), "chosen": r.text, "masked": r.masked, "spans": [x.to_dict() for x in r.spans],
                 "backend": masker.name} for s, r in zip(chunk, results) if r.ok]
        bad = [_failure_record(str(s["id"]), r, masker.name) for s, r in zip(chunk, results) if not r.ok]
        if good:
            append_jsonl(out_path, good)
        if bad:
            append_jsonl(failures_path, bad)
        all_results += results
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if not out_path.exists():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.touch()
    if require_any and samples and not ({str(r["id"]) for r in iter_jsonl(out_path)} & set(ids)):
        reasons = Counter(r["reason"] for r in iter_jsonl(failures_path) if str(r["id"]) in texts) \
            if failures_path.is_file() else Counter()
        raise RuntimeError(f"no valid masking for any of the {len(ids)} samples (failed: "
                           f"{', '.join(f'{k} {v}' for k, v in reasons.most_common()) or 'none recorded'}); see "
                           f"{failures_path.name}. Backend errors are retried on a rerun; invalid replies with "
                           f"retry_failed=True")
    counts = summarize_results(all_results)
    counts.update({"backend": masker.name, "stale_dropped": stale, "skipped_done": len(done & set(ids)),
                   "skipped_failed": len(failed_invalid & set(ids) - done), "repaired_bytes": repaired,
                   "seconds": round(time.time() - t0, 3)})
    return counts


def summarize_files(out_path: str | os.PathLike, failures_path: str | os.PathLike | None = None,
                    ids: Iterable[str] | None = None) -> dict:
    """Whole-file figures (resume-proof): valid records, ids that only ever failed, validity rate,
    mask rate (masked words / words over valid records), masks per text and their histogram.
    ``ids``: count only these sample ids (e.g. the samples of a small run)."""
    out_path = Path(out_path)
    failures_path = Path(failures_path) if failures_path else out_path.parent / "masking_failures.jsonl"
    keep = None if ids is None else {str(i) for i in ids}
    recs = [r for r in iter_jsonl(out_path) if keep is None or r["id"] in keep] if out_path.is_file() else []
    ok_ids = {r["id"] for r in recs}
    fails: dict[str, dict] = {}
    if failures_path.is_file():
        for r in iter_jsonl(failures_path):
            if r["id"] not in ok_ids and (keep is None or r["id"] in keep):
                fails[r["id"]] = r  # last failure of each id
    words = sum(word_count(r["chosen"]) for r in recs)
    masked_words = sum(word_count(s["text"]) for r in recs for s in r["spans"])
    n_masks = Counter(len(r["spans"]) for r in recs)
    total = len(recs) + len(fails)
    return {
        "valid": len(recs), "failed": len(fails), "validity_rate": len(recs) / total if total else None,
        "mask_rate": masked_words / words if words else None, "words": words, "masked_words": masked_words,
        "masks_per_text": sum(k * v for k, v in n_masks.items()) / len(recs) if recs else None,
        "masks_per_text_hist": {str(k): n_masks[k] for k in sorted(n_masks)},
        "failures_by_reason": dict(Counter(r["reason"] for r in fails.values())),
        "backends": sorted({r["backend"] for r in recs}),
    }
