"""Stage 3 (hallucination induction): slot filling, the τ loop, resumption, output formats.

Real models throughout: a random tiny LLaVA-1.5 (``testing.tiny_llava``, word-level
tokenizer) fills the masks and the packaged all-MiniLM-L6-v2 judges similarity. The τ loop is
steered without stubs: a sample whose chosen text *is* the model's fill under an image gets
cosine exactly 1 there (refused), any other text gets less.
"""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from realign_lib.files import read_appended
from realign_lib.induction import baselines as comp
from realign_lib.induction import fillers, similarity
from realign_lib.induction import loop as ind
from realign_lib.induction.analysis import acceptance_by_rank, similarity_histogram
from realign_lib.induction.texts import changed_words, join_filled, slot_texts, spans_from_masked
from realign_lib.prompts import COMPLETION_PROMPT, MASK
from realign_lib.tinyworld.benchmarks import absent_object_stats
from realign_lib.tinyworld.scenes import ObjectInstance, Scene
from realign_lib.tinyworld.world import span_lexicon

PROMPT = "describe the image in detail ."
PREF_KEYS = {"id", "prompt", "images", "retrieved_image", "chosen", "rejected", "masked", "similarity", "rank",
             "similarities", "input"}
# chosen texts over the tiny LLaVA vocabulary, with the words to mask
TEXTS = [
    ("a red cat is on the left of the blue car .", ["red cat", "left"]),
    ("there are two dogs and one tree in the picture .", ["two dogs", "tree"]),
    ("the small house is to the right of a green ball .", ["small house", "right", "green ball"]),
    ("a white cup is on the table .", ["white cup", "table"]),
]


def mask_words(chosen: str, phrases) -> tuple[str, list[dict]]:
    """Test fixture masking: replace each listed phrase (first occurrence, in order) by [MASK]."""
    spans, pos = [], 0
    for ph in phrases:
        start = chosen.index(ph, pos)
        spans.append({"start": start, "end": start + len(ph), "text": ph})
        pos = start + len(ph)
    out, pos = [], 0
    for sp in spans:
        out += [chosen[pos:sp["start"]], MASK]
        pos = sp["end"]
    return "".join(out + [chosen[pos:]]), spans


