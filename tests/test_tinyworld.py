"""The tiny world: determinism, priors, and the official file layouts it writes."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from realign_lib.evaluation import chair
from realign_lib.evaluation.chair import chair_scores
from realign_lib.files import read_jsonl
from realign_lib.tinyworld import benchmarks as twe
from realign_lib.tinyworld import world as tw
from realign_lib.tinyworld.scenes import PARTNER, TYPICAL, load_annotations, object_lexicon


def mentioned_objects(text):
    """The object types a text names, by the tiny world's object words."""
    return chair.mentioned_objects(text, object_lexicon())


def test_scenes_and_pixels_are_deterministic_per_seed():
    a, b, c = tw.sample_scenes(20, seed=5), tw.sample_scenes(20, seed=5), tw.sample_scenes(20, seed=6)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert [s.to_dict() for s in a] != [s.to_dict() for s in c]
    assert np.array_equal(tw.render_scene(a[0]), tw.render_scene(b[0]))
    img = tw.render_scene(a[0])
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8


def test_world_has_the_promised_variety_and_priors():
    scenes = tw.sample_scenes(3000, seed=1)
    assert len(tw.OBJECTS) >= 12 and len(tw.SCENES) >= 5
    types = Counter(t for s in scenes for t in s.types)
    assert set(types) == set(tw.OBJECTS)
    multi = [s for s in scenes if len(s.objects) >= 2]
    partner_rate = np.mean([s.objects[1].type == tw.PARTNER[s.objects[0].type] for s in multi])
    assert 0.65 < partner_rate < 0.85  # second object is the first one's partner ~75 % of the time
    typical = np.mean([s.objects[0].type in TYPICAL[s.scene] for s in scenes])
    assert typical > 0.75
    radii = [o.radius for s in scenes for o in s.objects]
    opac = [o.opacity for s in scenes for o in s.objects]
    assert min(radii) >= 3.5 and max(radii) <= 10 and min(opac) >= 0.45
    partners = [o for s in scenes for o in s.objects if o.partner_of_first]
    others = [o for s in scenes for o in s.objects if not o.partner_of_first]
    assert np.mean([o.opacity for o in partners]) < np.mean([o.opacity for o in others])  # weaker evidence
    # objects are really drawn: the object's pixels differ from the same scene without it
    s = next(x for x in scenes if x.objects[0].radius > 8 and x.objects[0].opacity > 0.8)
    empty = tw.Scene(id=s.id, scene=s.scene, objects=[], seed=s.seed)
    assert np.abs(tw.render_scene(s).astype(int) - tw.render_scene(empty).astype(int)).max() > 60


def test_description_names_exactly_the_present_objects():
    for s in tw.sample_scenes(300, seed=2):
        text = tw.describe(s)
        assert set(mentioned_objects(text)) == set(s.types), text
        for o in s.objects:
            assert o.colour in text and tw.POSITION_PHRASE[o.position] in text


def test_training_questions_are_balanced_and_true():
    rng = np.random.default_rng(0)
    answers = Counter()
    for s in tw.sample_scenes(200, seed=4):
        for qa in tw.training_questions(s, rng, 4):
            answers[qa["answer"]] += 1
            if qa["question"].startswith("Is there a ") and qa["question"].split()[3] in tw.OBJECTS:
                obj = qa["question"].split()[3]
                assert (obj in s.types) == (qa["answer"] == "yes"), (qa, s.types)
    assert answers["yes"] == answers["no"]


