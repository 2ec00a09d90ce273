"""Models: one interface to any Hugging Face image-text-to-text model (:mod:`.vlm`), the summed
log-probability of a response (:mod:`.scoring`), and an OpenAI-compatible client (:mod:`.endpoint`).
Import the module you need; nothing is imported here."""
