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
# Evaluates the base model and every trained run of stage 04 (or those named in `runs`) with
#
# * **POPE** — the official question files (`*_random.json`, `*_popular.json`, `*_adversarial.json`),
#   greedy answers written as JSON lines keyed by `question_id`, scored as POPE's `evaluate.py` does
#   (`realign_lib.pope`); on the tiny world also the yes-rate for an absent *partner* object, the
#   hallucination the world is built to provoke;
# * **MME** — MME's folder layout; the result files `<subtask>.txt` (`image⇥question⇥gt⇥prediction`,
#   an image's two questions on consecutive lines) are written so MME's own `calculation.py` can score
#   them, and scored here by the same rule (acc·100 + acc+·100 per subtask); plus the share of answers
#   in the bare yes/no format (`realign_lib.evaluation`);
# * **CHAIR** on the tiny world — descriptions of held-out images: share of named objects that are
#   absent (`chair_i`), of descriptions with one or more (`chair_s`), and object recall.
#
# Then it compares conditions. A run named `<condition>_seed<k>` (stage 04's default `rdpo_seed0`)
# belongs to `<condition>`; the table gives mean ± sd over seeds, and differences against the base
# model (and rDPO against DPO) are paired by seed: a difference counts as *clear* only when every
# seed agrees in sign and the mean exceeds twice its standard error.
#
# The tiny world has two sets of held-out images: `eval_split = "validation"` evaluates on the
# validation images, where a recipe (learning rate, β, pairs seen, …) is chosen; the default `"test"`
# evaluates on the test images, whose figures are the ones reported — once, for the chosen recipe.
#
# On a GPU machine point it at real data: `pope_dir` (the official COCO POPE files), `image_root`
# (COCO val2014), `mme_root` (the MME benchmark folder) and `model_path` (e.g. a LLaVA-1.5 folder);
# the trained adapters of stage 04 are applied on top of `model_path`.

