"""One client for OpenAI-compatible chat-completions endpoints (OpenAI, vLLM, Ollama, …).

Used by the masking backend (text only), by induction (a VLM served by vLLM fills the masks while
looking at the retrieved image) and by the real-data stage (a VLM writes the chosen responses).
Images go inside the message as ``data:`` URLs (``image_url`` parts), which vLLM and OpenAI accept.

* The key is read ONLY from the environment variable ``api_key_env`` (servers without
  authentication accept any value, e.g. ``export OPENAI_API_KEY=EMPTY``); it is never stored in a
  record, shown in ``repr`` or left in an error text.
* Temperature 0. Each request is retried up to ``max_retries`` times with exponential back-off
  (``backoff_base · 2**n`` s, at most ``backoff_max``, or the server's Retry-After if longer) on
  429, 5xx, time-outs, connection errors and unreadable replies (including a ``parse`` function's
  ``ValueError``); other 4xx give up on that request; 401/403/404 (wrong key, model or URL) abort
  the run with a ``RuntimeError``.
* At most ``max_concurrency`` requests are in flight (:meth:`ChatEndpoint.map`).
* ``stats`` counts requests, retries and each kind of failure.
"""
from __future__ import annotations

import base64
import io
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = ["EndpointFailure", "ChatEndpoint", "scrub_secret", "message_content", "image_data_url", "user_message"]


@dataclass
class EndpointFailure:
    """A request the endpoint could not answer (after its retries)."""

    reason: str
    detail: str = ""


def message_content(resp) -> str:
    """The assistant's text in a chat-completions reply; ValueError if the reply is not one."""
    if isinstance(resp, str):  # the client returns the body as text when it is not JSON
        raise ValueError(f"reply is not JSON: {resp[:80]!r}")
    try:
        content = resp.choices[0].message.content
    except (AttributeError, IndexError, KeyError, TypeError) as err:
        raise ValueError(f"reply has no choices[0].message.content ({type(err).__name__})") from None
    if not isinstance(content, str):
        raise ValueError("reply has no message content")
    return content


def image_data_url(image, fmt: str = "PNG") -> str:
    """A ``data:image/...;base64,`` URL of an image (path, PIL image or HxWx3 uint8 array)."""
    from realign_lib.models.vlm import to_pil

    buf = io.BytesIO()
    to_pil(image).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def user_message(text: str, image=None) -> dict:
    """A user turn: the text alone, or an ``image_url`` part (data URL) followed by the text."""
    if image is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url(image)}},
                                        {"type": "text", "text": text}]}


def scrub_secret(text: str, secret: str, min_run: int = 6) -> str:
    """``text`` with each run of ``min_run`` or more characters that also stands in ``secret`` replaced
    by ``***``: the whole key, however it is quoted or escaped around it, and the partly masked forms
    error messages print (``sk-abc…****…1a2b3c``). A secret shorter than ``min_run`` is replaced
    where it stands whole."""
    if not secret or not text:
        return text
    if len(secret) < min_run:
        return text.replace(secret, "***")
    out, i = [], 0
    while i < len(text):
        j = i
        while j < len(text) and text[i:j + 1] in secret:  # the longest run from i that is part of the key
            j += 1
        if j - i >= min_run:
            out.append("***")
            i = j
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


