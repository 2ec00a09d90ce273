"""Running the chain: the stages' parameters (:mod:`.stages`), YAML recipes (:mod:`.config`), the
``realign`` command (:mod:`.cli`), where a run folder is (:mod:`.workspace`) and stored notebook
outputs (:mod:`.nbstore`). Importing it imports neither torch nor the tiny world. Nothing is imported here."""
