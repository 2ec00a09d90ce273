"""realign-kit: a runnable reproduction of Re-Align (retrieval-augmented DPO for VLMs).

Modules (import what you need; nothing heavy happens at import):

* ``realign_lib.tinyworld`` — the synthetic world: scenes, descriptions, LLaVA/POPE/MME files
* ``realign_lib.tinyvlm``   — build and train the tiny LLaVA-architecture model from scratch
* ``realign_lib.vlm``       — one interface to any Hugging Face image-text-to-text model
* ``realign_lib.pope``      — POPE reading, answering and official scoring
* ``realign_lib.config``    — dataclass configs with YAML loading and checks
* ``realign_lib.files``     — crash-safe JSON / JSON-lines helpers
"""
__version__ = "0.1.0"
__all__ = ["__version__"]
