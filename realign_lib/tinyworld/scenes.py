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
This module holds the scenes: the world's vocabulary and priors, :class:`Scene`, sampling and
rendering. The texts and :func:`~realign_lib.tinyworld.world.build_world` are in
:mod:`realign_lib.tinyworld.world`; the benchmark questions on the world's ground truth in
:mod:`realign_lib.tinyworld.benchmarks`.

Everything here is a pure function of a seed; nothing runs at import.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from realign_lib.files import read_jsonl

__all__ = [
    "IMAGE_SIZE", "OBJECTS", "SCENES", "COLOURS", "POSITIONS", "PARTNER", "TYPICAL", "USUAL_COLOUR",
    "POSITION_PHRASE", "NUMBER_WORDS", "ObjectInstance", "Scene", "sample_scene", "sample_scenes", "render_scene",
    "plural", "existence_question", "object_lexicon", "load_annotations", "save_png",
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




def save_png(arr: np.ndarray, path: Path) -> None:
    """Write an image array as PNG atomically (temporary sibling, then rename)."""
    tmp = path.with_name("." + path.name + ".tmp")
    Image.fromarray(arr).save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)



def load_annotations(path: str | os.PathLike) -> list[Scene]:
    return [Scene.from_dict(d) for d in read_jsonl(path)]


def existence_question(obj: str, suffix: str = "") -> str:
    """The yes/no question about an object that POPE, MME and the training data ask."""
    return f"Is there a {obj} in the image?" + (f" {suffix}" if suffix else "")


def object_lexicon() -> dict[str, str]:
    """``word → object type`` for every object name, singular and plural: what CHAIR
    (:mod:`realign_lib.evaluation.runner.chair`) counts as a mention of an object."""
    out = {o: o for o in OBJECTS}
    out.update({plural(o): o for o in OBJECTS})
    return out
