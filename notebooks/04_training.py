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
# Step 5 of Algorithm 1: train the VLM on the dual-preference pairs of stage 03 with
#
# * `L_DPO  = −log σ(β[log π(y_w|x,v)/π_ref(y_w|x,v) − log π(y_l|x,v)/π_ref(y_l|x,v)])` (textual term),
# * `L_vDPO = −log σ(β[log π(y_w|x,v)/π_ref(y_w|x,v) − log π(y_w|x,v_l)/π_ref(y_w|x,v_l)])` (visual term:
#   the chosen answer should become *more* likely under the true image than under the retrieved one),
# * `L_rDPO = L_DPO + L_vDPO` (`loss="rdpo"`); `dpo` is the textual term alone, `mdpo` swaps the retrieved
#   image for a random crop and adds an anchor, `rdpo_released` is the authors' released "noisy"
#   variant (for comparison only).
#
# The reference π_ref is the starting model (LoRA adapters disabled); its log-probs are computed once
# and cached. Training runs on `realign_lib.trainer.PreferenceTrainer` (a `transformers.Trainer`), so
# the same code scales with `accelerate launch -m realign_lib.cli train` (see `configs/accelerate/`).
#
# **Parameters.** Below the first four, every parameter is a field of
# `realign_lib.training.PreferenceConfig` with the same name (the `TrainingArguments` name where one
# exists), and its default is the paper's: rDPO, β 0.1, one epoch (`max_steps = -1`), lr 1e-5
# (projector 2e-5 when `train_projector`), cosine schedule, warm-up 0.03, batch 1 × 8, LoRA r 128 /
# α 256 on the language model's linear layers, bf16 on a GPU that supports it; on a CUDA GPU also
# activation (gradient) checkpointing and four data-loader workers (GPU guide: `docs/gpu.md`; the
# authors' released settings: `configs/release.yaml`).
#
# **The tiny world's settings** (`configs/tiny_world.yaml`, which the main command runs) differ:
#
# * `max_steps = 60`, `per_device_train_batch_size = 8`, `gradient_accumulation_steps = 1`: a fixed,
#   short budget — 480 pairs of about 700 — so the stage takes about a minute on two CPU cores;
# * `learning_rate = 5e-4` (paper 1e-5): a 1.5 M-parameter model with rank-16 adapters moves very
#   little at the paper's rate in so few steps; a feasibility study of this world also used a much
#   higher rate;
# * `lora_r = 16`, `lora_alpha = 32` (paper 128 / 256, same α/r = 2): the tiny Llama's hidden size is
#   128, so rank 128 would be a full-rank update;
# * `sft_weight = 1.0` (paper 0): an NLL term on the chosen response. Pure DPO broke the tiny model's
#   grammar in that study (chosen log-prob fell ~8 nats); with the NLL term DPO and rDPO stayed sane.
#   The authors' released trainer has the same `sft_weight` option;
# * fp32 on a CPU, one torch thread (`cpu_threads = 1`): the model is so small that more threads only
#   add overhead, and on a shared two-core machine they made each step ~5× slower.
#
# Reads `03_induction/preferences.jsonl` (image paths relative to the run folder) and the stage-00
# model; writes `04_training/<output_name>/` (the adapter, `train_log.jsonl`, `metrics.json`, figures)
# and adds the run's figures to `04_training/metrics.json`.

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
max_steps = -1  # optimiser steps; -1: num_train_epochs over all pairs (the paper: one epoch)
logging_steps = 1  # log every this many optimiser steps
save_steps = 500  # checkpoint every this many optimiser steps
crop_min_area = 0.01  # mDPO: least fraction of the image kept
crop_max_area = 0.2  # mDPO: largest fraction of the image kept
preferences = ""  # default: <run_dir>/03_induction/preferences.jsonl; a bare file name is looked up there
max_records = 0  # pairs to train on (seeded subset); 0: max_steps × global batch, at most all
output_name = ""  # folder under 04_training; default: the config's variant name, else <loss>_seed<seed>
n_show = 6  # examples shown in the notebook
n_eval = 64  # held-out test images for a quick CHAIR check before / after; 0 skips it
cpu_threads = 0  # torch threads on a CPU; 0 keeps torch's default

# %%
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from realign_lib import trainer as preference_trainer, vlm, workspace
from realign_lib.files import read_json, read_jsonl, write_json
from realign_lib.stages import TrainingStage

stage = TrainingStage.from_namespace(globals())  # checks every parameter by name: type, range, choices

t_start = time.time()
torch.manual_seed(seed)
if cpu_threads and not torch.cuda.is_available():
    torch.set_num_threads(cpu_threads)
