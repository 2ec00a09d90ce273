"""The tiny world: seeded synthetic scenes that make the whole method run offline in minutes.

A scene is a textured, noisy background (one of five *scenes*) with distractor blobs and one to
three objects of twelve types, each with a colour, a position, a size and an opacity. The world
has the two things that make real VLMs hallucinate:

* **co-occurrence priors** — every scene has typical objects, and a second object is the first
  one's *partner* most of the time (moon↔star, fish↔boat, car↔house, …);
* **weak evidence** — objects are 3.5–10 px in radius at opacity 0.45–1 on a 64×64 image, and a
  partner object is more often small and faint.

Ground truth per image (:class:`Scene`) drives the detailed descriptions, yes/no questions, the
LLaVA-Instruct-150K style training file, the POPE question files (random / popular / adversarial
negatives sampled as POPE does) and the MME-style folders (existence, count, position, color).
This module holds the world — scenes, rendering, texts, :func:`build_world`; the benchmark
questions and the hallucination metrics on the world's ground truth are in
:mod:`realign_lib.tinyworld_eval`. The prompts come from :mod:`realign_lib.prompts`.

Everything here is a pure function of a seed; nothing runs at import.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .files import read_jsonl, write_json, write_jsonl
from .prompts import DESCRIBE_PROMPT, FIXED_PROMPTS, LMMS_EVAL_SUFFIX, MME_SUFFIX

__all__ = [
    "OBJECTS", "SCENES", "COLOURS", "POSITIONS", "PARTNER", "TYPICAL", "USUAL_COLOUR",
    "ObjectInstance", "Scene", "sample_scene", "sample_scenes", "render_scene", "describe",
    "plural", "existence_question", "training_questions", "short_answer_questions", "SHORT_QUESTIONS",
    "llava_record", "world_samples",
    "WorldConfig", "build_world", "load_annotations", "world_vocabulary", "span_lexicon", "save_png",
]

IMAGE_SIZE = 64

OBJECTS: tuple[str, ...] = (
    "star", "moon", "fish", "boat", "car", "house", "tree", "flower", "ball", "kite", "bird", "cloud",
)
# each object's partner: a second object is the first one's partner most of the time
PARTNER: dict[str, str] = {}
for _a, _b in [("star", "moon"), ("fish", "boat"), ("car", "house"), ("tree", "flower"),
               ("ball", "kite"), ("bird", "cloud")]:
    PARTNER[_a], PARTNER[_b] = _b, _a

SCENES: dict[str, tuple[int, int, int]] = {  # base background colour
    "night": (22, 26, 62),
    "sea": (38, 104, 164),
    "field": (72, 136, 58),
    "street": (108, 108, 112),
    "beach": (214, 194, 138),
}
TYPICAL: dict[str, tuple[str, ...]] = {
    "night": ("star", "moon", "cloud", "bird"),
    "sea": ("fish", "boat", "bird", "cloud"),
    "field": ("tree", "flower", "house", "kite"),
    "street": ("car", "house", "tree", "ball"),
    "beach": ("ball", "kite", "boat", "bird"),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (222, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 90, 235),
    "yellow": (245, 222, 40),
    "white": (245, 245, 245),
    "purple": (160, 60, 210),
}
USUAL_COLOUR: dict[str, str] = {
    "star": "yellow", "moon": "white", "fish": "red", "boat": "white", "car": "blue", "house": "red",
    "tree": "green", "flower": "purple", "ball": "red", "kite": "yellow", "bird": "blue", "cloud": "white",
}
POSITIONS: dict[str, tuple[float, float]] = {  # (x, y) centre of each region
    "left": (14.0, 32.0), "right": (50.0, 32.0), "top": (32.0, 13.0), "bottom": (32.0, 51.0),
    "center": (32.0, 32.0),
}
POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top",
                   "bottom": "at the bottom", "center": "in the center"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
PLURAL = {"fish": "fish"}


def plural(obj: str) -> str:
    return PLURAL.get(obj, obj + "s")


@dataclass
class ObjectInstance:
    """One object in a scene. ``radius`` in pixels, ``opacity`` in [0, 1]."""

    type: str
    colour: str
    position: str
    radius: float
    opacity: float
    partner_of_first: bool = False

    @property
    def size_word(self) -> str:
        return "small" if self.radius < 5.5 else ("big" if self.radius > 8.5 else "")


@dataclass
class Scene:
    """Ground truth of one image."""

    id: str
    scene: str
    objects: list[ObjectInstance]
    seed: int
    template: int = 0

    @property
    def types(self) -> list[str]:
        """Distinct object types present, in order of first appearance."""
        return list(dict.fromkeys(o.type for o in self.objects))

    def count(self, obj: str) -> int:
        return sum(o.type == obj for o in self.objects)

    def to_dict(self) -> dict:
        return {"id": self.id, "scene": self.scene, "seed": self.seed, "template": self.template,
                "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(id=d["id"], scene=d["scene"], seed=d["seed"], template=d.get("template", 0),
                   objects=[ObjectInstance(**o) for o in d["objects"]])


# --------------------------------------------------------------------------------------- sampling
def sample_scene(rng: np.random.Generator, scene_id: str, seed: int = 0) -> Scene:
    """Sample one scene with the world's priors (see module docstring)."""
    scene = str(rng.choice(list(SCENES)))
    n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    types: list[str] = []
    partner_flags: list[bool] = []
    for i in range(n):
        is_partner = False
        if i == 0:
            t = str(rng.choice(TYPICAL[scene])) if rng.random() < 0.8 else str(rng.choice(OBJECTS))
        elif i == 1 and rng.random() < 0.75:
            t, is_partner = PARTNER[types[0]], True
        elif rng.random() < 0.1:
            t = types[0]  # a second instance of the same type (counting questions)
        else:
            pool = [o for o in (TYPICAL[scene] if rng.random() < 0.5 else OBJECTS) if o not in types]
            t = str(rng.choice(pool or list(OBJECTS)))
        types.append(t)
        partner_flags.append(is_partner)
    positions = rng.permutation(list(POSITIONS))[:n]
    objects = []
    for t, pos, is_partner in zip(types, positions, partner_flags):
        if rng.random() < 0.6:
            colour = USUAL_COLOUR[t]
        else:
            colour = str(rng.choice([c for c in COLOURS if c != USUAL_COLOUR[t]]))
        if is_partner and rng.random() < 0.5:  # partners are more often weak evidence
            radius, opacity = rng.uniform(3.5, 6.0), rng.uniform(0.45, 0.7)
        else:
            radius, opacity = rng.uniform(3.5, 10.0), rng.uniform(0.45, 1.0)
        objects.append(ObjectInstance(t, colour, str(pos), round(float(radius), 2),
                                      round(float(opacity), 2), is_partner))
    return Scene(id=scene_id, scene=scene, objects=objects, seed=seed, template=int(rng.integers(3)))


