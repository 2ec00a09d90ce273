"""What a cached result depends on, in one place: one model identity and one cache key for every
cache of the kit (image embeddings, masking comparisons, induction results, the reference's
log-probs, evaluation answers).

* :func:`model_identity` — a model's path or hub id, hub revision, a digest of its weights
  (:func:`weights_digest`) and dtype; for a model built in memory, a digest of its parameters;
* :func:`cache_key` / :func:`digest` — a short sha256 of any JSON-able parts (canonical JSON, keys
  sorted), so two caches never assemble keys two ways;
* :func:`file_digest` (a file's bytes) and :func:`file_stamp` (path, size, mtime: no read).

Another model, a re-saved checkpoint, another dtype or a changed input file gives another key, and
the cache recomputes instead of reusing a stale value. Nothing heavy is imported here.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["digest", "cache_key", "file_digest", "file_stamp", "weights_digest", "parameter_fingerprint",
           "model_identity", "processor_identity"]

_WHOLE_BELOW = 256 * 2**20  # weights files smaller than this are read whole (a LoRA adapter, the tiny VLM)
_EDGE = 1 << 20  # bytes read from each end of a bigger one


def digest(content: Any, length: int = 16) -> str:
    """The first ``length`` hex digits of the sha256 of ``content``: bytes as they are, text as UTF-8,
    anything else as canonical JSON (keys sorted, no spaces)."""
    if isinstance(content, bytes):
        data = content
    elif isinstance(content, str):
        data = content.encode()
    else:
        data = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(data).hexdigest()[:length]


def cache_key(*parts: Any, length: int = 16) -> str:
    """The key of a cached result from everything it depends on (a model identity, settings, input
    digests …), in order: :func:`digest` of the list of parts."""
    return digest(list(parts), length)


def file_digest(path: str | os.PathLike, length: int = 16) -> str:
    """:func:`digest` of a file's bytes (a question file, an input of a stage, a marker)."""
    return digest(Path(path).read_bytes(), length)


def file_stamp(path: str | os.PathLike) -> str:
    """``path:size:mtime_ns`` — changes when the file is rewritten (cheap: no read)."""
    st = os.stat(path)
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def weights_digest(folder: str | os.PathLike) -> str | None:
    """A digest of the ``*.safetensors`` files in ``folder``: each file's name and size and, for a file
    under 256 MiB (a LoRA adapter, a small model), every byte; for a bigger one (a 7B shard), its
    safetensors header (tensor names, dtypes, shapes, offsets) and its first and last MiB — a few MiB
    read per shard, not the checkpoint. Copying a checkpoint keeps its digest; None when the folder
    has no safetensors file."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}:".encode())
        with open(f, "rb") as fh:
            if size < _WHOLE_BELOW:
                h.update(fh.read())
                continue
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(head + fh.read(min(n, size)))
            h.update(fh.read(_EDGE))
            fh.seek(max(0, size - _EDGE))
            h.update(fh.read(_EDGE))
    return h.hexdigest()[:16]


def parameter_fingerprint(model, skip_adapters: bool) -> str:
    """Digest of every parameter's name, shape, dtype, sum and sum of squares (no file to read);
    ``skip_adapters`` leaves out LoRA weights and peft's ``modules_to_save`` copies."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if skip_adapters and ("lora_" in name or "modules_to_save" in name):
            continue
        x = p.detach().double()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{float(x.sum()):.10e}:{float(x.square().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def model_identity(model, skip_adapters: bool = True) -> dict:
    """``{"path", "revision", "weights", "dtype"}``: the one identity every cache keys a model by.

    ``model``: a loaded model — the folder or hub id it was loaded from, its hub commit (when loaded
    from the hub), :func:`weights_digest` of the folder and the dtype of its first floating-point
    parameter; a model built in memory (no folder, no revision) gets :func:`parameter_fingerprint` as
    ``weights``. Or a model folder (``str`` / path) that is not loaded: its path and
    :func:`weights_digest` (dtype None: the folder's dtype is the one it loads in)."""
    if isinstance(model, (str, os.PathLike)):
        path = str(model)
        return {"path": path, "revision": None,
                "weights": weights_digest(path) if Path(path).is_dir() else None, "dtype": None}
    cfg = getattr(model, "config", None)
    path = str(getattr(cfg, "_name_or_path", "") or "")
    revision = getattr(cfg, "_commit_hash", None)
    weights = weights_digest(path) if path and Path(path).is_dir() else None
    if weights is None and revision is None:
        weights = parameter_fingerprint(model, skip_adapters=skip_adapters)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return {"path": path, "revision": revision, "weights": weights,
            "dtype": str(param.dtype) if param is not None else None}


def processor_identity(processor) -> str:
    """A digest of what a processor does to a text and an image: its saved settings (image size, tiling,
    normalisation, patch size, special tokens …), its chat template and its tokenizer's vocabulary size."""
    tok = getattr(processor, "tokenizer", processor)
    try:
        settings = processor.to_json_string()
    except (AttributeError, TypeError, ValueError):  # a bare tokenizer, or settings that do not serialise
        settings = repr(getattr(processor, "init_kwargs", ""))
    return digest([type(processor).__name__, settings, getattr(processor, "chat_template", None)
                   or getattr(tok, "chat_template", None), len(tok) if hasattr(tok, "__len__") else None])
