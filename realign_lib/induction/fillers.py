"""Stage 3 fill backends: a VLM fills the ``[MASK]`` segments of a masked response under an image.

Two ways to fill the masks (:class:`MaskFiller`):

* ``"instruction"`` — the paper's way: the completion prompt
  (:data:`~realign_lib.prompts.COMPLETION_PROMPT`) and the masked sentence go to the VLM as one
  user turn with the retrieved image, and its reply is the candidate. **Default for real chat
  VLMs** (LLaVA-1.5/1.6, Qwen2-VL, …), which follow such an instruction. :class:`EndpointFiller`
  does the same with a VLM behind an OpenAI-compatible endpoint.
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

Each filler is a callable ``filler(images, prompts, masked) -> list[str]``, the ``fill`` argument
of the τ loop :func:`realign_lib.induction.loop.induce`. torch and the VLM code load when a fill runs,
not at import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from realign_lib.induction.texts import join_filled, split_masked
from realign_lib.prompts import COMPLETION_PROMPT, MASK

__all__ = ["FILL_MODES", "MaskFiller", "EndpointFiller", "new_token_budget", "instruction_fill", "slot_fill"]

FILL_MODES = ("slot", "instruction")  # slot: the tiny VLM's default; instruction: real chat VLMs'


def tokenizer_of(processor):
    """The tokenizer inside a processor (:func:`realign_lib.models.vlm.tokenizer_of`, imported when called:
    importing this module loads no torch)."""
    from realign_lib.models.vlm import tokenizer_of as inner

    return inner(processor)


def _segment_ids(tok, text: str) -> list[int]:
    """Token ids of a scaffold segment (leading whitespace kept as one space, trailing dropped)."""
    text = (" " if text[:1].isspace() else "") + text.strip()
    return tok(text, add_special_tokens=False)["input_ids"] if text.strip() else []


def _banned_ids(model, processor) -> list[int]:
    tok = tokenizer_of(processor)
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


def new_token_budget(tok, masked: Sequence[str], cap: int = 0, ratio: float = 1.5, margin: int = 32) -> int:
    """``max_new_tokens`` for filling ``masked``: ``ratio`` × the longest masked text's tokens +
    ``margin`` (a filled text is about as long as its masked text; a fixed 256 cut long answers
    short, and a cut candidate is "dissimilar" because it is short), at most ``cap`` (0: no cap)."""
    longest = max((len(tok(m, add_special_tokens=False)["input_ids"]) for m in masked), default=0)
    budget = int(longest * ratio) + margin
    return min(budget, cap) if cap else budget


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
    Instruction mode generates at most :func:`new_token_budget` tokens, from the masked texts'
    length (``max_new_tokens`` > 0 caps it).
    """

    model: Any
    processor: Any
    mode: str = "slot"
    max_span_tokens: int = 6
    stop_margin: float = 5.0
    max_new_tokens: int = 0
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
    fails after the endpoint's retries gives ``""``: :func:`~realign_lib.induction.loop.induce` then
    does not accept that candidate (its similarity is recorded as null) and tries the next rank;
    the failures are counted in ``endpoint.stats["failed"]``.
    """

    def __init__(self, endpoint, completion_prompt: str = COMPLETION_PROMPT):
        self.endpoint, self.completion_prompt = endpoint, completion_prompt
        self.mode = "instruction"

    @property
    def max_new_tokens(self) -> int | None:
        """The reply length limit, the endpoint's ``max_tokens`` (recorded in the run's settings)."""
        return self.endpoint.max_tokens

    def __call__(self, images: Sequence, prompts: Sequence[str], masked: Sequence[str]) -> list[str]:
        from realign_lib.models.endpoint import EndpointFailure, user_message

        if not (len(images) == len(prompts) == len(masked)):
            raise ValueError(f"lengths differ: {len(images)} images, {len(prompts)} prompts, {len(masked)} masked")
        convs = [[user_message(f"{self.completion_prompt}\n{m}", image=img)] for img, m in zip(images, masked)]
        out = self.endpoint.map(convs)
        return ["" if isinstance(o, EndpointFailure) else o.strip().strip('"').strip() for o in out]


def instruction_fill(model, processor, images: Sequence, masked: Sequence[str], max_new_tokens: int = 0,
                     batch_size: int = 16, completion_prompt: str = COMPLETION_PROMPT) -> list[str]:
    """The paper's completion: ``"<completion prompt>\\n<masked sentence>"`` with the image; the reply.
    At most :func:`new_token_budget` new tokens (from the masked texts' length; ``max_new_tokens``
    > 0 caps it)."""
    from realign_lib.models.vlm import generate

    questions = [f"{completion_prompt}\n{m}" for m in masked]
    budget = new_token_budget(tokenizer_of(processor), masked, cap=max_new_tokens)
    replies = generate(model, processor, list(images), questions, max_new_tokens=budget,
                       batch_size=batch_size)
    return [r.strip().strip('"').strip() for r in replies]


def _accepts(model, name: str) -> bool:
    import inspect
    return name in inspect.signature(model.forward).parameters


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values



def _slot_programs(processor, prompts: Sequence[str], masked: Sequence[str], max_span_tokens: int):
    """Per sample: its scaffold split, its :class:`_SlotState` and its prefill text (chat prompt +
    the first scaffold segment)."""
    from realign_lib.models.vlm import chat_prompt

    tok = tokenizer_of(processor)
    splits = [split_masked(m) for m in masked]
    states, texts = [], []
    for (segments, slots), prompt in zip(splits, prompts):
        head = chat_prompt(processor, prompt)
        first = segments[0].strip()
        texts.append(head + (" " + first if first else ""))
        states.append(_SlotState([max_span_tokens * n for n in slots], [_segment_ids(tok, s) for s in segments[1:]]))
    return splits, states, texts


def _slot_choices(logits, rows: list[int], states: list[_SlotState], banned, eos: int | None,
                  stop_margin: float) -> list[int]:
    """The greedy choice of each batch row at one step (bans and the stop-token tolerance applied)."""
    import torch

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
    return best_t.tolist()


def slot_fill(model, processor, images: Sequence, prompts: Sequence[str], masked: Sequence[str],
              max_span_tokens: int = 6, stop_margin: float = 5.0, return_spans: bool = False) -> list:
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

    from realign_lib.models.vlm import model_inputs, to_device

    if not (len(images) == len(prompts) == len(masked)):
        raise ValueError(f"lengths differ: {len(images)} images, {len(prompts)} prompts, {len(masked)} masked")
    if not len(images):
        return []
    tok = tokenizer_of(processor)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    splits, states, texts = _slot_programs(processor, prompts, masked, max_span_tokens)
    banned = torch.tensor(_banned_ids(model, processor), dtype=torch.long)
    use_pos = _accepts(model, "position_ids")
    cache_kw = "cache" if _accepts(model, "cache") else "past_key_values"  # renamed in transformers 5.2x
    keep_kw = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    with torch.no_grad():
        batch = to_device(model_inputs(processor, list(images), texts, "left"), model)
        attn = batch["attention_mask"]
        if use_pos:
            pos = (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 0)
            batch["position_ids"] = pos
        out = model(**batch, use_cache=True, **keep_kw)
        cache, logits = _cache_of(out), out.logits[:, -1]
        last_pos = pos[:, -1] if use_pos else None
        rows = list(range(len(states)))                   # batch row → sample index
        while True:
            best = _slot_choices(logits, rows, states, banned, eos, stop_margin)
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