def test_extra_existence_questions_are_balanced_true_and_ask_partners_when_told():
    """existence_per_image turns: half yes (a present object), half no (an absent one); with
    partner_negatives=1 every "no" that can be asks for a present object's absent partner, with 0 none
    is chosen for being one (partners then appear only at the rate of chance)."""
    scenes = tw.sample_scenes(300, seed=5)
    for share in (0.0, 1.0):
        rng = np.random.default_rng(1)
        partner_no = can = 0
        for s in scenes:
            qs = tw.existence_questions(s, rng, 4, partner_negatives=share)
            assert [q["answer"] for q in qs] == ["yes", "no", "yes", "no"]
            for q in qs:
                obj = q["question"].split()[3]
                assert q["question"] == f"Is there a {obj} in the image?" and (obj in s.types) == (q["answer"] == "yes")
                partners = {PARTNER[t] for t in s.types} - set(s.types)
                if q["answer"] == "no" and partners:
                    can += 1
                    partner_no += obj in partners
        assert (partner_no == can) if share == 1.0 else (partner_no < 0.3 * can), (share, partner_no, can)
    rec = tw.llava_record(scenes[0], "x.png", np.random.default_rng(2), 2, n_existence=4)
    assert len(rec["conversations"]) == 2 * (1 + 2 + 4)  # description, 2 mixed yes/no, 4 existence turns
    with pytest.raises(ValueError, match="existence_per_image must be 0-8"):
        tw.WorldConfig(existence_per_image=9)


def test_short_answers_are_true_and_name_what_is_asked():
    rng = np.random.default_rng(1)
    kinds = Counter()
    for s in tw.sample_scenes(200, seed=5):
        for qa in tw.short_answer_questions(s, rng, 4):
            kinds[qa["kind"]] += 1
            q, a = qa["question"], qa["answer"]
            if qa["kind"] == "objects":
                assert set(mentioned_objects(a)) == set(s.types), (q, a)
                assert all(o.colour in a for o in s.objects)
            elif qa["kind"] == "count":
                obj = next(o for o in tw.OBJECTS if tw.plural(o) in q.split())
                n = s.count(obj)
                assert a == (f"there is one {obj} ." if n == 1 else f"there are {tw.NUMBER_WORDS[n]} {tw.plural(obj)} ."), a
            else:
                obj = q.rstrip("?").split()[-1]
                o = next(x for x in s.objects if x.type == obj)
                assert s.count(obj) == 1  # asked only of a type that appears once
                assert a == (f"the {obj} is {o.colour} ." if qa["kind"] == "colour" else
                             f"the {obj} is {tw.POSITION_PHRASE[o.position]} ."), a
    assert set(kinds) == {"objects", "count", "colour", "position"} and min(kinds.values()) > 50
    assert {"what", "colour", "where", "how", "many", "see"} <= set(tw.world_vocabulary(short_answers=True))
    assert "colour" not in tw.world_vocabulary()  # a world without short answers keeps its old vocabulary


def test_world_samples_mix_descriptions_and_short_answers():
    scenes = {s.id: s for s in tw.sample_scenes(300, seed=6, prefix="train_")}
    rng = np.random.default_rng(0)
    records = [tw.llava_record(s, f"{s.id}.png", rng, 2, n_short=1) for s in scenes.values()]
    only_desc = tw.world_samples(records, 250, 0.0)
    assert [s["id"] for s in only_desc] == sorted(scenes)[:250]  # one per image, in id order
    assert all(s["kind"] == "description" and s["prompt"] == tw.DESCRIBE_PROMPT
               and s["chosen"] == tw.describe(scenes[s["id"]]) for s in only_desc)
    only_short = tw.world_samples(records, 250, 1.0)
    assert all(s["kind"] == "short_answer" and "<image>" not in s["prompt"] for s in only_short)
    half = tw.world_samples(records, 300, 0.5, seed=1)
    share = sum(s["kind"] == "short_answer" for s in half) / 300
    assert 0.4 < share < 0.6 and half == tw.world_samples(records, 300, 0.5, seed=1)
    assert half != tw.world_samples(records, 300, 0.5, seed=2)
    with pytest.raises(ValueError, match="short_answer_share"):
        tw.world_samples(records, 10, 1.5)
    without = [tw.llava_record(s, f"{s.id}.png", rng, 2) for s in list(scenes.values())[:5]]  # no short turns
    assert all(s["kind"] == "description" for s in tw.world_samples(without, 5, 0.0))
    with pytest.raises(ValueError, match="short_answers_per_image >= 1"):
        tw.world_samples(without, 5, 0.5)


