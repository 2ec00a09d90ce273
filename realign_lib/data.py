"""Training samples in the kit's one shape, from the LLaVA-Instruct-150K layout.

A *sample* is ``{"id", "image", "prompt", "chosen"}``: the image file (relative to an image root),
the user's question without the ``<image>`` tag, and the reference answer (the chosen response).
``samples_from_llava`` reads LLaVA-Instruct-150K (``[{"id", "image", "conversations": [...]}]``)
and keeps the first human/gpt exchange of each record whose image exists, so the tiny world's
file and the real one (with a COCO train2014 folder) give the same kind of samples.
"""
from __future__ import annotations

import os
from pathlib import Path

from .io import append_jsonl, iter_jsonl, read_json

__all__ = ["samples_from_llava", "chosen_from_endpoint"]


def samples_from_llava(json_path: str | os.PathLike, image_root: str | os.PathLike, limit: int | None = None,
                       prompt_contains: str | None = None) -> tuple[list[dict], dict]:
    """Samples from a LLaVA-Instruct JSON file, plus counts of what was kept and skipped (and why).

    ``prompt_contains`` keeps only records whose first question contains that text (for example
    ``"Describe"`` for detailed descriptions); ``limit`` stops after that many samples.
    """
    data = read_json(json_path)
    if not isinstance(data, list):
        raise ValueError(f"{json_path}: expected a JSON list of LLaVA-Instruct records")
    root = Path(image_root)
    samples, skipped = [], {"no_image_key": 0, "missing_image": 0, "no_exchange": 0, "filtered": 0}
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or "image" not in rec:
            skipped["no_image_key"] += 1
            continue
        conv = rec.get("conversations") or []
        if len(conv) < 2 or conv[0].get("from") != "human" or conv[1].get("from") != "gpt" or not str(conv[1].get("value", "")).strip():
            skipped["no_exchange"] += 1
            continue
        prompt = conv[0]["value"].replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "").strip()
        if prompt_contains and prompt_contains not in prompt:
            skipped["filtered"] += 1
            continue
        if not (root / rec["image"]).is_file():
            skipped["missing_image"] += 1
            continue
        samples.append({"id": str(rec.get("id", i)), "image": rec["image"], "prompt": prompt,
                        "chosen": conv[1]["value"].strip()})
        if limit and len(samples) >= limit:
            break
    return samples, {"kept": len(samples), **skipped}


def chosen_from_endpoint(samples: list[dict], endpoint, cache_path: str | os.PathLike,
                         batch_size: int = 64) -> tuple[list[dict], dict]:
    """Replace each sample's ``chosen`` by a VLM's answer from an OpenAI-compatible endpoint.

    ``endpoint``: a :class:`realign_lib.endpoint.ChatEndpoint` (e.g. vLLM serving a strong VLM);
    the sample's prompt goes with its image (``image_root`` / ``image``) as a data URL. Answers
    are appended to ``cache_path`` (``{"id", "chosen"}`` or ``{"id", "failed"}``) batch by batch, so a
    killed run resumes; samples whose request failed after the endpoint's retries, or whose
    answer is empty, are left out and counted. Returns ``(samples, counts)``.
    """
    from .endpoint import EndpointFailure, user_message

    cache_path = Path(cache_path)
    done = {r["id"]: r for r in iter_jsonl(cache_path)} if cache_path.exists() else {}
    todo = [s for s in samples if s["id"] not in done]
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        convs = [[user_message(s["prompt"], image=Path(s.get("image_root", ".")) / s["image"])] for s in chunk]
        rows = []
        for s, out in zip(chunk, endpoint.map(convs)):
            if isinstance(out, EndpointFailure):
                rows.append({"id": s["id"], "failed": out.detail[:300]})
            else:
                rows.append({"id": s["id"], "chosen": out.strip()})
        append_jsonl(cache_path, rows)
        done.update({r["id"]: r for r in rows})
    kept, counts = [], {"answered": 0, "failed": 0, "empty": 0}
    for s in samples:
        r = done[s["id"]]
        if "failed" in r:
            counts["failed"] += 1
        elif not r["chosen"]:
            counts["empty"] += 1
        else:
            counts["answered"] += 1
            kept.append(dict(s, chosen=r["chosen"]))
    return kept, counts
