"""realign-kit: a runnable reproduction of Re-Align (retrieval-augmented DPO for VLMs).

One subpackage per stage of the method; import the module you need (nothing is imported here, and
nothing heavy happens at import). A map with every module is in ``docs/library.md``.

The method, stage by stage
* ``realign_lib.data``        — stage 00 on real data: LLaVA-Instruct samples, QA pairs from captions
* ``realign_lib.retrieval``   — stage 01: embeddings, FAISS indexes, top-k other images
* ``realign_lib.masking``     — stage 02: the validity rule, the backends (rule, LLM, constrained), the driver
* ``realign_lib.induction``   — stage 03: the tau loop, fillers, the similarity judge, baseline pair sets
* ``realign_lib.training``    — stage 04: settings, batches, losses, the objective, reference, trainer, export
* ``realign_lib.evaluation``  — stage 05: POPE, MME, CHAIR, statistics over seeds, the cached runner

Shared by the stages
* ``realign_lib.models``      — any Hugging Face image-text-to-text model: loading, generation, scoring;
  an OpenAI-compatible client
* ``realign_lib.prompts``     — the paper's prompt texts
* ``realign_lib.cache``       — one model identity and one cache key for every cache
* ``realign_lib.files``       — crash-safe files, the run-folder lock

Running, and the offline world
* ``realign_lib.run``         — stage parameters, YAML recipes, the ``realign`` command, notebook store
* ``realign_lib.tinyworld``   — synthetic scenes, their benchmark files, the tiny VLM (imports the
  method; the method never imports it)
"""
__version__ = "0.1.0"
__all__ = ["__version__"]
