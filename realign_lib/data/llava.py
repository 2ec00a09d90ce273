"""Training samples in the kit's one shape, from the LLaVA-Instruct-150K layout.

A *sample* is ``{"id", "image", "prompt", "chosen"}``: the image file (relative to an image root),
the user's question without the ``<image>`` tag, and the reference answer (the chosen response).
``samples_from_llava`` reads LLaVA-Instruct-150K (``[{"id", "image", "conversations": [...]}]``)
and keeps the first human/gpt exchange of one record per image (as the paper samples images),
opening only the images it takes, so the tiny world's file and the real one (with a COCO
train2017 folder) give the same kind of samples.
:func:`load_samples` reads the resulting ``samples.jsonl`` back with every record checked.
"""
from __future__ import annotations

import os
from pathlib import Path

from realign_lib.files import append_jsonl, iter_jsonl, read_appended, read_json, safe_join

__all__ = ["SAMPLE_KEYS", "SKIP_REASONS", "image_problem", "samples_from_llava", "load_samples", "chosen_from_endpoint",
           "llava_records"]


SAMPLE_KEYS = ("id", "image", "prompt", "chosen")
SKIP_REASONS = {
    "not_a_record": "the entry is not a JSON object with a non-empty 'image' name (text-only conversations have none)",
    "bad_id": "the record's 'id' is null or not text or a number",
    "no_exchange": "no first human question followed by a gpt answer",
    "not_text": "the question or answer 'value' is not text (an object or a list)",
    "empty_prompt": "the first human question is empty (no more than the <image> tag)",
    "empty_chosen": "the first gpt answer is empty",
    "filtered": "the first question does not contain prompt_contains",
    "unsafe_path": "the image path leads outside the image folder ('../', absolute path)",
    "missing_image": "the image file is not in the image folder",
    "corrupt_image": "the image file cannot be decoded",
    "huge_image": "the image has more pixels than Pillow's decompression-bomb limit (a damaged or hostile file)",
}


