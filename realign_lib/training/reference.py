"""The frozen reference's log-probs (stage 4): computed once, cached by content, shared by processes.

* :func:`reference_logps_for_batch` — the reference's summed response log-probs for one scoring
  batch (``ref_model``, or the policy with its LoRA adapters disabled), in eval mode, no grad;
* :func:`reference_identity` — what the reference *is*: model path, hub revision or a fingerprint
  of its weights files, dtype and adapter state;
* :func:`pair_key` — one record's cache key: its content (prompt, chosen, rejected, the bytes of
  its images), the loss's settings and the reference identity. A changed model, weights file,
  dtype, text or image gives a new key, so a stale value is never reused, only recomputed;
* :func:`precompute_reference_logps` — every record's values, appended to a JSON-lines cache as
  they are computed (a killed run resumes). Under several processes (``accelerate launch``,
  DeepSpeed) each rank scores only its share of the missing records, on its own device; the
  shares are gathered and the main process writes them into the one cache.

Importing this module imports neither transformers nor peft.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from realign_lib.cache import cache_key, file_digest, model_identity, parameter_fingerprint, processor_identity
from realign_lib.files import append_jsonl, read_appended
from realign_lib.training.batches import PreferenceCollator, PreferenceDataset
from realign_lib.training.config import PreferenceConfig
from realign_lib.training.objective import reference_keys, score_pairs

__all__ = ["reference_logps_for_batch", "reference_identity", "pair_key",
           "precompute_reference_logps", "rank_and_world"]


class _Reference:
    """Context: the reference model — ``ref_model`` if given, else ``model`` with adapters disabled."""

    def __init__(self, model, ref_model=None):
        self.model, self.ref_model, self._ctx = model, ref_model, None

    def __enter__(self):
        if self.ref_model is not None:
            return self.ref_model
        if hasattr(self.model, "disable_adapter"):  # peft PeftModel
            self._ctx = self.model.disable_adapter()
            self._ctx.__enter__()
            return self.model
        raise ValueError("no reference: pass ref_model (a frozen copy) or a peft model whose adapters can be "
                         "disabled")

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        return False


@torch.no_grad()
def reference_logps_for_batch(model, batch: dict, cfg: PreferenceConfig, ref_model=None) -> dict[str, torch.Tensor]:
    """Reference log-probs (keys of :func:`realign_lib.training.objective.reference_keys`, each ``(B,)`` float32)
    for one scoring batch of ``B`` pairs, in eval mode."""
    with _Reference(model, ref_model) as ref:
        was_training = ref.training
        ref.eval()
        try:
            out = score_pairs(ref, batch, cfg)
        finally:
            ref.train(was_training)
    return {k: out[k].detach().float() for k in reference_keys(cfg)}


# -------------------------------------------------------------------------------------- identity


def reference_identity(model, ref_model=None) -> dict:
    """What the reference model is: ``{"path", "revision", "weights", "dtype", "adapter"}``.

    The reference is ``ref_model`` or ``model`` with its adapters disabled (then the adapter state
    is ``"disabled"``: the base function, whatever the adapter holds). The first four are
    :func:`realign_lib.cache.model_identity` of the base model (for a model built in
    memory, a fingerprint of its parameter values without the adapters). A ``ref_model`` with
    active peft adapters adds a fingerprint of them.
    """
    ref = ref_model if ref_model is not None else model
    peft = hasattr(ref, "disable_adapter") and hasattr(ref, "get_base_model")
    base = ref.get_base_model() if peft else ref
    disabled = ref_model is None
    identity = model_identity(base, skip_adapters=disabled or not peft)
    adapter = "disabled" if disabled else ("none" if not peft else "active:" + parameter_fingerprint(
        base, skip_adapters=False))
    return {**identity, "adapter": adapter}


def _cache_tag(cfg: PreferenceConfig) -> str:
    """What a reference value depends on in the settings (besides the model and the record)."""
    tag = cfg.loss
    if cfg.loss == "mdpo":  # the crops depend on the seed and the area range
        tag = f"mdpo:seed={cfg.seed}:area={cfg.crop_min_area}-{cfg.crop_max_area}"
    if cfg.model_max_length:  # truncated rows score fewer tokens
        tag += f":max_length={cfg.model_max_length}"
    return tag


class FileDigests(dict):
    """``path →`` :func:`realign_lib.cache.file_digest` of the file, each file read once."""

    def __missing__(self, path):
        self[path] = file_digest(path)
        return self[path]


def pair_key(record: dict, cfg: PreferenceConfig, identity: dict, digests: dict | None = None) -> str:
    """The cache key of one :class:`PreferenceDataset` item: a digest of its prompt, chosen and
    rejected texts, the bytes of its image (and retrieved image when the loss scores it), the
    loss's settings (:func:`_cache_tag`) and the reference ``identity``."""
    digests = digests if digests is not None else FileDigests()
    content = {"prompt": record["prompt"], "chosen": record["chosen"], "rejected": record["rejected"],
               "image": digests[str(record["image"])], "tag": _cache_tag(cfg), "reference": identity}
    if cfg.third_kind == "retrieved":
        content["retrieved"] = digests[str(record["retrieved_image"])]
    return cache_key(content, length=32)


