"""Stage 02, strategic masking: the validity check, spans and the ``Masker`` interface (:mod:`.core`);
the backends — rule (:mod:`.rule`), local or endpoint LLM (:mod:`.llm`), copy-or-mask LLM
(:mod:`.constrained`), by name (:mod:`.backends`); the resumable run (:mod:`.driver`).
Nothing is imported here."""