# %%
# Setup for Colab or a bare kernel: fetch and install the kit when `realign_lib` is not importable
# (set REALIGN_KIT_REPO to your fork's URL). In the kit's own environment, and under papermill, it does nothing.
import importlib.util, os, subprocess, sys  # noqa: E401
if importlib.util.find_spec("realign_lib") is None:
    _root = next((p for p in (os.getcwd(), os.path.dirname(os.getcwd())) if os.path.isdir(os.path.join(p, "realign_lib"))),
                 os.path.abspath("realign-kit"))
    if not os.path.isdir(_root):
        subprocess.run(["git", "clone", "--depth", "1", os.environ.get("REALIGN_KIT_REPO", "https://github.com/realign-kit/realign-kit"), _root], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", _root], check=True)
    sys.path.insert(0, _root)

# %% tags=["parameters"]
run_dir = "runs/tiny_world"  # run folder shared by all stages
seed = 0  # seed of everything random in the stage
small_run = False  # smoke setting: every size shrunk to run in about a minute
model_path = ""  # base model (hub id or folder); default: the tiny VLM of stage 00
runs = []  # stage-04 runs to evaluate (folder names under 04_training); empty: every finished run
include_base = True  # also evaluate the base model (condition "base")
eval_split = "test"  # the tiny world's images to evaluate on: test (reported) or validation (choosing a recipe; no MME)
pope_dir = ""  # folder of POPE question files; default: the tiny world's
image_root = ""  # folder of the POPE images (COCO val2014 for the real files); default: the tiny world's
mme_root = ""  # MME folder (one folder per subtask); default: the tiny world's; "none" skips MME
pope_suffix = False  # append lmms-eval's "Answer the question using a single word or phrase."
max_questions = 0  # POPE questions per split (first N); 0: all
n_chair = 300  # held-out images described for CHAIR (tiny world only); 0 skips it
batch_size = 64  # inputs per batched model call
baseline = "base"  # condition the others are compared with, paired by seed
cpu_threads = 0  # torch threads on a CPU; 0 keeps torch's default

# %%
import hashlib
import json
import shutil
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Markdown, display

from realign_lib import evaluation as ev, workspace
from realign_lib import pope, tinyworld as tw, tinyworld_eval as twe, vlm
from realign_lib.files import append_jsonl, read_appended, read_json, read_jsonl, write_json, write_jsonl
from realign_lib.prompts import DESCRIBE_PROMPT, LMMS_EVAL_SUFFIX
from realign_lib.stages import EvaluationStage

stage = EvaluationStage.from_namespace(globals())  # checks every parameter by name: type, range, choices

t_start = time.time()
if cpu_threads and not torch.cuda.is_available():
    torch.set_num_threads(cpu_threads)
run = workspace.resolve_run_dir(run_dir)  # a relative run_dir is under the repository (or $REALIGN_HOME), wherever the kernel starts
workspace.ensure_stages(run, needs=['00', '04'])  # missing? built in the small setting, with one realign run call
stage_dir = run / "05_evaluation"
stage_dir.mkdir(parents=True, exist_ok=True)
world_dir = run / "data" / "tiny_world"
base_path = Path(model_path) if model_path else run / "model" / "tiny_vlm"
validation = eval_split == "validation"  # recipes are chosen on these images, never on the test images
if validation and (pope_dir or image_root):
    raise ValueError("eval_split='validation' selects the tiny world's validation images; with your own data "
                     "point pope_dir and image_root at your validation questions and images instead")
pope_files = pope.find_pope_files(pope_dir or world_dir / ("pope_val" if validation else "pope"))
img_root = Path(image_root) if image_root else world_dir / ("val_images" if validation else "test_images")
mme_dir = None if mme_root == "none" or validation else Path(mme_root) if mme_root else world_dir / "MME"
if small_run:
    max_questions = min(max_questions or 40, 40)
    n_chair = min(n_chair, 16)
suffix = LMMS_EVAL_SUFFIX if pope_suffix else ""

# the tiny world's ground truth, for the partner yes-rate and CHAIR (absent for real data)
test_ann = world_dir / ("annotations_val.jsonl" if validation else "annotations_test.jsonl")
scenes = tw.load_annotations(test_ann) if test_ann.is_file() and not pope_dir else []
chair_scenes = scenes[:n_chair]

# questions (a prefix of each split with max_questions), written where the answers can find them
questions = {}
for split, path in pope_files.items():
    qs = pope.load_pope_questions(path)
    questions[split] = qs[:max_questions] if max_questions else qs
mme_records = ev.load_mme(mme_dir) if mme_dir is not None else {}
if small_run:
    mme_records = {t: rs[:8] for t, rs in mme_records.items()}

# which models: the base, then every finished stage-04 run (a folder with an adapter or a model)
train_dir = run / "04_training"
available = sorted(p.name for p in train_dir.iterdir()
                   if (p / "adapter_config.json").is_file() or (p / "config.json").is_file()) \
    if train_dir.is_dir() else []
missing = [r for r in runs if r not in available]
if missing:
    raise FileNotFoundError(f"stage-04 runs not found under {train_dir}: {missing}; available: {available}")
models = (["base"] if include_base else []) + (list(runs) or available)
print(f"POPE {', '.join(f'{s} {len(q)}' for s, q in questions.items())} questions; "
      f"MME {sum(map(len, mme_records.values()))} questions in {len(mme_records)} subtasks; "
      f"CHAIR on {len(chair_scenes)} images")
print("models:", ", ".join(models))

# %% [markdown]
# ## 1 · Answer and score, model by model
#
# Each model's answers go to `05_evaluation/<model>/` (`pope_<split>_answers.jsonl`,
# `mme_answers.jsonl`, `mme/<subtask>.txt`, `descriptions.jsonl`, `metrics.json`). Answer files are
# appended batch by batch, so a killed run resumes where it stopped; a model whose weights or
# evaluation settings changed since is evaluated afresh. LoRA adapters are merged into the base
# weights for evaluation (same outputs, faster).

# %%
def fingerprint(name: str) -> dict:
    """What an evaluation depends on: the weights' bytes (hashed) and the evaluation settings."""
    folder = base_path if name == "base" else train_dir / name
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):  # bytes of small files; size and mtime of big ones
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}".encode())
        h.update(f.read_bytes() if st.st_size < 256 * 2**20 else str(st.st_mtime_ns).encode())
    return {"model": str(folder), "weights_sha256": h.hexdigest()[:16] if folder.exists() else str(folder),
            "base": str(base_path),
            "pope": {s: [str(p), hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16]] for s, p in pope_files.items()},
            "image_root": str(img_root), "suffix": suffix, "mme": str(mme_dir),
            "mme_questions": sum(map(len, mme_records.values())), "n_chair": len(chair_scenes)}


def load(name: str):
    if name == "base":
        return vlm.load_vlm(base_path)
    folder = train_dir / name
    if (folder / "adapter_config.json").is_file():
        model, processor = vlm.load_vlm(base_path, adapter=folder)
        return model.merge_and_unload().eval(), processor
    return vlm.load_vlm(folder)