def image_problem(path: Path) -> str | None:
    """``None`` for a readable image file, else ``"missing_image"``, ``"corrupt_image"`` (checked by
    decoding it fully: a truncated JPEG passes ``Image.verify`` but fails here) or ``"huge_image"``
    (over Pillow's decompression-bomb limit: refused before it is decoded)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return "missing_image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: skip, not decode
            with Image.open(path) as im:
                im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "huge_image"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return "corrupt_image"
    return None


def _parse_record(i: int, rec, prompt_contains: str | None) -> tuple[dict | None, str | None]:
    """One LLaVA record → ``(sample without image check, None)`` or ``(None, skip reason)``."""
    if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not rec["image"].strip():
        return None, "not_a_record"
    rid = rec.get("id", i)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or not str(rid).strip():
        return None, "bad_id"
    conv = rec.get("conversations") or []
    if (not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(c, dict) for c in conv[:2])
            or conv[0].get("from") != "human" or conv[1].get("from") != "gpt"):
        return None, "no_exchange"
    question, answer = conv[0].get("value", ""), conv[1].get("value", "")
    if not isinstance(question, str) or not isinstance(answer, str):
        return None, "not_text"
    if not answer.strip():
        return None, "empty_chosen"
    prompt = question.replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "").strip()
    if not prompt:
        return None, "empty_prompt"
    if prompt_contains and prompt_contains not in prompt:
        return None, "filtered"
    return {"id": str(rid), "image": rec["image"], "prompt": prompt, "chosen": answer.strip()}, None


def samples_from_llava(json_path: str | os.PathLike, image_root: str | os.PathLike, limit: int | None = None,
                       prompt_contains: str | None = None, check_images: bool = True, records_per_image: int = 1,
                       shuffle_seed: int | None = None) -> tuple[list[dict], dict]:
    """Samples from a LLaVA-Instruct JSON file, plus counts of what was kept and skipped (and why).

    LLaVA-Instruct-150K has about 158k records over about 80k images, and a record's id is its
    image stem. The paper samples *images*: by default one record per image is kept (the first
    in the file); ``records_per_image`` > 1 keeps up to that many, the second and later under the
    ids ``<id>_1``, ``<id>_2``…, so every sample id is unique. Images are then taken in file order,
    or in a seeded random order (``shuffle_seed``), and ONLY the images taken are opened, until
    ``limit`` samples are kept — the whole file is never decoded.

    ``prompt_contains`` keeps only records whose first question contains that text (for example
    ``"Describe"`` for detailed descriptions). A record is skipped, and counted under its reason
    (:data:`SKIP_REASONS`), when it is not a record with an image, has no question/answer exchange
    or an empty answer, or when its image path leaves the image folder, is missing or
    (``check_images``) cannot be decoded. The counts include ``records`` (in the file), ``images``
    (distinct image paths among usable records), ``duplicate_records`` (usable records beyond
    ``records_per_image`` on one image, left out), ``images_opened`` and ``examples``: the first
    few skipped records' positions and ids per reason, to look them up.
    """
    import random

    if not Path(image_root).is_dir():
        raise FileNotFoundError(f"image folder {image_root} not found (for LLaVA-Instruct-150K: COCO train2017)")
    if records_per_image < 1:
        raise ValueError(f"records_per_image={records_per_image}: must be at least 1")
    data = read_json(json_path)
    if not isinstance(data, list):
        raise ValueError(f"{json_path}: expected a JSON list of LLaVA-Instruct records")
    root = Path(image_root)
    skipped = {k: 0 for k in SKIP_REASONS}
    examples: dict[str, list[str]] = {}

    def skip(reason: str, i: int, rec) -> None:
        skipped[reason] += 1
        if len(examples.setdefault(reason, [])) < 3:
            rid = rec.get("id") if isinstance(rec, dict) else None
            examples[reason].append(f"record {i}" + (f" (id {rid})" if rid is not None else ""))

    by_image: dict[str, list[tuple[int, dict]]] = {}
    duplicates = 0
    for i, rec in enumerate(data):
        sample, reason = _parse_record(i, rec, prompt_contains)
        if reason:
            skip(reason, i, rec)
            continue
        group = by_image.setdefault(sample["image"], [])
        if len(group) >= records_per_image:
            duplicates += 1
            continue
        if group:
            sample["id"] = f"{sample['id']}_{len(group)}"
        group.append((i, sample))
    images = list(by_image)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(images)
    samples, opened = [], 0
    for image in images:
        i, first = by_image[image][0]
        try:
            path = safe_join(root, image)
        except ValueError:
            for j, smp in by_image[image]:
                skip("unsafe_path", j, smp)
            continue
        opened += 1
        problem = image_problem(path) if check_images else (None if path.is_file() else "missing_image")
        if problem:
            for j, smp in by_image[image]:
                skip(problem, j, smp)
            continue
        samples += [smp for _, smp in by_image[image]]
        if limit and len(samples) >= limit:
            samples = samples[:limit]
            break
    counts = {"kept": len(samples), "records": len(data), "images": len(images), "duplicate_records": duplicates,
              "images_opened": opened, **skipped, "examples": examples}
    return samples, counts


def llava_records(samples: list[dict]) -> list[dict]:
    """Samples back in the LLaVA-Instruct-150K layout: one record per sample, ``{"id", "image",
    "conversations": [{"from": "human", "value": "<image>\\n" + prompt}, {"from": "gpt", "value":
    chosen}]}``; :func:`samples_from_llava` reads such a file back into the same questions and answers
    (with ``records_per_image`` at least the most samples an image has; it renames the second and later
    record of an image ``<id>_1``, ``<id>_2`` …)."""
    return [{"id": str(s["id"]), "image": s["image"],
             "conversations": [{"from": "human", "value": "<image>\n" + s["prompt"]},
                               {"from": "gpt", "value": s["chosen"]}]} for s in samples]


def load_samples(path: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> list[dict]:
    """Read ``samples.jsonl`` (stage 00's hand-over), checking every record.

    Each line needs ``id``, ``image``, ``prompt`` and ``chosen`` (strings; ``chosen`` may be empty:
    stage 02 counts it as a skipped sample) and ``image_root``; ids must be unique and image paths
    must stay inside the image root, links resolved. A relative ``image_root`` is relative to the run
    folder ``run_dir`` (default: the folder above ``data/samples.jsonl``'s, where stage 00 writes it).
    Errors name the file and line and say what to fix.
    """
    path = Path(path)
    run_dir = Path(run_dir) if run_dir is not None else path.resolve().parent.parent
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run stage 00 (00_tiny_world or 00_real_data) first")
    out, seen = [], {}
    for lineno, rec in enumerate(iter_jsonl(path), 1):
        where = f"{path}: record {lineno}"
        missing = [k for k in SAMPLE_KEYS + ("image_root",) if k not in rec]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}; each sample needs id, image, image_root, prompt "
                             f"and chosen (see realign_lib/data/llava.py)")
        bad = [k for k in SAMPLE_KEYS + ("image_root",) if not isinstance(rec[k], (str, int) if k == "id" else str)]
        if bad:
            raise ValueError(f"{where}: {', '.join(f'{k}={rec[k]!r}' for k in bad)} must be text")
        sid = str(rec["id"])
        if sid in seen:
            raise ValueError(f"{where}: duplicate id {sid!r} (first at record {seen[sid]}); stages join on id, so "
                             f"ids must be unique")
        seen[sid] = lineno
        safe_join(run_dir / rec["image_root"], rec["image"], f"{where} (id {sid})")  # an absolute root stays
        out.append(dict(rec, id=sid))
    if not out:
        raise ValueError(f"{path}: no samples")
    return out


def chosen_from_endpoint(samples: list[dict], endpoint, cache_path: str | os.PathLike,
                         batch_size: int = 64) -> tuple[list[dict], dict]:
    """Replace each sample's ``chosen`` by a VLM's answer from an OpenAI-compatible endpoint.

    ``endpoint``: a :class:`realign_lib.models.endpoint.ChatEndpoint` (e.g. vLLM serving a strong VLM);
    the sample's prompt goes with its image (``image_root`` / ``image``) as a data URL. Answers
    are appended to ``cache_path`` (``{"id", "chosen"}`` or ``{"id", "failed"}``) batch by batch, so a
    killed run resumes; samples whose request failed after the endpoint's retries, or whose
    answer is empty, are left out and counted. Returns ``(samples, counts)``.
    """
    from realign_lib.models.endpoint import EndpointFailure, user_message

    cache_path = Path(cache_path)
    done = {r["id"]: r for r in read_appended(cache_path)}  # a kill's half-written last line is cut
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
