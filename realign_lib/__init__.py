"""realign-kit: a runnable reproduction of Re-Align (retrieval-augmented DPO for VLMs).

Modules (import what you need; nothing heavy happens at import):

The method
* ``realign_lib.prompts``        — the paper's prompt texts (masking, completion, describe, suffixes)
* ``realign_lib.retrieval``      — embeddings, FAISS indexes, top-k other images (stage 01)
* ``realign_lib.masking``        — strategic masking: validity check, spans, the ``Masker`` interface (stage 02)
* ``realign_lib.maskers``        — masking backends: rule (spaCy), local LLM, OpenAI-compatible endpoint
* ``realign_lib.masking_driver`` — the resumable masking run and backend evaluation
* ``realign_lib.induction``      — the tau loop of Algorithm 1 (stage 03)
* ``realign_lib.fillers``        — filling the masks: slot / instruction filling, an endpoint
* ``realign_lib.similarity``     — the sentence-similarity judge
* ``realign_lib.comparisons``    — comparison sets: random word swap, corrupted images
* ``realign_lib.losses``         — DPO, rDPO, mDPO as pure functions of log-probs
* ``realign_lib.training``       — ``PreferenceConfig``, data, scoring, reference log-probs (stage 04)
* ``realign_lib.reference``      — the reference's log-probs, cached by content and model identity
* ``realign_lib.trainer``        — ``PreferenceTrainer`` and ``train()``
* ``realign_lib.export``         — a merged checkpoint for vLLM / lmms-eval
* ``realign_lib.pope`` / ``realign_lib.evaluation`` — POPE and MME with the official scoring (stage 05)

Models, data, running
* ``realign_lib.vlm``            — one interface to any Hugging Face image-text-to-text model
* ``realign_lib.data`` / ``realign_lib.endpoint`` — LLaVA-Instruct samples; an OpenAI-compatible client
* ``realign_lib.stages``         — one dataclass per notebook: parameters, defaults, checks
* ``realign_lib.config`` / ``realign_lib.cli`` — YAML recipes; ``realign run`` and ``realign train``
* ``realign_lib.files``          — crash-safe JSON / JSON-lines helpers, the run-folder lock
* ``realign_lib.fingerprints``   — what caches depend on: model identity, weights digests, file stamps

The tiny world (imports the method, never the reverse)
* ``realign_lib.tinyworld`` / ``realign_lib.tinyworld_eval`` — synthetic scenes; their POPE / MME files, metrics
* ``realign_lib.tinyvlm`` / ``realign_lib.resume`` — the tiny LLaVA model trained from scratch, resumably
* ``realign_lib.testing``        — tiny random models of real architectures, for tests and benchmarks
"""
__version__ = "0.1.0"
__all__ = ["__version__"]