def test_validation_images_are_disjoint_from_the_test_images(small_world):
    val = load_annotations(small_world["annotations_val"])
    test = load_annotations(small_world["annotations_test"])
    assert len(val) == 40 and all(s.id.startswith("val_") for s in val)
    val_pixels = {np.asarray(Image.open(Path(small_world["val_images"]) / f"{s.id}.png")).tobytes() for s in val}
    test_pixels = {np.asarray(Image.open(Path(small_world["test_images"]) / f"{s.id}.png")).tobytes() for s in test}
    assert len(val_pixels) == 40 and not val_pixels & test_pixels
    for split, path in small_world["pope_val"].items():  # POPE files of their own, on the validation images
        qs = read_jsonl(path)
        assert qs and {q["image"] for q in qs} <= {f"{s.id}.png" for s in val}, split


def test_llava_instruct_layout(small_world):
    data = json.load(open(small_world["train_json"]))
    assert isinstance(data, list) and len(data) == 400
    for rec in data[:50]:
        assert set(rec) == {"id", "image", "conversations"}
        assert (Path(small_world["train_images"]) / rec["image"]).is_file()
        conv = rec["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in conv) == 1


def test_pope_files_official_format_and_sampling(small_world):
    ann = {f"{s.id}.png": s for s in load_annotations(small_world["annotations_test"])}
    partner_share = {}
    for split, path in small_world["pope"].items():
        qs = read_jsonl(path)
        assert all(set(q) == {"question_id", "image", "text", "label"} for q in qs)
        assert len({q["question_id"] for q in qs}) == len(qs)
        assert sum(q["label"] == "yes" for q in qs) * 2 == len(qs)
        for q in qs:
            obj = mentioned_objects(q["text"])[0]
            assert (obj in ann[q["image"]].types) == (q["label"] == "yes")
        negs = [q for q in qs if q["label"] == "no"]
        partner_share[split] = np.mean([tw.PARTNER[mentioned_objects(q["text"])[0]] in ann[q["image"]].types
                                        for q in negs])
    # adversarial negatives are the co-occurring objects: far more partners than random negatives
    assert partner_share["adversarial"] > partner_share["random"] + 0.3
    freq = Counter(small_world["object_frequency"])
    popular_negs = Counter(mentioned_objects(q["text"])[0] for q in read_jsonl(small_world["pope"]["popular"])
                           if q["label"] == "no")
    top = [o for o, _ in freq.most_common(3)]
    assert popular_negs.most_common(1)[0][0] in top


def test_mme_folder_layout(small_world):
    root = Path(small_world["mme_root"])
    assert sorted(p.name for p in root.iterdir()) == sorted(twe.MME_TASKS)
    for task in twe.MME_TASKS:
        txts = sorted((root / task).glob("*.txt"))
        assert len(txts) == 8
        for t in txts:
            assert (root / task / (t.stem + ".png")).is_file()
            lines = t.read_text().splitlines()
            assert len(lines) == 2
            (q1, a1), (q2, a2) = (line.split("\t") for line in lines)
            assert (a1, a2) == ("Yes", "No") and q1.endswith("Please answer yes or no.")


def test_mme_answers_are_true():
    rng = np.random.default_rng(1)
    for s in tw.sample_scenes(100, seed=9):
        qs = twe.mme_questions(s, "color", rng)
        if qs:
            (yes_q, _), (no_q, _) = qs
            colour, obj = yes_q.split()[3], yes_q.split()[4]
            assert any(o.type == obj and o.colour == colour for o in s.objects)
            c2 = no_q.split()[3]
            assert not any(o.type == obj and o.colour == c2 for o in s.objects)


def test_build_world_reuses_a_complete_world(small_world, tmp_path):
    from realign_lib.tinyworld.settings import WorldConfig
    from realign_lib.tinyworld.world import build_world
    again = build_world(small_world["root"], WorldConfig(seed=3, n_train=400, n_test=60, n_mme=8, n_val=40))
    assert again == small_world
    with pytest.raises(ValueError, match="n_train"):
        WorldConfig(n_train=0)


def test_caption_hallucination_counts():
    s = tw.Scene(id="x_000001", scene="night", seed=0, objects=[
        tw.ObjectInstance("star", "yellow", "left", 5, 1)])
    m = chair_scores(["a yellow star and a white moon .", "a star ."], [s.types, s.types], object_lexicon(), PARTNER)
    assert m["chair_i"] == pytest.approx(1 / 3) and m["chair_s"] == 0.5 and m["recall"] == 1.0
    assert m["partner_share"] == 1.0


def test_parallel_rendering_gives_the_same_world(tmp_path):
    from realign_lib.tinyworld.settings import WorldConfig
    from realign_lib.tinyworld.world import build_world
    cfg = WorldConfig(seed=11, n_train=1100, n_test=10, n_mme=2)
    a = build_world(tmp_path / "a", cfg, workers=1)
    b = build_world(tmp_path / "b", cfg, workers=2)
    assert open(a["train_json"]).read() == open(b["train_json"]).read()
    for name in ("train_000000.png", "train_000777.png", "train_001099.png"):
        pa = np.asarray(Image.open(Path(a["train_images"]) / name))
        pb = np.asarray(Image.open(Path(b["train_images"]) / name))
        assert np.array_equal(pa, pb)


def test_another_world_into_the_same_folder_is_built_whole_not_mixed(tmp_path):
    """`--set seed=1` on an existing run folder: every image and label is the new world's, equal to a
    clean build, none left from the old one."""
    import numpy as np
    from PIL import Image

    from realign_lib.tinyworld.settings import WorldConfig
    from realign_lib.tinyworld.world import build_world

    small = dict(n_train=40, n_test=12, n_mme=2)
    build_world(tmp_path / "w", WorldConfig(seed=3, **small), workers=1)
    again = build_world(tmp_path / "w", WorldConfig(seed=4, **small), workers=1)
    clean = build_world(tmp_path / "clean", WorldConfig(seed=4, **small), workers=1)
    assert again["config"]["seed"] == 4
    for sub in ("train_images", "test_images"):
        names = sorted(p.name for p in (tmp_path / "w" / sub).glob("*.png"))
        assert names == sorted(p.name for p in (tmp_path / "clean" / sub).glob("*.png"))
        for name in names:
            assert np.array_equal(np.asarray(Image.open(tmp_path / "w" / sub / name)),
                                  np.asarray(Image.open(tmp_path / "clean" / sub / name))), (sub, name)
    for name in ("llava_instruct_tiny.json", "annotations_train.jsonl", "annotations_test.jsonl"):
        assert (tmp_path / "w" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    assert not (tmp_path / "w" / ".building.json").exists() and clean["object_frequency"] == again["object_frequency"]


def test_a_moved_world_reads_its_own_files_not_its_old_place(tmp_path):
    """world.json keeps paths relative to its folder: rename runs/A to runs/B and build another world at
    runs/A, and B's summary still points into B (before, at A's new files: another world's images)."""
    import json
    import shutil

    from realign_lib.tinyworld.settings import WorldConfig
    from realign_lib.tinyworld.world import build_world

    small = dict(n_train=30, n_test=10, n_mme=2, n_val=6)
    a, b = tmp_path / "A" / "world", tmp_path / "B" / "world"
    build_world(a, WorldConfig(seed=3, **small), workers=1)
    shutil.move(tmp_path / "A", tmp_path / "B")
    build_world(a, WorldConfig(seed=4, **small), workers=1)  # another world where B used to be
    moved = build_world(b, WorldConfig(seed=3, **small), workers=1)  # nothing rebuilt: world.json is there
    for key in ("root", "train_json", "train_images", "test_images", "annotations_train", "mme_root"):
        assert Path(moved[key]).is_relative_to(b.resolve()) and Path(moved[key]).exists(), key
    assert all(Path(f).is_relative_to(b.resolve()) for f in list(moved["pope"].values()) + list(moved["pope_val"].values()))
    stored = json.loads((b / "world.json").read_text())
    assert stored["train_images"] == "train_images" and not any(
        str(tmp_path) in json.dumps(v) for k, v in stored.items() if k != "config")  # no absolute path inside