def evaluate(name: str) -> dict:
    out = stage_dir / name
    sig = fingerprint(name)
    if (out / "metrics.json").is_file():
        old = read_json(out / "metrics.json")
        if old.get("fingerprint") == sig:
            return old
    if (out / "fingerprint.json").is_file() and read_json(out / "fingerprint.json") != sig:
        for f in list(out.glob("*.jsonl")) + list(out.glob("mme/*.txt")) + [out / "metrics.json"]:
            f.unlink(missing_ok=True)  # answers of other weights or settings: start over
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "fingerprint.json", sig)
    t0 = time.time()
    model, processor = load(name)
    res = {"model": name, "fingerprint": sig, "seconds": {}}
    # POPE (the base tiny model's answers from stage 00 are the same questions, prompt and weights: reused)
    t = time.time()
    seed_dir = run / "00_tiny_world" / "eval_base"
    if name == "base" and not model_path and not pope_dir and not suffix and not validation and seed_dir.is_dir():
        for split, qs in questions.items():
            src, dst = seed_dir / f"pope_{split}_answers.jsonl", out / f"pope_{split}_answers.jsonl"
            if src.is_file() and not dst.exists():  # with the model they were made by (answer_pope checks it)
                ids = {q["question_id"] for q in qs}
                write_jsonl(dst, [a for a in read_jsonl(src) if a["question_id"] in ids])
                if src.with_name(src.stem + ".settings.json").is_file():
                    shutil.copy2(src.with_name(src.stem + ".settings.json"), dst.with_name(dst.stem + ".settings.json"))
                res.setdefault("reused", []).append(str(src))
    res["pope"] = {}
    res["pope_partner"] = {}
    for split, qs in questions.items():
        ans = pope.answer_pope(model, processor, qs, img_root, out / f"pope_{split}_answers.jsonl",
                               batch_size=batch_size, suffix=suffix, model_id=name,
                               model_key=None if name == "base" else sig)  # (merged adapters: not a folder's)
        pairs = pope.join_answers(qs, ans, source=str(out / f"pope_{split}_answers.jsonl"))
        preds = [pope.parse_yes_no(a) for _, a in pairs]
        res["pope"][split] = pope.score_pope([q["label"] for q, _ in pairs], preds)
        if scenes:
            res["pope_partner"][split] = twe.partner_yes_rate([q for q, _ in pairs], preds, scenes)
    res["seconds"]["pope"] = round(time.time() - t, 1)
    # MME
    if mme_records:
        t = time.time()
        answered = ev.answer_mme(model, processor, mme_records, out / "mme_answers.jsonl", batch_size=batch_size,
                                 model_id=name)
        ev.write_mme_results(answered, out / "mme")
        res["mme"] = ev.score_mme_results(out / "mme", tasks=list(mme_records))
        res["seconds"]["mme"] = round(time.time() - t, 1)
    # CHAIR
    if chair_scenes:
        t = time.time()
        cache = out / "descriptions.jsonl"
        texts = {r["id"]: r["text"] for r in read_appended(cache)}  # cuts a torn line
        todo = [s for s in chair_scenes if s.id not in texts]
        if todo:
            folder = world_dir / ("val_images" if validation else "test_images")
            outs = vlm.generate(model, processor, [folder / f"{s.id}.png" for s in todo],
                                [DESCRIBE_PROMPT] * len(todo), max_new_tokens=48, batch_size=batch_size)
            append_jsonl(cache, [{"id": s.id, "text": o} for s, o in zip(todo, outs)])
            texts.update({s.id: o for s, o in zip(todo, outs)})
        res["chair"] = twe.caption_hallucination([texts[s.id] for s in chair_scenes], chair_scenes)
        res["seconds"]["chair"] = round(time.time() - t, 1)
    res["seconds"]["total"] = round(time.time() - t0, 1)
    write_json(out / "metrics.json", res)
    del model
    return res


results = {}
for name in models:
    results[name] = evaluate(name)
    r = results[name]
    pa = r["pope"].get("adversarial") or next(iter(r["pope"].values()))
    other = sum(x.get("other_answers", 0) for x in r["pope"].values())
    print(f"{name:<22} POPE adv acc {100 * pa['accuracy']:.1f} yes {100 * pa['yes_ratio']:.1f}"
          + (f" ({other} POPE answers neither yes nor no, scored yes by the official rule)" if other else "")
          + (f" | MME perception {r['mme']['perception']:.1f} compliance {100 * r['mme']['compliance']:.0f}%"
             if "mme" in r else "")
          + (f" | CHAIR_i {100 * r['chair']['chair_i']:.1f}" if "chair" in r else "")
          + f" | {r['seconds']['total']:.0f} s")

