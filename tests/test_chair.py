"""CHAIR is measured one way, with one set of settings, in every stage; the object words are a parameter."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from realign_lib.evaluation import chair
from realign_lib.files import read_jsonl
from tests.support.tiny_models import tiny_llava

ROOT = Path(__file__).resolve().parents[1]
LEXICON = {"cat": "cat", "cats": "cat", "dog": "dog", "dogs": "dog", "sofa": "couch", "couch": "couch"}


def test_chair_scores_count_named_and_absent_objects():
    texts = ["two cats on a sofa and a dog .", "a cat .", "nothing here ."]
    present = [{"cat", "couch"}, {"cat"}, {"dog"}]
    m = chair.chair_scores(texts, present, LEXICON)
    # named: cat, couch, dog | cat | -  → 4 mentions, 1 absent (dog in the first); 1 of 3 texts has one
    assert m == {"chair_i": 0.25, "chair_s": pytest.approx(1 / 3), "recall": 0.75, "n": 3}
    with_partners = chair.chair_scores(texts, present, LEXICON, partners={"dog": "cat", "cat": "dog"})
    assert with_partners["partner_share"] == 1.0 and with_partners["chair_i"] == 0.25
    assert chair.mentioned_objects("Dogs, a SOFA and a dog.", LEXICON) == ["dog", "couch"]
    with pytest.raises(ValueError, match="2 texts but 1 sets"):
        chair.chair_scores(["a", "b"], [set()], LEXICON)


def test_partner_yes_rate_splits_absent_objects_by_partner():
    qs = [{"image": "a.png", "text": "Is there a dog in the image?", "label": "no"},
          {"image": "a.png", "text": "Is there a sofa in the image?", "label": "no"},
          {"image": "b.png", "text": "Is there a dog in the image?", "label": "no"},
          {"image": "a.png", "text": "Is there a cat in the image?", "label": "yes"}]
    r = chair.partner_yes_rate(qs, ["yes", "no", "no", "yes"], {"a.png": ["cat"], "b.png": ["couch"]}, LEXICON,
                               {"dog": "cat", "cat": "dog", "couch": "lamp"})
    assert r["absent_partner_yes_rate"] == 1.0 and r["absent_partner_n"] == 1
    assert r["absent_other_yes_rate"] == 0.0 and r["absent_other_n"] == 2


def test_descriptions_use_one_prompt_and_token_budget_and_resume_from_their_cache(tmp_path):
    model, processor = tiny_llava()
    rng = np.random.default_rng(0)
    images = []
    for i in range(3):
        images.append(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images[-1])
    cache = tmp_path / "descriptions.jsonl"
    first = chair.describe_images(model, processor, images[:2], batch_size=2, cache_path=cache)
    assert [r["id"] for r in read_jsonl(cache)] == ["im0", "im1"]
    again = chair.describe_images(model, processor, images, batch_size=2, cache_path=cache)
    assert again[:2] == first and [r["id"] for r in read_jsonl(cache)] == ["im0", "im1", "im2"]  # only im2 made
    assert chair.describe_images(model, processor, images, batch_size=3) == again  # no cache: the same texts
    n_tokens = [len(processor.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in again]
    assert max(n_tokens) <= chair.CHAIR_MAX_NEW_TOKENS


def test_no_stage_describes_images_for_chair_its_own_way():
    """Only realign_lib.evaluation.chair generates CHAIR's descriptions: no notebook or other module
    calls generate with the describe prompt, and nothing but the tiny world defines object words."""
    sources = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")) + sorted((ROOT / "realign_lib").rglob("*.py"))
    own = [p for p in sources if p.name != "chair.py" and re.search(r"generate\([^)]*DESCRIBE_PROMPT", p.read_text(), re.S)]
    assert not own, own
    users = [p.name for p in sources if "describe_images(" in p.read_text() or "evaluate_model(" in p.read_text()]
    assert {"00_tiny_world.py", "04_training.py", "05_evaluation.py"} <= set(users), users