run = workspace.resolve_run_dir(run_dir)  # a relative run_dir is under the repository (or $REALIGN_HOME), wherever the kernel starts
workspace.ensure_stages(run, needs=['00', '03'])  # missing? built in the small setting, with one realign run call
stage_dir = run / "04_training"
output_name = output_name or f"{loss}_seed{seed}"
out_dir = stage_dir / output_name
out_dir.mkdir(parents=True, exist_ok=True)
model_dir = Path(model_path) if model_path else run / "model" / "tiny_vlm"
pref_path = Path(preferences) if preferences else run / "03_induction" / "preferences.jsonl"
if preferences and pref_path.name == preferences and not pref_path.is_file():
    pref_path = run / "03_induction" / preferences  # e.g. comparison_random_swap.jsonl
records = read_jsonl(pref_path)
if small_run:
    stage.max_steps = min(max_steps, 10) if max_steps > 0 else 10
    max_records = min(max_records or 32, 32)
global_batch = per_device_train_batch_size * gradient_accumulation_steps
max_records = min(max_records or (stage.max_steps * global_batch if stage.max_steps > 0 else len(records)),
                  len(records))
cfg = stage.preference_config()  # the PreferenceConfig fields of this notebook's parameters, same names
print(f"{len(records)} pairs in {pref_path}; training {loss} on {max_records} of them, "
      f"{f'{cfg.max_steps} steps' if cfg.max_steps > 0 else f'{num_train_epochs:g} epoch(s)'} × "
      f"{global_batch} pairs; lr {learning_rate}, β {beta}, sft_weight {sft_weight}, "
      f"LoRA r {lora_r if use_lora else '-'} on {lora_target_modules}")
print(f"model {model_dir} → {out_dir}")

# %% [markdown]
# ## 1 · Before: a few descriptions of the starting model
#
# Held-out test images (never in the preference data), greedy decoding. A quick CHAIR check on
# `n_eval` of them: the share of named objects that are absent (`chair_i`) and of descriptions with
# one or more (`chair_s`); stage 05 does the full evaluation.

# %%
from realign_lib import tinyworld, tinyworld_eval
from realign_lib.prompts import DESCRIBE_PROMPT

test_ann = run / "data" / "tiny_world" / "annotations_test.jsonl"
eval_scenes = tinyworld.load_annotations(test_ann)[:max(n_eval, n_show)] if test_ann.is_file() else []
eval_images = [run / "data" / "tiny_world" / "test_images" / f"{s.id}.png" for s in eval_scenes]
prompt = DESCRIBE_PROMPT


def describe_all(model, processor):
    if not eval_images:
        return []
    return vlm.generate(model, processor, eval_images, [prompt] * len(eval_images), max_new_tokens=48,
                        batch_size=32)


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

# %%
res = preference_trainer.train(pref_path, model_dir, out_dir, cfg, root=run, max_records=max_records)
trainer = res.pop("trainer")
sec = res["seconds"]
print(f"{res['steps']} steps in {sec['train']:.1f} s ({sec['per_step']:.3f} s/step); reference pass "
      f"{sec['reference']:.1f} s for {res['records']} pairs; {res['trainable_parameters']:,} trainable parameters")

# %% [markdown]
# ## 3 · Loss terms, rewards and margins
#
# Rewards are β·(log π − log π_ref) of each response. The textual margin is chosen − rejected (same
# image); the visual margin is chosen under the true image − chosen under the retrieved image (rDPO)
# or the crop (mDPO). Curves are smoothed over 10 steps.

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
# ## 4 · After: the same images
#
# A preference stage that damages the language shows here first (broken sentences); the NLL term on
# the chosen response (`sft_weight`) is there to prevent that.

# %%
policy = trainer.model.eval()
after = describe_all(policy, processor)
comparison = {}
if eval_scenes:
    comparison = {"before": tinyworld_eval.caption_hallucination(before[:n_eval], eval_scenes[:n_eval]),
                  "after": tinyworld_eval.caption_hallucination(after[:n_eval], eval_scenes[:n_eval])}
    for i in range(min(n_show, len(eval_scenes))):
        print(f"[{eval_scenes[i].id}] truth : {tinyworld.describe(eval_scenes[i])}\n"
              f"    before: {before[i]}\n    after : {after[i]}\n")
    if n_eval:
        print(f"CHAIR on {min(n_eval, len(eval_scenes))} test images: " + "; ".join(
            f"{k} {comparison['before'][k]:.3f} → {comparison['after'][k]:.3f}"
            for k in ("chair_i", "chair_s", "recall")))

# %%
first, last = log[0], log[-1]
tail = log[-min(20, len(log)):]
keys = [k for k in last if k.startswith(("loss", "pref/", "rewards/", "logps/"))]
metrics = {
    "stage": "04_training", "output_name": output_name, "loss": loss, "seed": seed, "small_run": small_run,
    "steps": res["steps"], "pairs": res["records"], "pairs_available": len(records), "global_batch": global_batch,
    "trainable_parameters": res["trainable_parameters"],
    "final": {k: round(float(last[k]), 5) for k in keys},
    "last20_mean": {k: round(float(np.nanmean([r.get(k, np.nan) for r in tail])), 5) for k in keys},
    "first": {k: round(float(first[k]), 5) for k in keys if k in first},
    "caption_check": comparison,
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
