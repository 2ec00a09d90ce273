"""The summed log-probability of a response under any image-text-to-text model.

* :func:`build_scoring_batch` + :func:`sequence_logprobs` — the summed log-probability of a given
  response, over the response tokens only (prompt and image tokens masked); differentiable, so
  the trainer uses the same two functions; :func:`response_logprobs` is the batched no-grad form;
* :func:`truncate_batch` — a scoring batch cut to ``max_length`` tokens, refusing to cut a response.
"""
from __future__ import annotations

from typing import Sequence

import torch

from realign_lib.models.vlm import ImageLike, chat_prompt, model_inputs, to_device, tokenizer_of

__all__ = ["build_scoring_batch", "truncate_batch", "sequence_logprobs", "forward_logprobs", "response_logprobs"]


def _text_token_counts(tok, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of ``texts`` as the processor's tokenizer call makes them, before any image token
    is expanded (the same special tokens, no padding)."""
    return tok(list(texts), padding=False)["input_ids"]


def build_scoring_batch(processor, images: Sequence[ImageLike], prompts: Sequence[str], responses: Sequence[str],
                        add_eos: bool = True, chat: bool = True, max_length: int = 0) -> dict:
    """Tensors to score ``responses`` given (image, prompt): the processor's inputs plus ``response_mask``.

    The full text is the chat prompt followed by the response (and the tokenizer's EOS if
    ``add_eos``), right-padded; each image is preprocessed once. ``response_mask`` ``(B, L)`` is 1
    on the response's tokens and 0 on padding, prompt and image tokens: a row's response is its
    last ``n`` real tokens, ``n`` counted on the text alone (image placeholders only ever expand
    inside the prompt). Raises if a prompt's tokens are not a prefix of its full text.
    ``max_length`` > 0 cuts every row to that many tokens (image tokens included) from the end
    (:func:`truncate_batch`).
    """
    if not (len(images) == len(prompts) == len(responses)):
        raise ValueError(f"lengths differ: {len(images)} images, {len(prompts)} prompts, {len(responses)} responses")
    for i, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            raise ValueError(f"response {i} is empty; every sample needs a non-empty response to score")
    tok = tokenizer_of(processor)
    texts = [chat_prompt(processor, p) if chat else p for p in prompts]
    eos = tok.eos_token if add_eos and tok.eos_token else ""
    full = [t + ("" if t.endswith((" ", "\n")) else " ") + r.strip() + eos for t, r in zip(texts, responses)]
    enc = model_inputs(processor, images, full, "right")
    ids_p, ids_f = _text_token_counts(tok, texts), _text_token_counts(tok, full)
    mask = enc["attention_mask"]
    response_mask = torch.zeros_like(mask)
    for row in range(mask.shape[0]):
        p, f = ids_p[row], ids_f[row]
        if f[:len(p)] != p:
            raise ValueError(f"sample {row}: the prompt's tokens are not a prefix of prompt+response; "
                             f"the tokenizer merges across the boundary (prompt ends {texts[row][-20:]!r})")
        n, length = len(f) - len(p), int(mask[row].sum())
        response_mask[row, length - n:length] = 1
    if int(response_mask.sum(1).min()) == 0:
        raise ValueError("a response has no tokens after the prompt; check the chat template")
    out = dict(enc)
    out["response_mask"] = response_mask
    return truncate_batch(out, max_length) if max_length else out


_SEQUENCE_KEYS = ("input_ids", "attention_mask", "response_mask", "token_type_ids", "mm_token_type_ids",
                  "position_ids")


def truncate_batch(batch: dict, max_length: int) -> dict:
    """A right-padded scoring batch with every row cut to ``max_length`` tokens (columns past it
    dropped from the ``(B, L)`` sequence tensors), as LLaVA's ``model_max_length`` cuts the
    sequence after the image tokens are inserted. Raises if a row would lose all of its response
    (the prompt and image tokens are never cut)."""
    length = batch["input_ids"].shape[1]
    if not max_length or length <= max_length:
        return batch
    kept = batch["response_mask"][:, :max_length].sum(1)
    if int(kept.min()) == 0:
        row = int(kept.argmin())
        raise ValueError(f"model_max_length {max_length} cuts every response token of row {row} (its prompt and "
                         f"image tokens alone take {int(batch['attention_mask'][row].sum()) - int(batch['response_mask'][row].sum())}"
                         f" tokens); raise model_max_length")
    out = dict(batch)
    for k in _SEQUENCE_KEYS:
        v = out.get(k)
        if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == length:
            out[k] = v[:, :max_length]
    return out


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the response tokens.

    Args:
        logits: ``(B, L, V)`` model outputs; position ``t`` predicts token ``t + 1``.
        input_ids: ``(B, L)`` token ids.
        response_mask: ``(B, L)`` 1 where the token belongs to the response, else 0.
    Returns:
        ``(B,)`` — ``sum_t mask[t] · log softmax(logits[t-1])[input_ids[t]]``, in float32.
    """
    logits = logits[:, :-1].float()
    target = input_ids[:, 1:]
    mask = response_mask[:, 1:].to(logits.dtype)
    picked = torch.gather(logits, -1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    return (picked * mask).sum(-1)


def forward_logprobs(model, batch: dict) -> torch.Tensor:
    """``(B,)`` summed response log-probs for a batch from :func:`build_scoring_batch` (keeps grad)."""
    inputs = {k: v for k, v in to_device(batch, model).items() if k != "response_mask"}
    logits = model(**inputs).logits
    return sequence_logprobs(logits, inputs["input_ids"], batch["response_mask"].to(logits.device))


@torch.no_grad()
def response_logprobs(model, processor, images: Sequence[ImageLike], prompts: Sequence[str],
                      responses: Sequence[str], batch_size: int = 8, add_eos: bool = True,
                      chat: bool = True) -> torch.Tensor:
    """``(N,)`` summed log p(response | image, prompt) over response tokens, batched, no grad."""
    out = []
    for s in range(0, len(prompts), batch_size):
        batch = build_scoring_batch(processor, images[s:s + batch_size], prompts[s:s + batch_size],
                                    responses[s:s + batch_size], add_eos=add_eos, chat=chat)
        out.append(forward_logprobs(model, batch).cpu())
    return torch.cat(out) if out else torch.zeros(0)

