"""Stage 00 on real data: samples from LLaVA-Instruct-150K (:mod:`.llava`) and chosen responses
written as question-answer pairs from captions (:mod:`.caption_qa`). Nothing is imported here."""