# --------------------------------------------------------------------------------------- the pass
def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the torch.distributed group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _read_cache(paths, keys) -> dict[str, dict]:
    """``key → record`` from JSON-lines caches (a kill's torn last line is cut)."""
    out = {}
    for path in paths:
        for rec in read_appended(path):
            if "key" in rec and all(k in rec for k in keys):
                out[rec["key"]] = rec
    return out


def _score(model, items, collator, cfg, ref_model, batch_size, part, progress, rank=0) -> list[dict]:
    """Reference values of ``items`` (dataset items with ``"key"``), appended to ``part`` as computed;
    each record names the process that scored it (``"scored_by"``: its rank)."""
    from tqdm.auto import tqdm

    keys = reference_keys(cfg)
    done = []
    for s in tqdm(range(0, len(items), batch_size), desc="reference", disable=not progress, mininterval=5):
        chunk = items[s:s + batch_size]
        ref = reference_logps_for_batch(model, collator(chunk), cfg, ref_model)
        recs = [{"id": it["id"], "key": it["key"], "loss": cfg.loss, **{k: float(ref[k][i]) for k in keys},
                 "scored_by": rank}
                for i, it in enumerate(chunk)]
        if part is not None:
            append_jsonl(part, recs)
        done += recs
    return done


def precompute_reference_logps(model, dataset: PreferenceDataset, collator: PreferenceCollator,
                               cfg: PreferenceConfig, cache_path: str | os.PathLike | None = None,
                               ref_model=None, batch_size: int = 8, attach: bool = True,
                               progress: bool = False) -> dict[str, dict]:
    """Reference log-probs of every record, ``id → {kind: float}``, computed once.

    The reference is ``ref_model`` (a frozen copy) or ``model`` with its LoRA adapters disabled,
    on whatever device it is (place it first). With ``cache_path`` values are appended to that
    JSON-lines file (``{"id", "key", "loss", <kind>: float, "scored_by": rank}``) as they are
    computed and looked up by :func:`pair_key`, so an interrupted run resumes and a changed model, dtype, adapter state,
    text, image or loss setting is recomputed, never reused. Under torch.distributed every rank
    must call this: each scores ``missing[rank::world]`` (appending to ``<cache>.rank<r>`` while
    it works), the values are gathered to every rank, and rank 0 moves them into ``cache_path``.
    ``attach``: also :meth:`PreferenceDataset.attach_reference`.
    """
    import torch.distributed as dist

    keys = reference_keys(cfg)
    identity = dict(reference_identity(model, ref_model), processor=processor_identity(collator.processor))
    digests = FileDigests()
    items = [dict(r, key=pair_key(r, cfg, identity, digests)) for r in dataset.records]
    rank, world = rank_and_world()
    cache_path = Path(cache_path) if cache_path is not None else None
    parts = [] if cache_path is None or world == 1 else \
        [cache_path.with_name(f"{cache_path.name}.rank{r}") for r in range(world)]
    cache = _read_cache([cache_path] if cache_path else [], keys)
    earlier = {k: v for k, v in _read_cache(parts, keys).items() if k not in cache}  # a killed multi-process pass
    todo = [it for it in items if it["key"] not in cache and it["key"] not in earlier]
    if world > 1:
        dist.barrier()  # every rank has read the caches before any writes
    mine = todo[rank::world]
    part = parts[rank] if parts else cache_path
    try:
        done, failure = _score(model, mine, collator, cfg, ref_model, max(1, batch_size), part, progress, rank), None
    except Exception as err:  # noqa: BLE001 - every rank must hear of it, or the others wait in all_gather
        if world == 1:
            raise
        done, failure = [], f"rank {rank}: {type(err).__name__}: {err}"
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (done, failure))
        failures = [f for _, f in gathered if f]
        if failures:  # every rank stops with the same message instead of hanging until the collective times out
            raise RuntimeError("the reference pass failed on " + "; ".join(failures) + " (the scores made before "
                               "are kept: a rerun resumes)")
        done = list(earlier.values()) + [rec for recs, _ in gathered for rec in recs]
        if rank == 0 and cache_path is not None:
            append_jsonl(cache_path, done)
            for p in parts:
                p.unlink(missing_ok=True)
        dist.barrier()
    for rec in done:
        cache[rec["key"]] = rec
    result = {it["id"]: {k: float(cache[it["key"]][k]) for k in keys} for it in items}
    if attach:
        dataset.attach_reference(result)
    return result