# %% [markdown]
# ## 2 · Every model, every metric
#
# POPE in percent (accuracy, F1, yes-ratio per split); on the tiny world the yes-rate for absent
# partner objects; MME scores per subtask (max 200 each) and the perception total; CHAIR in percent.

# %%
flat = {name: ev.flat_metrics(r) for name, r in results.items()}
columns = [k for k in dict.fromkeys(k for f in flat.values() for k in f)
           if (k.startswith("pope/") and k.split("/")[-1] in ("accuracy", "f1", "yes_ratio", "absent_partner_yes_rate"))
           or not k.startswith("pope/")]
rows = ["| model | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
for name, f in flat.items():
    rows.append(f"| {name} | " + " | ".join(f"{f[c]:.1f}" if c in f else "–" for c in columns) + " |")
display(Markdown("\n".join(rows)))

# %% [markdown]
# ## 3 · The comparison: conditions over seeds
#
# Mean ± sd over seeds per condition (the base model is one deterministic evaluation), then each
# condition minus the baseline paired by seed, and rDPO minus DPO where both ran.

# %%
table_rows = []
for name, f in flat.items():
    cond, s = ev.condition_of(name)
    table_rows.append({"condition": cond, "seed": s, "metrics": f})
conditions = list(dict.fromkeys(r["condition"] for r in table_rows))
summary = ev.summarize_conditions(table_rows)
key_metrics = [m for m in ("pope/random/accuracy", "pope/popular/accuracy", "pope/adversarial/accuracy",
                           "pope/adversarial/f1", "pope/adversarial/yes_ratio",
                           "pope/adversarial/absent_partner_yes_rate", "mme/perception", "mme/compliance",
                           "chair/chair_i", "chair/chair_s", "chair/recall") if any(m in f for f in flat.values())]
table_md = ev.format_table(summary, key_metrics, conditions)
display(Markdown(table_md))

comparisons = [(c, baseline) for c in conditions if c != baseline and baseline in conditions]
if "rdpo" in conditions and "dpo" in conditions:
    comparisons.append(("rdpo", "dpo"))
diffs = {f"{a} - {b}": ev.paired_differences(table_rows, a, b) for a, b in comparisons}
diff_rows = ["| comparison | " + " | ".join(key_metrics) + " |", "| --- |" + " ---: |" * len(key_metrics)]
for label, d in diffs.items():
    cells = []
    for m in key_metrics:
        x = d.get(m)
        if x is None:
            cells.append("–")
        else:
            sd = f" ± {x['sd']:.1f}" if x["n"] > 1 and x["sd"] == x["sd"] else ""
            cells.append(f"{'**' if x['clear'] else ''}{x['mean']:+.1f}{sd}{'**' if x['clear'] else ''} "
                         f"({x['same_sign']}/{x['n']})")
    diff_rows.append(f"| {label} | " + " | ".join(cells) + " |")
diff_md = "\n".join(diff_rows)
display(Markdown("Paired differences, mean ± sd over seeds (seeds agreeing in sign / seeds); **bold**: clear.\n\n"
                 + diff_md))

# %% [markdown]
# ## 4 · Paired differences around zero
#
# One panel per metric, one column per comparison: each dot is one seed's difference (the same seed's
# model minus the baseline), the bar is the mean ± 2 standard errors, and the dashed line is no change.
# The y-axis is symmetric around zero, so a 0.3-point change looks like one. The absolute values are
# in the tables above.

# %%
plot_metrics = [m for m in ("pope/adversarial/f1", "pope/adversarial/accuracy", "pope/adversarial/yes_ratio",
                            "pope/adversarial/absent_partner_yes_rate", "mme/perception", "chair/chair_i",
                            "chair/recall") if m in key_metrics]
labels = list(diffs)
short_names = {"pope/adversarial/f1": "POPE-adv F1", "pope/adversarial/accuracy": "POPE-adv accuracy",
               "pope/adversarial/yes_ratio": "POPE-adv yes-ratio",
               "pope/adversarial/absent_partner_yes_rate": "yes | absent partner", "mme/perception": "MME perception",
               "chair/chair_i": "CHAIR_i", "chair/recall": "CHAIR recall"}
fig, axes = plt.subplots(1, max(len(plot_metrics), 1), figsize=(2.6 * max(len(plot_metrics), 1), 3.4), squeeze=False)
for ax, m in zip(axes[0], plot_metrics):
    top = 0.5
    for i, label in enumerate(labels):
        d = diffs[label].get(m)
        if not d:
            continue
        ds = np.asarray(d["diffs"], dtype=float)
        jitter = np.linspace(-0.12, 0.12, len(ds)) if len(ds) > 1 else np.zeros(1)
        ax.scatter(i + jitter, ds, s=14, color="tab:blue", alpha=0.7, zorder=3)
        se = d["sd"] / np.sqrt(d["n"]) if d["n"] > 1 and d["sd"] == d["sd"] else 0.0
        ax.errorbar(i + 0.25, d["mean"], yerr=2 * se, fmt="D", color="black" if d["clear"] else "grey",
                    markersize=5, capsize=4, zorder=4)
        top = max(top, float(np.abs(ds).max()), abs(d["mean"]) + 2 * se)
    ax.axhline(0, color="grey", lw=1, ls="--")
    ax.set_ylim(-1.15 * top, 1.15 * top)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_title(short_names.get(m, m) + " (points)", fontsize=9)
fig.suptitle(f"Paired differences per seed ({eval_split} images); black: clear, grey: within the spread", fontsize=9)
fig.tight_layout()
fig.savefig(stage_dir / "comparison.png", dpi=80)
plt.show()

# %% [markdown]
# ## 5 · Reading
#
# Generated from the paired differences above, so it cannot say more than they do.

# %%
lines = []
for label, d in diffs.items():
    clear = [f"{m} {x['mean']:+.2f}" for m, x in d.items() if m in key_metrics and x["clear"]]
    n = max((x["n"] for x in d.values()), default=0)
    if n < 2:
        lines.append(f"- {label}: one seed only, no spread to compare with.")
    elif clear:
        lines.append(f"- {label}: clear (all {n} seeds agree, |mean| > 2 se) on " + ", ".join(clear)
                     + "; every other key metric within the seed spread.")
    else:
        lines.append(f"- {label}: no key metric differs beyond the seed spread ({n} seeds).")
reading = "\n".join(lines) or "- one model only: nothing to compare."
n_seeds = max((x["n"] for d in diffs.values() for x in d.values()), default=0)
if n_seeds > 1:
    reading += (f"\n- How far to trust this: 'clear' is a screening rule, not a significance test (with {n_seeds} seeds, "
                f"2 standard errors is a loose bar); seeds vary the training only, every model answers the same "
                f"questions.")
    if mme_records:
        n_img = min(len(r) for r in mme_records.values()) // 2  # one image: 2 questions → acc and acc+
        reading += (f" An MME-style subtask holds {n_img} images, so one image moves its score by up to "
                    f"{150 / n_img:.0f} points.")
display(Markdown(reading))

# %%
import importlib.metadata as md

versions = {p: md.version(p) for p in ("torch", "transformers", "peft", "trl", "accelerate")}
run_config = read_json(run / "config.json") if (run / "config.json").is_file() else {}
report = "\n\n".join([
    f"# Comparison on {run} ({eval_split} images)\n\nModels: {', '.join(models)}. POPE questions per split: "
    + ", ".join(f"{s} {len(q)}" for s, q in questions.items())
    + f"; MME questions: {sum(map(len, mme_records.values()))}; CHAIR images: {len(chair_scenes)}.",
    "## Mean ± sd over seeds\n\n" + table_md,
    "## Paired differences (mean ± sd, seeds agreeing in sign / seeds; bold: clear)\n\n" + diff_md,
    "## Reading\n\n" + reading,
    "## Versions\n\n" + ", ".join(f"{k} {v}" for k, v in versions.items()),
    "## Run config\n\n```json\n" + json.dumps(run_config, indent=1) + "\n```",
])
(stage_dir / "comparison.md").write_text(report + "\n")
metrics = {
    "stage": "05_evaluation", "small_run": small_run, "eval_split": eval_split, "models": models,
    "base": str(base_path),
    "pope_files": pope_files, "mme_root": str(mme_dir), "suffix": suffix,
    "per_model": {n: {k: results[n][k] for k in ("pope", "pope_partner", "mme", "chair", "seconds") if k in results[n]}
                  for n in models},
    "flat": flat, "summary": summary,
    "paired_differences": diffs,
    "reading": reading, "versions": versions, "seconds": round(time.time() - t_start, 1),
}
write_json(stage_dir / "metrics.json", metrics)
print(f"wrote {stage_dir / 'metrics.json'} and {stage_dir / 'comparison.md'} in {metrics['seconds']:.0f} s")
