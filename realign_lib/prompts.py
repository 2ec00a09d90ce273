"""The paper's prompt texts, in one place: every stage and evaluation imports them from here.

* :data:`MASK` — the mask token the masked responses carry (``"[MASK]"``);
* :data:`MASK_PROMPT` — Re-Align's strategic-masking prompt (stage 2), verbatim, and
  :data:`ONE_SHOT_EXAMPLE`, the worked example shown to the LLM maskers on a second attempt;
* :data:`COMPLETION_PROMPT` — the paper's completion prompt: the hallucination-prone VLM fills
  the masked segments with it (stage 3, instruction filling);
* :data:`DESCRIBE_PROMPT` — the detailed-description prompt of the samples (LLaVA-Instruct);
* :data:`MME_SUFFIX` — MME's answer instruction appended to each question;
* :data:`LMMS_EVAL_SUFFIX` — lmms-eval's short-answer instruction (optional POPE suffix).

:data:`FIXED_PROMPTS` are the texts the kit itself sends to the VLM being trained and evaluated;
the tiny VLM's vocabulary (:func:`realign_lib.tinyworld.world.world_vocabulary`) covers their words.
Constants only; nothing is imported.
"""
from __future__ import annotations

__all__ = [
    "MASK", "MASK_PROMPT", "ONE_SHOT_EXAMPLE", "COMPLETION_PROMPT", "DESCRIBE_PROMPT", "MME_SUFFIX",
    "LMMS_EVAL_SUFFIX", "FIXED_PROMPTS",
]

MASK = "[MASK]"
MASK_PROMPT = ("Please mask any words of the segments related to the objects, attributes, and logical "
               "relationships of the input image in the following description by replacing them with [MASK].")

#: (original, masking) shown to the LLM backends as a previous chat turn on their second attempt.
ONE_SHOT_EXAMPLE = (
    "A small brown dog is sleeping on a red couch, and a tall lamp stands behind the couch.",
    "A [MASK] is sleeping on a [MASK], and a [MASK] stands [MASK] the [MASK].",
)

COMPLETION_PROMPT = ("Please complete the following sentence based on the input image by filling in "
                     "the masked segments.")

# Prompts the later stages send to the tiny VLM; their words must be in its vocabulary.
DESCRIBE_PROMPT = "Describe the image in detail."
MME_SUFFIX = "Please answer yes or no."
LMMS_EVAL_SUFFIX = "Answer the question using a single word or phrase."
FIXED_PROMPTS = (DESCRIBE_PROMPT, MME_SUFFIX, LMMS_EVAL_SUFFIX, COMPLETION_PROMPT)
