"""Stage 05, evaluation: POPE (:mod:`.pope`), MME (:mod:`.mme`), CHAIR (:mod:`.chair`), comparisons
over seeds (:mod:`.stats`) and one model's cached evaluation (:mod:`.runner`). The evaluation never
imports the tiny world. Nothing is imported here."""
