"""realign_lib.training.reference: the reference cache is keyed by content and model identity, so a changed
model (weights in the same folder), dtype, text or image is recomputed, never reused."""
from __future__ import annotations

import shutil

import pytest
import torch

from realign_lib.models import vlm
from realign_lib.training import reference
from realign_lib.training.batches import PreferenceCollator, PreferenceDataset
from realign_lib.training.config import PreferenceConfig
from tests.support import tiny_models as testing


@pytest.fixture()
def prefs(tmp_path):
    return testing.write_preferences(tmp_path, 3)


def _pass(model_dir, prefs, cache, dtype="float32"):
    model, processor = vlm.load_vlm(model_dir, dtype=dtype, device="cpu")
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    cfg = PreferenceConfig(loss="rdpo")
    ds = PreferenceDataset(prefs)
    out = reference.precompute_reference_logps(model, ds, PreferenceCollator(processor, cfg), cfg, cache,
                                               ref_model=model, batch_size=2)
    return out, len(calls)


def test_cache_is_recomputed_when_the_model_changes(prefs, tmp_path):
    folder = tmp_path / "model"
    testing.save_tiny("llava", folder, seed=0)
    cache = tmp_path / "ref.jsonl"
    first, n = _pass(folder, prefs, cache)
    assert n == 2 and len(cache.read_text().splitlines()) == 3
    again, n = _pass(folder, prefs, cache)
    assert n == 0 and again == first  # same model, same pairs: all from the cache

    # other weights written into the same folder: a new identity, so every value is recomputed
    shutil.rmtree(folder)
    testing.save_tiny("llava", folder, seed=1)
    other, n = _pass(folder, prefs, cache)
    assert n == 2 and all(other[k]["chosen"] != first[k]["chosen"] for k in first)

    # another dtype of the same weights: recomputed too
    ident32 = reference.reference_identity(vlm.load_vlm(folder, dtype="float32", device="cpu")[0])
    ident16 = reference.reference_identity(vlm.load_vlm(folder, dtype="bfloat16", device="cpu")[0])
    assert ident32["path"] == ident16["path"] == str(folder) and ident32["weights"] == ident16["weights"]
    assert ident32["dtype"] != ident16["dtype"]
    _, n = _pass(folder, prefs, cache, dtype="bfloat16")
    assert n == 2
    _, n = _pass(folder, prefs, cache)  # and the float32 values of these weights are still there
    assert n == 0


def test_key_follows_content_and_settings(prefs, tmp_path):
    model, _ = testing.tiny_llava()
    ident = reference.reference_identity(model)
    ds = PreferenceDataset(prefs)
    rec = ds.records[0]
    cfg = PreferenceConfig(loss="rdpo")
    key = reference.pair_key(rec, cfg, ident)
    assert key == reference.pair_key(dict(rec, id="renamed"), cfg, ident)  # content, not the id
    assert key != reference.pair_key(dict(rec, chosen="a red cat ."), cfg, ident)
    assert key != reference.pair_key(dict(rec, retrieved_image=ds.records[1]["retrieved_image"]), cfg, ident)
    assert key != reference.pair_key(rec, PreferenceConfig(loss="rdpo", model_max_length=64), ident)
    # DPO does not score the retrieved image: its key ignores it
    dpo = PreferenceConfig(loss="dpo")
    assert reference.pair_key(rec, dpo, ident) == reference.pair_key(
        dict(rec, retrieved_image=ds.records[1]["retrieved_image"]), dpo, ident)
    # an in-memory model (no folder) is identified by its parameter values; adapters disabled: the base
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert reference.reference_identity(model)["weights"] != ident["weights"]


def test_cache_is_recomputed_when_the_processor_changes(prefs, tmp_path):
    """The same weights behind another processor (image size, chat template) score other token
    sequences: the cache key holds the processor's identity, so the values are recomputed."""
    from realign_lib.cache import processor_identity

    folder = tmp_path / "model"
    testing.save_tiny("llava", folder, seed=0)
    cache = tmp_path / "ref.jsonl"
    _, n = _pass(folder, prefs, cache)
    assert n == 2
    model, processor = vlm.load_vlm(folder, device="cpu")
    before = processor_identity(processor)
    processor.chat_template = processor.chat_template.replace("USER: ", "User: ")
    assert processor_identity(processor) != before
    processor.save_pretrained(folder)  # the folder now carries the other template
    _, n = _pass(folder, prefs, cache)
    assert n == 2 and len(cache.read_text().splitlines()) == 6
    _, n = _pass(folder, prefs, cache)
    assert n == 0
