"""Stage 04, preference training: settings (:mod:`.config`), batches (:mod:`.batches`), the losses as
pure functions (:mod:`.losses`), the objective on a batch (:mod:`.objective`), the reference's cached
log-probs (:mod:`.reference`), the trainer (:mod:`.trainer`) and a merged export (:mod:`.export`).
Nothing is imported here."""