def sample_scenes(n: int, seed: int, prefix: str = "") -> list[Scene]:
    """``n`` scenes; scene ``i`` depends only on ``(seed, i)`` so subsets are reproducible."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        out.append(sample_scene(rng, f"{prefix}{i:06d}", seed=seed))
    return out


# -------------------------------------------------------------------------------------- rendering
def _star(cx, cy, r, points=5):
    pts = []
    for k in range(2 * points):
        rr = r if k % 2 == 0 else r * 0.45
        a = -math.pi / 2 + k * math.pi / points
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _draw_shape(d: ImageDraw.ImageDraw, t: str, cx: float, cy: float, r: float) -> None:
    """Draw object ``t`` as a filled 255 mask centred at (cx, cy) with radius ``r``."""
    e = lambda x0, y0, x1, y1, fill=255: d.ellipse([x0, y0, x1, y1], fill=fill)  # noqa: E731
    if t == "ball":
        e(cx - r, cy - r, cx + r, cy + r)
    elif t == "star":
        d.polygon(_star(cx, cy, r), fill=255)
    elif t == "moon":
        e(cx - r, cy - r, cx + r, cy + r)
        e(cx - r * 0.35, cy - r * 1.05, cx + r * 1.5, cy + r * 0.75, fill=0)
    elif t == "fish":
        e(cx - r, cy - r * 0.5, cx + r * 0.5, cy + r * 0.5)
        d.polygon([(cx + r * 0.3, cy), (cx + r, cy - r * 0.6), (cx + r, cy + r * 0.6)], fill=255)
    elif t == "boat":
        d.polygon([(cx - r, cy + r * 0.1), (cx + r, cy + r * 0.1), (cx + r * 0.6, cy + r * 0.7),
                   (cx - r * 0.6, cy + r * 0.7)], fill=255)
        d.polygon([(cx - r * 0.05, cy - r), (cx - r * 0.05, cy), (cx - r * 0.7, cy)], fill=255)
    elif t == "car":
        d.rectangle([cx - r, cy - r * 0.1, cx + r, cy + r * 0.45], fill=255)
        d.rectangle([cx - r * 0.5, cy - r * 0.55, cx + r * 0.4, cy - r * 0.1], fill=255)
        e(cx - r * 0.8, cy + r * 0.3, cx - r * 0.3, cy + r * 0.8)
        e(cx + r * 0.3, cy + r * 0.3, cx + r * 0.8, cy + r * 0.8)
    elif t == "house":
        d.rectangle([cx - r * 0.75, cy - r * 0.1, cx + r * 0.75, cy + r], fill=255)
        d.polygon([(cx - r, cy - r * 0.1), (cx + r, cy - r * 0.1), (cx, cy - r)], fill=255)
    elif t == "tree":
        d.polygon([(cx, cy - r), (cx + r * 0.75, cy + r * 0.45), (cx - r * 0.75, cy + r * 0.45)], fill=255)
        d.rectangle([cx - r * 0.15, cy + r * 0.45, cx + r * 0.15, cy + r], fill=255)
    elif t == "flower":
        for k in range(5):
            a = k * 2 * math.pi / 5
            px, py = cx + r * 0.55 * math.cos(a), cy + r * 0.55 * math.sin(a)
            e(px - r * 0.42, py - r * 0.42, px + r * 0.42, py + r * 0.42)
    elif t == "kite":
        d.polygon([(cx, cy - r), (cx + r * 0.6, cy - r * 0.1), (cx, cy + r * 0.7), (cx - r * 0.6, cy - r * 0.1)],
                  fill=255)
        d.line([(cx, cy + r * 0.7), (cx + r * 0.3, cy + r)], fill=255, width=1)
    elif t == "bird":
        w = max(1, int(round(r * 0.3)))
        d.line([(cx - r, cy - r * 0.5), (cx, cy + r * 0.3), (cx + r, cy - r * 0.5)], fill=255, width=w)
    elif t == "cloud":
        for dx, rr in [(-0.55, 0.45), (0.0, 0.6), (0.55, 0.45)]:
            e(cx + dx * r - rr * r, cy - rr * r, cx + dx * r + rr * r, cy + rr * r)
    else:
        raise ValueError(f"unknown object type {t!r}; known: {', '.join(OBJECTS)}")


def render_scene(s: Scene) -> np.ndarray:
    """Render a scene to a ``(64, 64, 3)`` uint8 RGB array (deterministic given ``s``)."""
    rng = np.random.default_rng([s.seed, 7919, int(s.id.split("_")[-1]) if s.id.split("_")[-1].isdigit() else 0])
    base = np.array(SCENES[s.scene], dtype=np.float32)
    # low-frequency texture: coarse noise upsampled, plus per-pixel noise
    coarse = rng.normal(0, 14, size=(8, 8, 3)).astype(np.float32)
    texture = np.kron(coarse, np.ones((8, 8, 1), dtype=np.float32))
    img = base + texture + rng.normal(0, 8, size=(IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    # distractor blobs: soft ellipses in shifted background colours
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    d = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 5))):
        x, y = rng.uniform(0, IMAGE_SIZE, 2)
        rx, ry = rng.uniform(2, 6, 2)
        d.ellipse([x - rx, y - ry, x + rx, y + ry], fill=int(rng.integers(60, 160)))
    blob = np.asarray(canvas, dtype=np.float32)[..., None] / 255.0
    shift = rng.normal(0, 35, size=3).astype(np.float32)
    img = img + blob * shift
    for o in s.objects:
        canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        cx, cy = POSITIONS[o.position]
        cx += rng.uniform(-3, 3)
        cy += rng.uniform(-3, 3)
        _draw_shape(ImageDraw.Draw(canvas), o.type, cx, cy, o.radius)
        alpha = np.asarray(canvas, dtype=np.float32)[..., None] / 255.0 * o.opacity
        colour = np.array(COLOURS[o.colour], dtype=np.float32) + rng.normal(0, 10, size=3)
        img = img * (1 - alpha) + colour * alpha
    return np.clip(img, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------- text
_INTROS = ("in this {scene} scene there is", "this picture shows a {scene} scene with",
           "the image shows a {scene} background with")
_REL = {("left", "right"): "to the left of", ("right", "left"): "to the right of",
        ("top", "bottom"): "above", ("bottom", "top"): "below",
        ("top", "center"): "above", ("center", "top"): "below",
        ("bottom", "center"): "below", ("center", "bottom"): "above",
        ("left", "center"): "to the left of", ("center", "left"): "to the right of",
        ("right", "center"): "to the right of", ("center", "right"): "to the left of"}


def _phrase(o: ObjectInstance) -> str:
    words = ["a", o.size_word, o.colour, o.type, POSITION_PHRASE[o.position]]
    return " ".join(w for w in words if w)


def _listing(phrases: Sequence[str]) -> str:
    """``"a , b and c"`` (the world's spaced punctuation)."""
    return phrases[0] if len(phrases) == 1 else " , ".join(phrases[:-1]) + " and " + phrases[-1]


def describe(s: Scene) -> str:
    """A detailed description naming every object with size, colour, position, plus a relation.

    Example: ``"in this night scene there is a big yellow star on the left and a small white moon
    at the top . the star is to the left of the moon ."`` (lower case, punctuation spaced).
    """
    text = f"{_INTROS[s.template].format(scene=s.scene)} {_listing([_phrase(o) for o in s.objects])} ."
    if len(s.objects) >= 2:
        a, b = s.objects[0], s.objects[1]
        rel = _REL.get((a.position, b.position))
        if rel and a.type != b.type:
            text += f" the {a.type} is {rel} the {b.type} ."
    return text


def _yn(q: str, yes: bool) -> dict:
    return {"question": q, "answer": "yes" if yes else "no"}


def existence_question(obj: str, suffix: str = "") -> str:
    return f"Is there a {obj} in the image?" + (f" {suffix}" if suffix else "")


def training_questions(s: Scene, rng: np.random.Generator, n: int = 4) -> list[dict]:
    """Balanced yes/no questions of four kinds (existence, colour, count, position).

    Negatives for existence are *uniformly random* absent objects, as in ordinary instruction data;
    the world's priors, not the questions, are what later make partners hallucination-prone.
    """
    out: list[dict] = []
    present = s.types
    absent = [o for o in OBJECTS if o not in present]
    for k in range(n):
        yes = k % 2 == 0
        kind = str(rng.choice(["existence", "existence", "colour", "count", "position"]))
        obj = s.objects[int(rng.integers(len(s.objects)))]
        if kind == "existence":
            q = existence_question(obj.type if yes else str(rng.choice(absent)))
        elif kind == "colour":
            c = obj.colour if yes else str(rng.choice([c for c in COLOURS if c not in
                                                       {o.colour for o in s.objects if o.type == obj.type}]))
            q = f"Is there a {c} {obj.type} in the image?"
        elif kind == "count":
            true = s.count(obj.type)
            num = true if yes else (true + 1 if true == 1 or rng.random() < 0.5 else true - 1)
            q = f"Is there one {obj.type} in the image?" if num == 1 else \
                f"Are there {NUMBER_WORDS[num]} {plural(obj.type)} in the image?"
        else:
            taken = {o.position for o in s.objects if o.type == obj.type}
            pos = obj.position if yes else str(rng.choice([p for p in POSITIONS if p not in taken]))
            q = f"Is the {obj.type} {POSITION_PHRASE[pos]} of the image?"
            if pos == "center":
                q = f"Is the {obj.type} in the center of the image?"
        suffix = str(rng.choice(["", MME_SUFFIX, LMMS_EVAL_SUFFIX]))
        out.append(_yn(q + (f" {suffix}" if suffix else ""), yes))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


#: the short-answer questions of the tiny world (paper, Appendix C: QA pairs beside detailed descriptions)
SHORT_QUESTIONS = {
    "objects": "What objects can you see in the image?",
    "colour": "What colour is the {obj}?",
    "position": "Where is the {obj}?",
    "count": "How many {objs} are there in the image?",
}


def _short_phrase(o: ObjectInstance) -> str:
    return " ".join(w for w in ("a", o.size_word, o.colour, o.type) if w)


def short_answer_questions(s: Scene, rng: np.random.Generator, n: int = 1) -> list[dict]:
    """``n`` short-answer questions about ``s`` with answers that name objects, attributes, counts
    and positions, in the world's lower-case style (``{"kind", "question", "answer"}``):

    * objects — "What objects can you see in the image?" → "there is a red kite and a small boat ."
    * colour — "What colour is the bird?" → "the bird is blue ."
    * position — "Where is the boat?" → "the boat is on the left ."
    * count — "How many stars are there in the image?" → "there are two stars ."

    Colour and position are asked only of an object type that appears once. Kinds are drawn
    uniformly among those that fit, without repeats.
    """
    single = [o for o in s.objects if s.count(o.type) == 1]
    kinds = ["objects", "count"] + (["colour", "position"] if single else [])
    out = []
    for kind in [kinds[i] for i in rng.permutation(len(kinds))][:n]:
        if kind == "objects":
            q, a = SHORT_QUESTIONS["objects"], f"there is {_listing([_short_phrase(o) for o in s.objects])} ."
        elif kind == "count":
            t = s.objects[int(rng.integers(len(s.objects)))].type
            k = s.count(t)
            q = SHORT_QUESTIONS["count"].format(objs=plural(t))
            a = f"there is one {t} ." if k == 1 else f"there are {NUMBER_WORDS[k]} {plural(t)} ."
        else:
            o = single[int(rng.integers(len(single)))]
            q = SHORT_QUESTIONS[kind].format(obj=o.type)
            a = f"the {o.type} is {o.colour} ." if kind == "colour" else f"the {o.type} is {POSITION_PHRASE[o.position]} ."
        out.append({"kind": kind, "question": q, "answer": a})
    return out


def llava_record(s: Scene, image_file: str, rng: np.random.Generator, n_questions: int = 4,
                 n_short: int = 0) -> dict:
    """One LLaVA-Instruct-150K record: a detailed description turn, then ``n_short`` short-answer
    turns (:func:`short_answer_questions`) and ``n_questions`` yes/no turns."""
    conv = [{"from": "human", "value": f"<image>\n{DESCRIBE_PROMPT}"}, {"from": "gpt", "value": describe(s)}]
    for qa in short_answer_questions(s, rng, n_short) if n_short else []:
        conv += [{"from": "human", "value": qa["question"]}, {"from": "gpt", "value": qa["answer"]}]
    for qa in training_questions(s, rng, n_questions):
        conv.append({"from": "human", "value": qa["question"]})
        conv.append({"from": "gpt", "value": "Yes." if qa["answer"] == "yes" else "No."})
    # present the question turns before the description half of the time, as LLaVA data mixes turns
    if rng.random() < 0.5 and (n_questions or n_short):
        qa_turns = conv[2:]
        first_q = dict(qa_turns[0])
        first_q["value"] = "<image>\n" + first_q["value"]
        desc = [{"from": "human", "value": DESCRIBE_PROMPT}, conv[1]]
        conv = [first_q] + qa_turns[1:] + desc
    return {"id": s.id, "image": image_file, "conversations": conv}


def world_samples(records: Sequence[dict], n_samples: int, short_answer_share: float = 0.0,
                  seed: int = 0) -> list[dict]:
    """Samples for stages 01-03 from LLaVA-Instruct records of the world, one per image: the first
    ``n_samples`` images in id order; each gives its short-answer exchange (the first one, e.g.
    "Where is the boat?" → "the boat is on the left .") with probability ``short_answer_share``
    (seeded), else its detailed description. A sample is ``{"id", "image", "prompt", "chosen",
    "kind"}`` with ``kind`` ``"description"`` or ``"short_answer"``; prompts carry no ``<image>``."""
    if not 0.0 <= short_answer_share <= 1.0:
        raise ValueError(f"short_answer_share={short_answer_share}: must be in [0, 1]")
    short_prompts = {q.split("{")[0] for q in SHORT_QUESTIONS.values()}
    rng = np.random.default_rng([seed, 17])
    out = []
    for rec in sorted(records, key=lambda r: str(r["id"]))[:n_samples]:
        turns = rec["conversations"]
        pairs = [(turns[i]["value"].replace("<image>", "").strip(), turns[i + 1]["value"])
                 for i in range(0, len(turns) - 1, 2)]
        desc = [(q, a) for q, a in pairs if q == DESCRIBE_PROMPT]
        short = [(q, a) for q, a in pairs if any(q.startswith(p) for p in short_prompts)]
        if short_answer_share > 0 and not short:
            raise ValueError(f"record {rec['id']!r} has no short-answer exchange: short_answer_share="
                             f"{short_answer_share} needs a world built with short_answers_per_image >= 1")
        use_short = rng.random() < short_answer_share
        if not desc and not use_short:
            raise ValueError(f"record {rec['id']!r} has no detailed-description exchange")
        (q, a), kind = (short[0], "short_answer") if use_short else (desc[0], "description")
        out.append({"id": str(rec["id"]), "image": rec["image"], "prompt": q, "chosen": a, "kind": kind})
    return out


# ------------------------------------------------------------------------------------ the world
@dataclass
class WorldConfig:
    """Sizes and seed of a tiny world."""

    seed: int = 0                 # world seed; train, test and MME scenes use disjoint sub-seeds
    n_train: int = 20000          # training images (LLaVA-Instruct layout)
    n_test: int = 1000            # held-out images for POPE
    n_mme: int = 30               # images per MME subtask (MME itself has 30-60)
    questions_per_image: int = 2  # yes/no turns per training conversation
    short_answers_per_image: int = 0  # short-answer turns ("where is the boat?") per training conversation
    n_val: int = 500              # validation images (POPE, CHAIR) for choosing a recipe; disjoint from test

    def __post_init__(self):
        if not isinstance(self.short_answers_per_image, int) or not 0 <= self.short_answers_per_image <= 4:
            raise ValueError(f"WorldConfig.short_answers_per_image must be 0-4, got {self.short_answers_per_image!r}")
        for name in ("n_train", "n_test", "n_mme", "n_val"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"WorldConfig.{name} must be a positive integer, got {v!r}")


def save_png(arr: np.ndarray, path: Path) -> None:
    """Write an image array as PNG atomically (temporary sibling, then rename)."""
    tmp = path.with_name("." + path.name + ".tmp")
    Image.fromarray(arr).save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)


