"""Preference pairs as training batches (stage 04).

* :class:`PreferenceDataset` — ``preferences.jsonl`` records (paths relative to a root folder);
* :class:`PreferenceCollator` — one scoring batch of ``3B`` rows per batch of ``B`` pairs
  (``(v, y_w)``, ``(v, y_l)``, then ``(v_l, y_w)`` for rDPO or ``(crop(v), y_w)`` for mDPO; ``2B``
  rows for DPO), built with :func:`realign_lib.models.scoring.build_scoring_batch`, so the policy
  scores every sequence in one forward pass;
* :func:`random_crop` — mDPO's crop of the image.
"""
from __future__ import annotations

import math
import os
import random
import zlib
from pathlib import Path
from typing import Sequence

import torch

from realign_lib.files import read_jsonl, safe_join
from realign_lib.models.scoring import build_scoring_batch
from realign_lib.models.vlm import to_pil
from realign_lib.training.config import PreferenceConfig

__all__ = ["PreferenceDataset", "PreferenceCollator", "random_crop"]


# ------------------------------------------------------------------------------------------ data
class PreferenceDataset(torch.utils.data.Dataset):
    """``preferences.jsonl`` records ``{"id", "prompt", "images": [path], "retrieved_image", "chosen",
    "rejected", ...}``; image paths are relative to ``root`` (default: the file's folder).

    Each item is the record with absolute ``image`` / ``retrieved_image`` paths and, once
    :meth:`attach_reference` was called, the sample's reference log-probs under ``"ref"``.
    """

    def __init__(self, path_or_records: str | os.PathLike | Sequence[dict], root: str | os.PathLike | None = None,
                 need_retrieved: bool = True):
        if isinstance(path_or_records, (str, os.PathLike)):
            path = Path(path_or_records)
            records = read_jsonl(path)
            root = Path(root) if root is not None else path.parent
            where = str(path)
        else:
            records = [dict(r) for r in path_or_records]
            root = Path(root) if root is not None else Path(".")
            where = "records"
        self.root = root
        self.records: list[dict] = []
        self.skipped = {"chosen_equals_rejected": 0}  # pairs that teach nothing: counted, not trained on
        seen = set()
        for i, r in enumerate(records):
            for key in ("id", "prompt", "chosen", "rejected"):
                if key not in r:
                    raise ValueError(f"{where}: record {i} lacks {key!r}")
            images = r.get("images") or ([r["image"]] if r.get("image") else [])
            if len(images) != 1:
                raise ValueError(f"{where}: record {i} (id {r['id']}) needs exactly one image in 'images'")
            if need_retrieved and not r.get("retrieved_image"):
                raise ValueError(f"{where}: record {i} (id {r['id']}) lacks 'retrieved_image'")
            sid = str(r["id"])
            if sid in seen:
                raise ValueError(f"{where}: duplicate id {sid!r}")
            seen.add(sid)
            if str(r["chosen"]).strip() == str(r["rejected"]).strip():
                self.skipped["chosen_equals_rejected"] += 1
                continue
            at = f"{where}: record {i} (id {sid})"  # every image must stay inside root, links resolved
            item = dict(r, id=sid, image=str(safe_join(root, images[0], at)))
            if r.get("retrieved_image"):
                item["retrieved_image"] = str(safe_join(root, r["retrieved_image"], at))
            for key in ("image", "retrieved_image") if need_retrieved else ("image",):
                if key in item and not Path(item[key]).is_file():
                    raise FileNotFoundError(f"{where}: record {i} (id {sid}): image {item[key]} not found; image paths "
                                            f"are relative to {root} (pass root=, --root, or the run folder)")
            self.records.append(item)
        if not self.records:
            raise ValueError(f"{where}: no preference pairs (did stage 03 accept none? see its skipped.jsonl)"
                             + (f"; {self.skipped['chosen_equals_rejected']} had chosen equal to rejected"
                                if self.skipped["chosen_equals_rejected"] else ""))
        self.ref: dict[str, dict] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        return dict(r, ref=self.ref[r["id"]]) if r["id"] in self.ref else dict(r)

    def attach_reference(self, ref: dict[str, dict]) -> None:
        """Attach reference log-probs (``id → {kind: float}``) so the collator batches them."""
        missing = [r["id"] for r in self.records if r["id"] not in ref]
        if missing:
            raise ValueError(f"reference log-probs missing for {len(missing)} samples, e.g. {missing[:3]}")
        self.ref = {r["id"]: ref[r["id"]] for r in self.records}


def random_crop(image, seed: int, min_area: float = 0.01, max_area: float = 0.2):
    """mDPO's corrupted image: a random crop keeping ``min_area``–``max_area`` of the area (seeded)."""
    im = to_pil(image)
    rng = random.Random(seed)
    w, h = im.size
    area = rng.uniform(min_area, max_area) * w * h
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = max(1, min(w, round(math.sqrt(area * aspect))))
    ch = max(1, min(h, round(math.sqrt(area / aspect))))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return im.crop((x, y, x + cw, y + ch))


class PreferenceCollator:
    """Batch of ``B`` records → one scoring batch of ``3B`` rows (``2B`` for DPO).

    Rows ``[0, B)``: (v, y_w); ``[B, 2B)``: (v, y_l); ``[2B, 3B)``: (v_l, y_w) for rDPO, or a seeded
    random crop of v with y_w for mDPO. The output holds the processor's tensors plus
    ``response_mask`` (see :func:`realign_lib.models.scoring.build_scoring_batch`), ``ids`` and, when every
    item carries reference log-probs, ``ref_<kind>`` ``(B,)`` tensors.
    """

    def __init__(self, processor, cfg: PreferenceConfig, chat: bool = True):
        self.processor, self.cfg, self.chat = processor, cfg, chat

    def crop_seed(self, sample_id: str) -> int:
        return zlib.crc32(f"{self.cfg.seed}:{sample_id}".encode())

    def rows(self, items: Sequence[dict]) -> tuple[list, list, list]:
        """The (image, prompt, response) lists of the scoring batch, in row order."""
        images = [it["image"] for it in items] * 2
        prompts = [it["prompt"] for it in items] * 2
        responses = [it["chosen"] for it in items] + [it["rejected"] for it in items]
        kind = self.cfg.third_kind
        if kind == "retrieved":
            images += [it["retrieved_image"] for it in items]
        elif kind == "cropped":
            images += [random_crop(it["image"], self.crop_seed(it["id"]), self.cfg.crop_min_area,
                                   self.cfg.crop_max_area) for it in items]
        if kind is not None:
            prompts += [it["prompt"] for it in items]
            responses += [it["chosen"] for it in items]
        return images, prompts, responses

    def __call__(self, items: Sequence[dict]) -> dict:
        batch = build_scoring_batch(self.processor, *self.rows(items), chat=self.chat,
                                        max_length=self.cfg.model_max_length)
        batch["ids"] = [it["id"] for it in items]
        if items and all("ref" in it for it in items):
            for key in items[0]["ref"]:
                batch[f"ref_{key}"] = torch.tensor([float(it["ref"][key]) for it in items], dtype=torch.float32)
        return batch


