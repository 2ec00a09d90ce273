"""A masking backend by name: :func:`make_masker` (``rule``, ``hf``, ``constrained``, ``openai``),
as stage 02's ``backend`` parameter names them."""
from __future__ import annotations

from realign_lib.masking.constrained import ConstrainedMasker
from realign_lib.masking.core import Masker
from realign_lib.masking.llm import HFMasker, OpenAIMasker
from realign_lib.masking.rule import RuleMasker

__all__ = ["make_masker"]


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