def _render_chunk(args) -> int:
    scenes, folder = args
    for s in scenes:
        p = Path(folder) / f"{s.id}.png"
        if not p.exists():
            save_png(render_scene(s), p)
    return len(scenes)


def _render_all(scenes: Sequence[Scene], folder: Path, progress: bool, workers: int) -> None:
    """Render and save every scene not already on disk, in ``workers`` processes (same pixels)."""
    from tqdm.auto import tqdm

    chunks = [(list(scenes[i:i + 500]), str(folder)) for i in range(0, len(scenes), 500)]
    bar = tqdm(total=len(scenes), desc=folder.name, disable=not progress, mininterval=2)
    if workers > 1 and len(chunks) > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(workers) as pool:
            for n in pool.imap_unordered(_render_chunk, chunks):
                bar.update(n)
    else:
        for c in chunks:
            bar.update(_render_chunk(c))
    bar.close()


def build_world(out_dir: str | os.PathLike, cfg: WorldConfig = WorldConfig(), progress: bool = False,
                workers: int | None = None) -> dict:
    """Generate the tiny world into ``out_dir`` and return a summary with its file paths.

    Layout (official formats where one exists)::

        out_dir/train_images/train_000000.png ...     training images
        out_dir/llava_instruct_tiny.json              LLaVA-Instruct-150K layout
        out_dir/annotations_{train,test}.jsonl        ground truth (scene, objects)
        out_dir/test_images/test_000000.png ...       POPE images
        out_dir/pope/tiny_pope_{random,popular,adversarial}.json   official POPE question format
        out_dir/val_images/val_000000.png ...         validation images (choosing a recipe), and
        out_dir/annotations_val.jsonl, out_dir/pope_val/tiny_pope_*.json   their ground truth and POPE
        out_dir/MME/{existence,count,position,color}/<image>.png + <image>.txt

    Images already on disk are reused when they were made for the same config, so a killed build
    resumes cheaply; a folder holding another world (another seed or size) is emptied and built
    again, never mixed. The summary ``world.json`` is written last, so its presence marks a
    complete world. ``workers``: rendering processes (default: the CPU count); the pixels do not
    depend on it.
    """
    from .files import read_json
    from .tinyworld_eval import object_statistics, write_mme_folders, write_pope_files

    workers = workers if workers is not None else (os.cpu_count() or 1)
    out = Path(out_dir)
    done, building = out / "world.json", out / ".building.json"
    finished = read_json(done) if done.is_file() else None
    if finished is not None and finished.get("config") == asdict(cfg):
        return finished
    before = read_json(building) if building.is_file() else finished
    if before is not None and before.get("config") != asdict(cfg):
        _clear_world(out)  # another world's files: images would not match the new labels
    elif before is None and any((out / "train_images").glob("*.png")):
        _clear_world(out)  # images of unknown origin (a world from before this marker existed)
    out.mkdir(parents=True, exist_ok=True)
    write_json(building, {"config": asdict(cfg)})
    for sub in ("train_images", "test_images", "val_images", "pope", "pope_val", "MME"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    train = sample_scenes(cfg.n_train, seed=cfg.seed * 1000 + 1, prefix="train_")
    test = sample_scenes(cfg.n_test, seed=cfg.seed * 1000 + 2, prefix="test_")
    val = sample_scenes(cfg.n_val, seed=cfg.seed * 1000 + 3, prefix="val_")
    rng = np.random.default_rng([cfg.seed, 99])
    records = []
    _render_all(train, out / "train_images", progress, workers)
    for s in train:
        records.append(llava_record(s, f"{s.id}.png", rng, cfg.questions_per_image, cfg.short_answers_per_image))
    write_json(out / "llava_instruct_tiny.json", records, indent=None)
    write_jsonl(out / "annotations_train.jsonl", [s.to_dict() for s in train])
    _render_all(test, out / "test_images", progress, workers)
    test_files = [f"{s.id}.png" for s in test]
    write_jsonl(out / "annotations_test.jsonl", [s.to_dict() for s in test])
    pope_files = write_pope_files(out / "pope", test, test_files, train, cfg.seed)
    _render_all(val, out / "val_images", progress, workers)  # for choosing a recipe; test stays for reporting
    write_jsonl(out / "annotations_val.jsonl", [s.to_dict() for s in val])
    pope_val = write_pope_files(out / "pope_val", val, [f"{s.id}.png" for s in val], train, cfg.seed + 1)
    mme_counts = write_mme_folders(out, cfg.seed, cfg.n_mme)
    freq, co = object_statistics(train)
    summary = {
        "config": asdict(cfg),
        "root": str(out),
        "train_json": str(out / "llava_instruct_tiny.json"),
        "train_images": str(out / "train_images"),
        "test_images": str(out / "test_images"),
        "annotations_train": str(out / "annotations_train.jsonl"),
        "annotations_test": str(out / "annotations_test.jsonl"),
        "pope": pope_files,
        "val_images": str(out / "val_images"),
        "annotations_val": str(out / "annotations_val.jsonl"),
        "pope_val": pope_val,
        "mme_root": str(out / "MME"),
        "mme_images_per_task": mme_counts,
        "object_frequency": dict(freq.most_common()),
        "partner_cooccurrence": {a: round(co[a][PARTNER[a]] / max(freq[a], 1), 3) for a in OBJECTS},
    }
    write_json(done, summary)
    building.unlink(missing_ok=True)
    return summary


def _clear_world(out: Path) -> None:
    """Remove every file a world build writes under ``out`` (nothing else)."""
    import shutil

    for sub in ("train_images", "test_images", "val_images", "pope", "pope_val", "MME"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for name in ("world.json", "llava_instruct_tiny.json", "annotations_train.jsonl", "annotations_test.jsonl",
                 "annotations_val.jsonl"):
        (out / name).unlink(missing_ok=True)


def load_annotations(path: str | os.PathLike) -> list[Scene]:
    return [Scene.from_dict(d) for d in read_jsonl(path)]


def world_vocabulary(short_answers: bool = False) -> list[str]:
    """Every word the world's texts and the kit's fixed prompts can contain (lower-cased);
    ``short_answers``: also the words of :data:`SHORT_QUESTIONS` (a world with short-answer turns)."""
    import re

    words: set[str] = set()
    texts: list[str] = list(FIXED_PROMPTS)
    texts += [i.format(scene=sc) for i in _INTROS for sc in SCENES]
    texts += list(POSITION_PHRASE.values()) + list(_REL.values())
    texts += list(OBJECTS) + [plural(o) for o in OBJECTS] + list(COLOURS) + list(NUMBER_WORDS.values())
    texts += [q.format(obj="", objs="") for q in SHORT_QUESTIONS.values()] if short_answers else []
    texts += ["a the is there are in of image this and , . ? yes no small big not",
              "Is there a in the image? Are there Is the of the image? Yes. No.",
              "Is there one in this image?"]
    for t in texts:
        words.update(re.findall(r"\[MASK\]|\w+|[^\w\s]", t.lower()))
    return sorted(words)


def span_lexicon() -> dict[str, str]:
    """The world's words by kind, for the random-swap comparison
    (:func:`realign_lib.comparisons.span_kind`): ``object`` / ``objects`` (plural), ``colour``,
    ``size``, ``position``, ``relation``, ``scene`` and ``number``."""
    lex = {o: "object" for o in OBJECTS} | {plural(o): "objects" for o in OBJECTS}
    lex |= {c: "colour" for c in COLOURS} | {"small": "size", "big": "size"}
    lex |= {p: "position" for p in POSITION_PHRASE} | {"above": "relation", "below": "relation"}
    lex |= {s: "scene" for s in SCENES} | {w: "number" for w in NUMBER_WORDS.values()}
    return lex
