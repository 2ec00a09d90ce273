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

from .io import read_json

__all__ = ["samples_from_llava"]


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