class ChatEndpoint:
    """An OpenAI-compatible chat-completions endpoint (see the module docstring)."""

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 max_concurrency: int = 8, timeout: float = 60.0, max_retries: int = 5, backoff_base: float = 1.0,
                 backoff_max: float = 30.0, max_tokens: int | None = None, extra_body: dict | None = None,
                 name_prefix: str = "openai"):
        import openai

        if not model:
            raise ValueError("an OpenAI-compatible endpoint needs a model name (api_model in the config)")
        key = (os.environ.get(api_key_env or "") or "").strip()  # a .env with CRLF endings leaves "\r"
        if not key:
            raise ValueError(f"environment variable {api_key_env!r} is not set: the API key is read only from the "
                             f"environment (for a local server without authentication set it to any value, "
                             f"e.g. `export {api_key_env}=EMPTY`)")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.name = f"{name_prefix}:{model}"
        self.api_key_env = api_key_env
        self.model, self.base_url = model, (base_url or None)
        self.max_concurrency, self.max_retries = int(max_concurrency), int(max_retries)
        self.backoff_base, self.backoff_max = float(backoff_base), float(backoff_max)
        self.max_tokens, self.extra_body = max_tokens, extra_body
        self._key_hint = key  # only to scrub error texts; never written
        self._client = openai.OpenAI(api_key=key, base_url=self.base_url, timeout=timeout, max_retries=0)
        self._openai = openai
        self._pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="chat-api")
        self._lock = threading.Lock()
        self.stats: Counter = Counter()

    def __repr__(self) -> str:
        return (f"ChatEndpoint(model={self.model!r}, base_url={self.base_url!r}, "
                f"max_concurrency={self.max_concurrency})")

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def scrub(self, text: str) -> str:
        """``text`` with every trace of the key replaced by ``***`` (see :func:`scrub_secret`)."""
        return scrub_secret(text, self._key_hint)

    def _delay(self, n: int, err) -> float:
        delay = min(self.backoff_max, self.backoff_base * 2 ** n) * (1 + 0.1 * random.random())
        resp = getattr(err, "response", None)
        try:
            retry_after = float(resp.headers.get("retry-after")) if resp is not None else None
        except (TypeError, ValueError):
            retry_after = None
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max))
        return delay

    def complete(self, messages: list[dict], parse: Callable[[str], Any] | None = None,
                 with_finish: bool = False) -> Any:
        """One chat completion (temperature 0): ``parse(content)`` (default: the text) or an
        :class:`EndpointFailure` after the retries. ``with_finish``: ``(parsed, finish_reason)``
        instead (``"length"`` when the reply was cut off by ``max_tokens``; counted in ``stats``)."""
        oa = self._openai
        kw: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0}
        if self.max_tokens:
            kw["max_tokens"] = self.max_tokens
        if self.extra_body:
            kw["extra_body"] = self.extra_body
        last = ""
        for n in range(self.max_retries + 1):
            self._count("requests")
            status_err = None
            try:
                resp = self._client.chat.completions.create(**kw)
                content = message_content(resp)
                parsed = parse(content) if parse is not None else content
                if not with_finish:
                    return parsed
                finish = getattr(resp.choices[0], "finish_reason", None)
                self._count(f"finish_{finish}")
                return parsed, finish
            except (oa.AuthenticationError, oa.PermissionDeniedError, oa.NotFoundError) as err:
                raise RuntimeError(f"{self.name} at {self.base_url or 'api.openai.com'}: {type(err).__name__} "
                                   f"({self.scrub(str(err))[:300]}); check the model name, the base URL and the "
                                   f"key in the environment variable {self.api_key_env}") from None
            except oa.APIStatusError as err:
                self._count(f"http_{err.status_code}")
                if err.status_code != 429 and err.status_code < 500:
                    self._count("failed")
                    return EndpointFailure("api_error", self.scrub(f"HTTP {err.status_code}: {err}")[:500])
                last, status_err = f"HTTP {err.status_code}", err
            except oa.APITimeoutError:
                last = "timeout"
                self._count("timeout")
            except oa.APIConnectionError as err:
                last = f"connection error ({err.__cause__ or err})"
                self._count("connection_error")
            except (ValueError, oa.APIResponseValidationError) as err:  # JSONDecodeError is a ValueError
                last = f"unreadable reply ({type(err).__name__}: {self.scrub(str(err))[:120]})"
                self._count("bad_response")
            if n < self.max_retries:
                self._count("retries")
                time.sleep(self._delay(n, status_err))
        self._count("failed")
        return EndpointFailure("api_error", self.scrub(f"gave up after {self.max_retries + 1} tries; last: {last}"))

    def map_each(self, fn: Callable[[Any], Any], items: Sequence) -> list:
        """``fn(item)`` for each item on this endpoint's pool (``max_concurrency`` at a time), in order;
        for callers whose request or parsing depends on the item."""
        return list(self._pool.map(fn, items))

    def map(self, conversations: Sequence[list[dict]], parse: Callable[[str], Any] | None = None) -> list:
        """:meth:`complete` for each conversation, ``max_concurrency`` at a time, results in order."""
        return self.map_each(lambda m: self.complete(m, parse), conversations)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()
