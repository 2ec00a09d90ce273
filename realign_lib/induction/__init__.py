"""Stage 03, hallucination induction (Algorithm 1, step 4): the tau loop (:mod:`.loop`), masked-text
helpers (:mod:`.texts`), fill backends (:mod:`.fillers`), the sentence-similarity judge
(:mod:`.similarity`), figures' helpers (:mod:`.analysis`) and the ablations' baseline pair sets
(:mod:`.baselines`). Nothing is imported here."""
