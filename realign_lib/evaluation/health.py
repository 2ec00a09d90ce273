"""Is a base model healthy enough to be worth improving? A check on its POPE answers to validation images.

A model that answers yes/no questions at chance, or says "yes" (or "no") to almost everything, gives
preference-training results that only measure its answer bias: a method that makes it say "yes" more
often "gains" F1 without seeing anything better. Stage 00 runs this check on the base model and stops
the chain when it fails, naming the figures and the settings to raise.

* :func:`pope_subset` — a seeded subset of whole (yes, no) question pairs, so exactly half are "yes";
* :class:`HealthBounds` — the sane ranges (accuracy on random and adversarial, recall, yes-ratio per
  split); :data:`TARGET` — the stricter figures stage 00 trains towards (warm restarts, see
  :func:`realign_lib.tinyworld.training.train_tiny_vlm`);
* :func:`health_problems` — the figures outside them, one sentence each;
* :func:`health_message` — the message the stage fails with.

Pure functions of numbers and question lists (no model, no files).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

__all__ = ["HealthBounds", "TARGET", "pope_subset", "health_problems", "health_message", "UnhealthyBaseModel"]


class UnhealthyBaseModel(RuntimeError):
    """The base model's validation POPE figures are outside :class:`HealthBounds`."""


@dataclass(frozen=True)
class HealthBounds:
    """Sane ranges for a base model's POPE figures (fractions, not percent).

    The defaults are loose on purpose: a healthy tiny VLM reaches 75-80 % accuracy on *random* with a
    recall of 80 %+; a broken one sits at 50-60 % with a recall of 20-30 % (or a yes-ratio near 1).
    """

    min_accuracy: float = 0.65       # on the "random" split (the easiest one)
    min_adversarial_accuracy: float = 0.0   # on the "adversarial" split (absent partners; 0: not checked)
    min_recall: float = 0.50         # on every split: share of present objects answered "yes"
    min_yes_ratio: float = 0.20      # on every split (the label balance is 0.5)
    max_yes_ratio: float = 0.85


# What the tiny VLM's recipe aims at on every world seed (stage 00 restarts instruction tuning while the
# model misses it): POPE accuracy >= 75 % on random and >= 60 % on adversarial, recall >= 70 % on every split.
TARGET = HealthBounds(min_accuracy=0.75, min_adversarial_accuracy=0.60, min_recall=0.70)


def pope_subset(questions: Sequence[dict], n: int, seed: int | Sequence[int] = 0) -> list[dict]:
    """``n`` questions of a POPE file as whole consecutive (yes, no) pairs, chosen with ``seed`` (anything
    ``numpy.random.default_rng`` takes).

    POPE files alternate a present object and an absent one per image, so taking whole pairs keeps
    the subset's labels exactly balanced. ``n`` ≤ 0 or ≥ the file's length keeps every question.
    """
    if n <= 0 or n >= len(questions):
        return list(questions)
    pairs = np.sort(np.random.default_rng(seed).choice(len(questions) // 2, max(1, n // 2), replace=False))
    return [questions[j] for i in pairs for j in (2 * int(i), 2 * int(i) + 1)]


def health_problems(pope_metrics: Mapping[str, Mapping[str, float]], bounds: HealthBounds = HealthBounds()) -> list[str]:
    """The figures of ``pope_metrics`` (``split → score_pope`` dict) outside ``bounds``; ``[]`` when healthy."""
    out = []
    rnd = pope_metrics.get("random")
    if rnd is not None and rnd["accuracy"] < bounds.min_accuracy:
        out.append(f"accuracy on random {100 * rnd['accuracy']:.1f} % < {100 * bounds.min_accuracy:.0f} %")
    adv = pope_metrics.get("adversarial")
    if adv is not None and adv["accuracy"] < bounds.min_adversarial_accuracy:
        out.append(f"accuracy on adversarial {100 * adv['accuracy']:.1f} % < {100 * bounds.min_adversarial_accuracy:.0f} %")
    for split, m in pope_metrics.items():
        if m["recall"] < bounds.min_recall:
            out.append(f"recall on {split} {100 * m['recall']:.1f} % < {100 * bounds.min_recall:.0f} %")
        if not bounds.min_yes_ratio <= m["yes_ratio"] <= bounds.max_yes_ratio:
            out.append(f"yes-ratio on {split} {100 * m['yes_ratio']:.1f} % outside "
                       f"{100 * bounds.min_yes_ratio:.0f}-{100 * bounds.max_yes_ratio:.0f} % (labels: 50 %)")
    return out


def health_message(problems: Sequence[str], settings: Mapping[str, object], raise_hint: Sequence[str],
                   override: str) -> str:
    """The one message a failed check gives: what is wrong, the settings that made the model, what to raise.

    ``settings``: the training budget (name → value); ``raise_hint``: the setting names to raise;
    ``override``: how to let the model through anyway.
    """
    budget = ", ".join(f"{k}={v}" for k, v in settings.items())
    return (f"the base model failed its health check on the validation images: {'; '.join(problems)}. "
            f"It was trained with {budget}: a model this weak answers yes/no questions near chance, and any "
            f"'improvement' measured on it is its answer bias moving. Raise {', '.join(raise_hint)} and run "
            f"again, or set {override} to go on with this model anyway.")