@pytest.fixture(scope="module")
def tiny():
    from tests.support.tiny_models import tiny_llava
    return tiny_llava()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with four visibly different 32 px images under images/."""
    run = tmp_path_factory.mktemp("run")
    (run / "images").mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        arr = (rng.random((32, 32, 3)) * 255).astype(np.uint8) if k % 2 else \
            np.full((32, 32, 3), [k * 60, 255 - k * 60, 100], np.uint8)
        Image.fromarray(arr).save(run / "images" / f"img{k}.png")
    return run


@pytest.fixture(scope="module")
def encoder():
    return similarity.SentenceEncoder(batch_size=8)


@pytest.fixture(scope="module")
def filler(tiny):
    model, proc = tiny
    return fillers.MaskFiller(model, proc, mode="slot", max_span_tokens=3, stop_margin=0.0, batch_size=4)


def img(run, k):
    return str(run / "images" / f"img{k}.png")


def make_item(run, sid, text_idx, ranks, chosen=None):
    chosen0, phrases = TEXTS[text_idx]
    masked, _ = mask_words(chosen0, phrases)
    cands = [ind.Candidate(r + 1, f"images/img{k}.png", img(run, k)) for r, k in enumerate(ranks)]
    return ind.Item(sid, PROMPT, f"images/img{text_idx}.png", chosen or chosen0, masked, cands)


def fill_under(filler, run, item, k):
    return filler([img(run, k)], [item.prompt], [item.masked])[0]


# ----------------------------------------------------------------------------------- pure parts
def test_split_join_and_spans():
    segs, slots = ind.split_masked("a [MASK] [MASK] at the [MASK] .")
    assert segs == ["a ", " at the ", " ."] and slots == [2, 1]
    assert ind.split_masked("[MASK] dog")[0] == ["", " dog"]
    assert join_filled(segs, ["big red", "top"]) == "a big red at the top ."
    with pytest.raises(ValueError):
        join_filled(segs, ["x"])
    chosen = "a big red star at the top ."
    spans = spans_from_masked(chosen, "a [MASK] at the [MASK] .")
    assert [s["text"] for s in spans] == ["big red star", "top"]
    assert all(chosen[s["start"]:s["end"]] == s["text"] for s in spans)
    assert spans_from_masked("something else", "a [MASK] at the [MASK] .") is None
    assert changed_words("a red cat .", "a blue cat .") == [("a", False), ("blue", True), ("cat", False),
                                                               (".", False)]
    m = "the [MASK] is [MASK] the ball ."
    assert slot_texts("the kite is below the ball .", m) == ["kite", "below"]
    assert slot_texts("a kite .", m) is None
    flags = changed_words("the kite is below the ball .", "the tree is above the ball .", m)
    assert [w for w, c in flags if c] == ["tree", "above"]
    assert " ".join(w for w, _ in flags) == "the tree is above the ball ."
    lex = span_lexicon()  # the tiny world's words; without a lexicon, a generic English one
    assert comp.span_kind("big yellow star", lex) == "size+colour+object"
    assert comp.span_kind("on the left", lex) == "position"
    assert comp.span_kind("big yellow star") == "size+colour+word" and comp.span_kind("on the left") == "position"
    assert comp.span_kind("two dogs") == "number+word" and comp.span_kind("next to") == "relation"
    assert np.allclose(similarity.cosine_rows(np.array([[1.0, 0], [1, 1]]), np.array([[2.0, 0], [1, -1]])), [1, 0])


def test_build_items_joins_the_stages_by_id(tmp_path):
    samples = [{"id": f"s{i}", "image": f"s{i}.png", "prompt": PROMPT, "chosen": "a red cat .", "image_root": "imgs"}
               for i in range(4)]
    masked = [{"id": s["id"], "chosen": s["chosen"], "masked": "a [MASK] cat .", "spans": []} for s in samples[:3]]
    nbrs = [{"id": s["id"], "image": s["image"], "image_root": "imgs",
             "neighbours": [{"rank": 2, "id": "s3", "image": "s3.png", "score": 0.9},
                            {"rank": 1, "id": "s2", "image": "s2.png", "score": 0.95}]}
            for s in samples if s["id"] != "s1"]
    items, missing = ind.build_items(samples, masked, nbrs, tmp_path, top_k=2)
    assert [it.id for it in items] == ["s0", "s2"] and missing == {"no_masked_record": 1, "no_neighbours": 1}
    assert [(c.rank, c.image) for c in items[0].candidates] == [(1, "imgs/s2.png"), (2, "imgs/s3.png")]
    assert items[0].candidates[0].path == str(tmp_path / "imgs/s2.png") and items[0].image == "imgs/s0.png"
    assert len(ind.build_items(samples, masked, nbrs, tmp_path, top_k=1, limit=1)[0][0].candidates) == 1
    # asking stage 03 for more neighbours than stage 01 kept is an error, not a shorter list
    with pytest.raises(ValueError, match=r"top_k=5, but stage 01 kept at most 2 neighbours per image"):
        ind.build_items(samples, masked, nbrs, tmp_path, top_k=5)


def test_read_appended_drops_a_half_written_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "rej')
    assert [r["id"] for r in read_appended(p)] == ["a", "b"]
    assert p.read_text() == '{"id": "a"}\n{"id": "b"}\n'  # truncated, ready for appending
    p.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="x.jsonl:2"):
        read_appended(p)


def test_analysis_helpers():
    recs = [{"id": "a", "rank": 1, "similarity": 0.8, "similarities": [0.8], "rejected": "a white moon and a car .",
             "retrieved_image": "r.png"},
            {"id": "b", "rank": 3, "similarity": 0.9, "similarities": [0.97, 0.99, 0.9], "rejected": "a star .",
             "retrieved_image": "r.png"}]
    skipped = [{"id": "c", "reason": "none_below_tau", "ranks_tried": 3, "similarities": [0.99, 0.98, 0.96]}]
    acc = acceptance_by_rank(recs, skipped, top_k=3)
    assert [(r["tried"], r["accepted"]) for r in acc] == [(3, 1), (2, 0), (2, 1)]
    assert acc[2]["cumulative"] == pytest.approx(2 / 3)
    h = similarity_histogram(recs, skipped, bins=5)
    assert sum(h["counts_accepted"]) == 2 and sum(h["counts_refused"]) == 5 and h["n"] == 7
    star = ObjectInstance("star", "yellow", "left", 6.0, 1.0)
    scenes = {"a": Scene("a", "night", [star], 0), "b": Scene("b", "night", [star], 0)}
    st = absent_object_stats(recs, scenes, image_scene=lambda p: Scene("r", "street", [ObjectInstance(
        "car", "red", "top", 6.0, 1.0)], 0))
    assert st["responses_with_absent"] == 0.5 and st["absent_mentions"] == 2
    assert st["partner_share"] == 0.5 and st["absent_in_retrieved_share"] == 0.5  # moon: partner; car: retrieved


def test_accept_rank_is_the_tau_rule():
    assert ind.accept_rank([0.97, 0.93, 0.5], 0.95) == 1                   # first below tau, in rank order
    assert ind.accept_rank([0.95, 0.99], 0.95) is None                     # s == tau is refused
    assert ind.accept_rank([None, float("nan"), 0.9], 0.95) == 2           # no candidate: never accepted
    assert ind.accept_rank([0.5, 0.9], 0.95, [True, False]) == 1           # a cut-short candidate is refused
    assert ind.accept_rank([0.5], 0.95, [True]) is None and ind.accept_rank([], 0.95) is None


def test_induction_settings_records_model_inputs_and_fill_settings(tmp_path):
    from realign_lib.cache import model_identity
    from tests.support.tiny_models import tiny_llava

    model = tiny_llava()[0]
    a, b = tmp_path / "masked.jsonl", tmp_path / "neighbours.jsonl"
    a.write_text("x")
    b.write_text("y")
    slot = ind.induction_settings(model, [a, b], "slot", "minilm", 5, max_span_tokens=6, stop_margin=5.0,
                                  max_new_tokens=99)
    assert list(slot) == ["model", "inputs", "fill_mode", "sentence_model", "top_k", "max_span_tokens", "stop_margin"]
    assert slot["model"] == model_identity(model) and slot["model"]["weights"]  # the one identity of every cache
    assert slot["inputs"][0] == "2d711642b726b044"  # sha256("x")
    inst = ind.induction_settings("openai:m@u", [a, b], "instruction", "minilm", 5, max_new_tokens=2048)
    assert inst["model"] == "openai:m@u" and inst["max_new_tokens"] == 2048 and "stop_margin" not in inst
    b.write_text("z")
    assert ind.induction_settings(model, [a, b], "slot", "minilm", 5)["inputs"][1] != slot["inputs"][1]
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # other weights, another identity
    assert ind.induction_settings(model, [a, b], "slot", "minilm", 5)["model"] != slot["model"]


def test_corrupt_image_is_seeded_and_keeps_size():
    arr = (np.random.default_rng(1).random((40, 30, 3)) * 255).astype(np.uint8)
    for kind in ("crop", "noise"):
        a = comp.corrupt_image(arr, kind, np.random.default_rng(5))
        b = comp.corrupt_image(arr, kind, np.random.default_rng(5))
        assert a.shape == arr.shape and a.dtype == np.uint8 and np.array_equal(a, b) and not np.array_equal(a, arr)
    with pytest.raises(ValueError, match="noise"):
        comp.corrupt_image(arr, "blur", np.random.default_rng(0))


# --------------------------------------------------------------------------------- slot filling
def test_slot_filling_keeps_the_scaffold_and_changes_only_the_spans(tiny, run_dir):
    model, proc = tiny
    masked = [mask_words(t, ph)[0] for t, ph in TEXTS] + ["[MASK] dog and a [MASK]"]
    images = [img(run_dir, k % 4) for k in range(len(masked))]
    fills = fillers.slot_fill(model, proc, images, [PROMPT] * len(masked), masked, max_span_tokens=3,
                              stop_margin=0.0, return_spans=True)
    texts = fillers.slot_fill(model, proc, images, [PROMPT] * len(masked), masked, max_span_tokens=3, stop_margin=0.0)
    for m, f, t in zip(masked, fills, texts):
        segs, slots = ind.split_masked(m)
        assert len(f) == len(slots) and all(x.strip() for x in f)           # every slot filled, none empty
        assert all(len(x.split()) <= 3 * n for x, n in zip(f, slots))        # max_span_tokens per mask
        assert t == join_filled(segs, f)                                 # scaffold kept character for character
        pattern = "".join(re.escape(s) + ("(.+)" if i < len(f) else "") for i, s in enumerate(segs))
        assert re.fullmatch(pattern, t, flags=re.S)
        assert MASK not in t and "<image>" not in t
    assert fillers.slot_fill(model, proc, images[:2], [PROMPT] * 2,
                             ["no masks here .", masked[0]])[0] == "no masks here ."


def test_batched_slot_filling_equals_one_at_a_time(tiny, run_dir):
    model, proc = tiny
    masked = [mask_words(t, ph)[0] for t, ph in TEXTS]
    images = [img(run_dir, k) for k in (0, 1, 2, 3)]
    prompts = [PROMPT, "what is in the picture ?", PROMPT, "describe the image ."]  # different prompt lengths: padding
    batched = fillers.slot_fill(model, proc, images, prompts, masked, max_span_tokens=4, stop_margin=2.0)
    single = [fillers.slot_fill(model, proc, [i], [p], [m], max_span_tokens=4, stop_margin=2.0)[0]
              for i, p, m in zip(images, prompts, masked)]
    assert batched == single


def test_instruction_mode_sends_the_completion_prompt(tiny, run_dir):
    model, proc = tiny
    f = fillers.MaskFiller(model, proc, mode="instruction", max_new_tokens=5)
    out = f([img(run_dir, 0)], [PROMPT], ["a [MASK] cat ."])
    assert len(out) == 1 and isinstance(out[0], str)
    assert COMPLETION_PROMPT.startswith("Please complete the following sentence based on the input image")
    with pytest.raises(ValueError, match="fill mode"):
        fillers.MaskFiller(model, proc, mode="chat")


# ------------------------------------------------------------------------------------ the τ loop
def test_tau_loop_accepts_in_rank_order_and_counts_skips(filler, encoder, run_dir, tmp_path):
    first = make_item(run_dir, "rank1", 0, [1, 2])
    probe = make_item(run_dir, "later", 1, [0, 3])
    # chosen = the model's own fill under image 0: cos 1 at rank 1 (refused), a different fill at rank 2
    later = make_item(run_dir, "later", 1, [0, 3], chosen=fill_under(filler, run_dir, probe, 0))
    assert fill_under(filler, run_dir, probe, 3) != later.chosen
    never_probe = make_item(run_dir, "never", 2, [2, 2])
    never = make_item(run_dir, "never", 2, [2, 2], chosen=fill_under(filler, run_dir, never_probe, 2))
    nomask = ind.Item("nomask", PROMPT, "images/img0.png", "a cat .", "a cat .", first.candidates)
    out, skp = tmp_path / "p.jsonl", tmp_path / "s.jsonl"
    summary = ind.induce([first, later, never, nomask], filler, encoder, 0.9999, out, skp, progress=False)
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    skipped = {r["id"]: r for r in map(json.loads, skp.read_text().splitlines())}
    assert summary["pairs"] == 2 and summary["skipped"] == 2 and summary["fills"] == 2 + 1 + 2
    assert recs["rank1"]["rank"] == 1 and recs["rank1"]["retrieved_image"] == "images/img1.png"
    assert len(recs["rank1"]["similarities"]) == 1 and recs["rank1"]["similarity"] < 0.9999
    assert recs["later"]["rank"] == 2 and recs["later"]["retrieved_image"] == "images/img3.png"
    assert recs["later"]["similarities"][0] == 1.0 and recs["later"]["similarity"] < 0.9999
    assert skipped["never"] == {"id": "never", "reason": "none_below_tau", "ranks_tried": 2, "similarities": [1.0, 1.0],
                                "last_candidate": never.chosen, "input": ind.item_digest(never)}
    assert skipped["nomask"]["reason"] == "no_mask"
    assert all(set(r) == PREF_KEYS for r in recs.values()) and recs["rank1"]["images"] == ["images/img0.png"]
    by_rank = acceptance_by_rank(list(recs.values()), list(skipped.values()), 2)
    assert [(r["tried"], r["accepted"]) for r in by_rank] == [(3, 1), (2, 1)]
    # a lower tau refuses everything; other settings are refused unless asked to restart
    with pytest.raises(ValueError, match="tau"):
        ind.induce([first], filler, encoder, 0.0, out, skp, progress=False)
    # a stage that made no pair at all fails, saying why (it is not complete, and a rerun tries again)
    with pytest.raises(RuntimeError, match=r"no pair accepted from 1 samples \(skipped: none_below_tau 1\)"):
        ind.induce([first], filler, encoder, 0.0, out, skp, on_change="restart", progress=False)
    assert [json.loads(x)["reason"] for x in skp.read_text().splitlines()] == ["none_below_tau"]


def test_a_changed_input_or_a_failed_fill_is_computed_again(filler, encoder, run_dir, tmp_path):
    """Resume reuses a record only while its sample, masked text and candidates are unchanged, and
    never keeps a skip whose filler failed (an endpoint that was down)."""
    a, b = make_item(run_dir, "a", 0, [1, 2]), make_item(run_dir, "b", 1, [2, 3])
    out, skp = tmp_path / "p.jsonl", tmp_path / "s.jsonl"
    calls = []

    def counting(images, prompts, masked):
        calls.append(len(images))
        return filler(images, prompts, masked)

    first = ind.induce([a, b], lambda i, p, m: ["" if mm == b.masked else t for mm, t in zip(m, filler(i, p, m))],
                       encoder, 0.9999, out, skp, progress=False)
    assert first["pairs"] == 1 and json.loads(skp.read_text())["reason"] == "fill_failed"
    again = ind.induce([a, b], counting, encoder, 0.9999, out, skp, progress=False)
    assert again["computed"] == 1 and again["pairs"] == 2 and calls == [1]  # only b, whose fill had failed
    # the sample's chosen text changed upstream (stage 00 / 02 re-ran): its pair is made again
    a2 = ind.Item(a.id, a.prompt, a.image, a.chosen + " x", a.masked, a.candidates)
    calls.clear()
    third = ind.induce([a2, b], counting, encoder, 0.9999, out, skp, progress=False)
    assert third["computed"] == 1 and calls == [1]
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert recs["a"]["chosen"] == a2.chosen and recs["a"]["input"] == ind.item_digest(a2)


def _items_for_resume(filler, run_dir):
    items = []
    for i in range(10):
        ranks = [(i + r) % 4 for r in range(3)]
        it = make_item(run_dir, f"s{i:02d}", i % 4, ranks)
        if i % 3 == 1:    # refused at rank 1
            it.chosen = fill_under(filler, run_dir, it, ranks[0])
        if i % 5 == 2:    # refused everywhere: the same image at every rank
            it.candidates = [ind.Candidate(r + 1, it.candidates[0].image, it.candidates[0].path) for r in range(3)]
            it.chosen = fill_under(filler, run_dir, it, ranks[0])
        items.append(it)
    return items


def test_resume_after_interruption_equals_an_uninterrupted_run(filler, encoder, run_dir, tmp_path):
    items = _items_for_resume(filler, run_dir)
    ref_dir, cut_dir, kill_dir = tmp_path / "ref", tmp_path / "cut", tmp_path / "kill"
    kw = dict(tau=0.999, chunk_size=4, signature={"model": "tiny"}, progress=False)
    encoder.clear()  # each run starts from an empty cache, as a new process would
    ind.induce(items, filler, encoder, out_path=ref_dir / "p.jsonl", skipped_path=ref_dir / "s.jsonl", **kw)
    ref_p, ref_s = (ref_dir / "p.jsonl").read_text(), (ref_dir / "s.jsonl").read_text()
    ref_ids = [json.loads(x)["id"] for x in ref_p.splitlines() + ref_s.splitlines()]
    assert sorted(ref_ids) == sorted(it.id for it in items) and ref_s  # every sample once; some skipped

    # 1: the files cut back to a partial state, the last line half written
    cut_dir.mkdir()
    (cut_dir / "p.jsonl").write_text("\n".join(ref_p.splitlines()[:3]) + "\n" + ref_p.splitlines()[3][:25])
    (cut_dir / "s.jsonl").write_text(ref_s.splitlines()[0][:10])
    (cut_dir / "p.settings.json").write_text((ref_dir / "p.settings.json").read_text())
    encoder.clear()
    s = ind.induce(items, filler, encoder, out_path=cut_dir / "p.jsonl", skipped_path=cut_dir / "s.jsonl", **kw)
    assert s["computed"] == len(items) - 3
    assert (cut_dir / "p.jsonl").read_text() == ref_p and (cut_dir / "s.jsonl").read_text() == ref_s

    # 2: a run killed in its second chunk (the fill raises), with a torn line appended, then rerun
    calls = {"n": 0}

    def dying(*a):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt("killed")
        return filler(*a)

    encoder.clear()
    with pytest.raises(KeyboardInterrupt):
        ind.induce(items, dying, encoder, out_path=kill_dir / "p.jsonl", skipped_path=kill_dir / "s.jsonl", **kw)
    partial = read_appended(kill_dir / "p.jsonl") + read_appended(kill_dir / "s.jsonl")
    assert 0 < len(partial) < len(items)
    with open(kill_dir / "p.jsonl", "a") as fh:
        fh.write('{"id": "s09", "prompt": "desc')
    encoder.clear()
    s = ind.induce(items, filler, encoder, out_path=kill_dir / "p.jsonl", skipped_path=kill_dir / "s.jsonl", **kw)
    assert s["computed"] == len(items) - len(partial)
    assert (kill_dir / "p.jsonl").read_text() == ref_p and (kill_dir / "s.jsonl").read_text() == ref_s


def test_preferences_load_with_datasets_and_have_trl_columns(filler, encoder, run_dir, tmp_path):
    from datasets import load_dataset

    items = [make_item(run_dir, f"d{i}", i, [(i + 1) % 4, (i + 2) % 4]) for i in range(4)]
    ind.induce(items, filler, encoder, 0.9999, tmp_path / "preferences.jsonl", tmp_path / "skipped.jsonl",
               progress=False)
    ds = load_dataset("json", data_files=str(tmp_path / "preferences.jsonl"), split="train",
                      cache_dir=str(tmp_path / "hf_cache"))
    assert {"prompt", "chosen", "rejected", "images"} <= set(ds.column_names)
    assert {"retrieved_image", "similarity", "rank", "masked"} <= set(ds.column_names)
    assert len(ds) == 4 and ds[0]["images"] == ["images/img0.png"] and isinstance(ds[0]["similarity"], float)


# -------------------------------------------------------------------------- baseline pair sets
def test_random_swap_changes_only_masked_spans(encoder, run_dir):
    items, masked_records = [], []
    for i, (text, phrases) in enumerate(TEXTS * 2):
        m, spans = mask_words(text, phrases)
        masked_records.append({"id": f"w{i}", "chosen": text, "masked": m, "spans": spans, "backend": "test"})
        items.append(ind.Item(f"w{i}", PROMPT, f"images/img{i % 4}.png", text, m,
                              [ind.Candidate(1, "images/img3.png", img(run_dir, 3))]))
    recs, skipped = comp.random_swap_records(items, masked_records, encoder, seed=0)
    again, _ = comp.random_swap_records(items[::-1], masked_records, encoder, seed=0)
    assert sorted(map(json.dumps, recs)) == sorted(map(json.dumps, again))  # seeded per sample, order-free
    one = comp.random_swap("a red cat .", [{"start": 2, "end": 5, "text": "red"}],
                           {"colour+word": {}, "colour": {"red": 5, "Red": 1, "blue": 1}}, np.random.default_rng(0))
    assert one == "a blue cat ."  # the span's own text (any case) is never drawn
    pool = {}
    for m in masked_records:
        for sp in m["spans"]:
            pool.setdefault(comp.span_kind(sp["text"]), []).append(sp["text"])
    assert recs and len(recs) + len(skipped) == len(items)
    for r in recs:
        assert set(r) == PREF_KEYS - {"input"} and r["rejected"] != r["chosen"] and r["retrieved_image"] == "images/img3.png"
        spans = next(m for m in masked_records if m["id"] == r["id"])["spans"]
        segs, _ = ind.split_masked(r["masked"])
        got = re.fullmatch("".join(re.escape(s) + ("(.+?)" if i < len(spans) else "") for i, s in enumerate(segs)),
                           r["rejected"])
        assert got, r
        for sp, new in zip(spans, got.groups()):
            assert new == sp["text"] or new in pool[comp.span_kind(sp["text"])]


def test_corrupted_image_comparison_has_the_same_format(filler, encoder, run_dir, tmp_path):
    items = [make_item(run_dir, f"c{i}", i, [1]) for i in range(3)]
    citems = comp.corrupted_candidates(items, run_dir, "stage/corrupt", kind="crop", attempts=2, seed=0)
    assert [c.image for c in citems[0].candidates] == ["stage/corrupt/c0_1.png", "stage/corrupt/c0_2.png"]
    s = ind.induce(citems, filler, encoder, 0.9999, tmp_path / "c.jsonl", tmp_path / "cs.jsonl", progress=False)
    recs = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert s["pairs"] == len(recs) == 3
    for r, it in zip(recs, items):
        assert set(r) == PREF_KEYS and r["images"] == [it.image] and r["rank"] == 1
        copy = Image.open(run_dir / r["retrieved_image"])
        assert copy.size == Image.open(run_dir / it.image).size
        assert r["retrieved_image"].startswith("stage/corrupt/")
    assert not (run_dir / "stage/corrupt/c0_2.png").exists()  # copies are made only when tried
