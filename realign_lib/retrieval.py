"""Stage 1: nearest *other* images by cosine similarity, with FAISS.

Embeddings are L2-normalised, so inner product = cosine. Three index kinds:

* ``flat``  — exact search (``IndexFlatIP``), the default;
* ``ivf``   — inverted lists over k-means cells (``IndexIVFFlat``), for collections where flat
  search no longer fits the time budget; ``nprobe`` trades recall for speed;
* ``hnsw``  — a navigable small-world graph (``IndexHNSWFlat``), no training needed.

:func:`nearest_others` drops the query itself and exact duplicates (cosine ≥ ``dup_threshold``),
so a retrieved image is never the original or a copy of it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["normalise", "build_index", "nearest_others", "save_index", "load_index", "embed_images_resumable", "embedding_cache_key"]


def normalise(emb: np.ndarray) -> np.ndarray:
    """``(N, D)`` → float32 rows of unit L2 norm (zero rows stay zero)."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (N, D), got shape {emb.shape}")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.clip(norms, 1e-12, None)


def build_index(emb: np.ndarray, kind: str = "flat", nlist: int | None = None, nprobe: int = 16,
                hnsw_m: int = 32, ef_search: int = 128, seed: int = 0, train_size: int | None = None):
    """A FAISS inner-product index over ``emb`` ``(N, D)`` (normalised first).

    ``ivf``: ``nlist`` lists (default 4·√N), k-means trained on a seeded sample of ``train_size``
    vectors (default 64·nlist, FAISS's own rule of thumb is 30-256 per list), searched with
    ``nprobe`` lists. ``hnsw``: ``hnsw_m`` links per node, ``ef_search`` at query time.
    """
    import faiss

    x = normalise(emb)
    n, d = x.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = nlist or max(1, int(4 * np.sqrt(n)))
        if n < nlist:
            raise ValueError(f"IVF index needs at least nlist={nlist} vectors to train, got {n}; use kind='flat'")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        m = min(n, train_size or 64 * nlist)
        index.train(x if m == n else x[np.random.default_rng(seed).choice(n, m, replace=False)])
        index.nprobe = min(nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    else:
        raise ValueError(f"unknown index kind {kind!r}: use 'flat', 'ivf' or 'hnsw'")
    index.add(x)
    return index


def nearest_others(index, emb: np.ndarray, k: int, dup_threshold: float = 0.9999,
                   batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray, int]:
    """Top-``k`` neighbours of every row of ``emb`` other than itself and its exact duplicates.

    Returns ``(neighbours (N, k) int64, scores (N, k) float32, n_duplicates_dropped)``; a row
    with fewer than ``k`` valid neighbours is padded with ``-1`` / ``-inf``. Row ``i`` of ``emb``
    must be vector ``i`` of ``index``.
    """
    x = normalise(emb)
    n = x.shape[0]
    if k < 1:
        raise ValueError("k must be at least 1")
    extra = 8
    nbrs = np.full((n, k), -1, dtype=np.int64)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    dropped_dups = 0
    for s in range(0, n, batch_size):
        q = x[s:s + batch_size]
        want = min(k + extra, n)
        while True:
            D, I = index.search(q, want)
            keeps, dups = [], 0
            for r in range(q.shape[0]):
                others = [(j, sc) for j, sc in zip(I[r], D[r]) if j >= 0 and j != s + r]
                keeps.append([(j, sc) for j, sc in others if sc < dup_threshold])
                dups += len(others) - len(keeps[-1])
            if want >= n or all(len(kp) >= k for kp in keeps):
                break
            want = min(n, want * 2)  # many duplicates: search deeper for this batch
        dropped_dups += dups
        for r, kp in enumerate(keeps):
            for c, (j, sc) in enumerate(kp[:k]):
                nbrs[s + r, c], scores[s + r, c] = j, sc
    return nbrs, scores, dropped_dups


def save_index(index, path: str | os.PathLike) -> Path:
    """Write a FAISS index atomically."""
    import faiss

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)
    return path


def load_index(path: str | os.PathLike):
    import faiss

    if not Path(path).is_file():
        raise FileNotFoundError(f"FAISS index {path} not found; run stage 01 first")
    return faiss.read_index(str(path))


def embedding_cache_key(model, images: Sequence[str | os.PathLike]) -> str:
    """What cached embeddings depend on: the model (:func:`realign_lib.cache.model_identity`:
    its name or folder, revision, weights, dtype) and every image (path, size, modification time)."""
    from realign_lib.cache import cache_key, file_stamp, model_identity

    return cache_key(model_identity(model), [file_stamp(img) for img in images])


def embed_images_resumable(model, processor, images: Sequence, out_dir: str | os.PathLike, chunk: int = 1024,
                           batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """``(N, D)`` normalised image embeddings, computed chunk by chunk into ``out_dir/<key>/part_*.npy``.

    Each finished chunk is saved atomically, so a killed run recomputes at most one chunk; the
    parts are concatenated at the end. ``images``: paths. The folder ``<key>`` is
    :func:`embedding_cache_key` of the model and the images, so another model, a re-saved
    checkpoint or a changed image never reuses stale parts.
    """
    from tqdm.auto import tqdm

    from realign_lib.models.vlm import image_embeddings

    if not all(isinstance(i, (str, os.PathLike)) for i in images):
        raise TypeError("embed_images_resumable needs image paths (chunks are keyed by them)")
    out = Path(out_dir) / embedding_cache_key(model, images)
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    starts = range(0, len(images), chunk)
    for s in tqdm(starts, desc="embed chunks", disable=not progress, mininterval=5):
        p = out / f"part_{s // chunk:05d}_{min(len(images), s + chunk) - s}.npy"
        if not p.exists():
            emb = image_embeddings(model, processor, images[s:s + chunk], batch_size=batch_size)
            tmp = p.with_name("." + p.name + ".tmp.npy")
            np.save(tmp, emb)
            os.replace(tmp, p)
        parts.append(np.load(p))
    return normalise(np.concatenate(parts)) if parts else np.zeros((0, 0), np.float32)
