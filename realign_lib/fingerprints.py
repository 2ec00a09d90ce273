"""What a cached result depends on, as short digests: a model's identity, its weights, a file.

Caches (reference log-probs, image embeddings) put these in their keys, so another model, a
re-saved checkpoint, another dtype or a changed file recomputes instead of reusing a stale value.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["weights_fingerprint", "weights_sha256", "parameter_fingerprint", "model_identity", "file_stamp",
           "file_sha256"]

_EDGE = 1 << 20  # bytes read from each end of a weights file


def weights_fingerprint(folder: str | os.PathLike) -> str | None:
    """A digest of the ``*.safetensors`` files in ``folder``: each file's name, size, safetensors
    header (tensor names, dtypes, shapes, offsets) and its first and last MiB of data. Reads a few
    MiB per file, not the whole checkpoint; None when the folder has no safetensors file."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}:".encode())
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(head + fh.read(min(n, size)))
            h.update(fh.read(_EDGE))
            fh.seek(max(0, size - _EDGE))
            h.update(fh.read(_EDGE))
    return h.hexdigest()[:16]


def weights_sha256(folder: str | os.PathLike, full_below: int = 256 * 2**20) -> str:
    """A digest of every byte of the ``*.safetensors`` files in ``folder`` below ``full_below`` bytes
    (a LoRA adapter: read whole), and of the name, size and mtime of bigger ones; 16 hex digits.

    Stage 05 keys its evaluations with it. Unlike :func:`weights_fingerprint` (header and first /
    last MiB), two adapters that differ in any byte always get different digests; a full model's
    multi-GiB shards are not read at all. A folder without safetensors files gives the digest of
    nothing (``e3b0c44298fc1c14``).
    """
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}".encode())
        h.update(f.read_bytes() if st.st_size < full_below else str(st.st_mtime_ns).encode())
    return h.hexdigest()[:16]


def file_sha256(path: str | os.PathLike) -> str:
    """The first 16 hex digits of the sha256 of a file's bytes (a question file, a config)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


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
    """``{"path", "revision", "weights", "dtype"}`` of a loaded model: the folder or hub id it was
    loaded from, its hub commit (when loaded from the hub), :func:`weights_fingerprint` of the
    folder, and the dtype of its first floating-point parameter. A model built in memory (no
    folder, no revision) gets :func:`parameter_fingerprint` as ``weights``."""
    cfg = getattr(model, "config", None)
    path = str(getattr(cfg, "_name_or_path", "") or "")
    revision = getattr(cfg, "_commit_hash", None)
    weights = weights_fingerprint(path) if path and Path(path).is_dir() else None
    if weights is None and revision is None:
        weights = parameter_fingerprint(model, skip_adapters=skip_adapters)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return {"path": path, "revision": revision, "weights": weights,
            "dtype": str(param.dtype) if param is not None else None}


def file_stamp(path: str | os.PathLike) -> str:
    """``path:size:mtime_ns`` — changes when the file is rewritten (cheap: no read)."""
    st = os.stat(path)
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"
