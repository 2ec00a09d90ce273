"""The tiny world, the offline default: settings (:mod:`.settings`), scenes and rendering (:mod:`.scenes`),
texts and files (:mod:`.world`), its POPE / MME files (:mod:`.benchmarks`), the tiny VLM
(:mod:`.model`) and its training (:mod:`.training`, resumable with :mod:`.resume`). It imports the
method; the method never imports it. Nothing is imported here."""
