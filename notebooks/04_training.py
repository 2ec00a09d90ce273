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
# and cached. Training runs on `realign_lib.training.PreferenceTrainer` (a `transformers.Trainer`), so
# the same code scales with `accelerate launch` (see `realign_lib/train_cli.py`, `configs/accelerate/`).
#
# **Tiny-world settings vs the paper's** (design notes §2 step 6 and §4). The paper trains a 7B LLaVA for
# one epoch over 11k pairs with LoRA r = 128 (α 256), lr 1e-5, batch 1 × 8, bf16. The tiny world overrides:
#
# * `max_steps = 300`, `per_device_batch = 8`: a fixed, short budget — 2,400 pairs, less than one
#   epoch of the ~5k pairs — so the stage takes minutes on two CPU cores;
# * `learning_rate = 5e-4` (paper 1e-5): a 1.5 M-parameter model with rank-16 adapters moves very
#   little at the paper's rate in 300 steps; the feasibility study also used a much higher rate;
# * `lora_r = 16`, `lora_alpha = 32` (paper 128 / 256, same α/r = 2): the tiny Llama's hidden size is
#   128, so rank 128 would be a full-rank update;
# * `sft_weight = 1.0` (paper 0): an NLL term on the chosen response. Pure DPO broke the tiny model's
#   grammar in the study (chosen log-prob fell ~8 nats); with the NLL term DPO and rDPO stayed sane.
#   The authors' released trainer has the same `sft_weight` option;
# * fp32 on a CPU (bf16 on a GPU that supports it), one torch thread (`cpu_threads`): the model is so
#   small that more threads only add overhead, and on a shared two-core machine they made each step
#   ~5× slower.
#
# Reads `03_induction/preferences.jsonl` (image paths relative to the run folder) and the stage-00
# model; writes `04_training/<output_name>/` (the adapter, `train_log.jsonl`, `metrics.json`, figures)
# and adds the run's figures to `04_training/metrics.json`.

# %% tags=["parameters"]
run_dir = "runs/tiny_world"  # run folder shared by all stages
seed = 0  # training seed (data order, LoRA init, mDPO crops)
small_run = False  # smoke setting: at most 10 steps on at most 32 pairs
model_path = ""  # starting policy and reference; default: the tiny VLM of stage 00
loss = "rdpo"  # dpo | rdpo | mdpo | rdpo_released
preferences = ""  # default: <run_dir>/03_induction/preferences.jsonl; a bare file name is looked up there
max_steps = 300  # optimiser steps (tiny world); 0: one epoch over all pairs (the paper)
per_device_batch = 8  # preference pairs per device and step (paper 1)
grad_accum = 1  # micro-batches per step (paper 8)
learning_rate = 5e-4  # tiny world (paper 1e-5), see above
beta = 0.1  # β of the sigmoid losses (paper)
sft_weight = 1.0  # NLL term on the chosen response (tiny world; paper 0)
use_lora = True  # LoRA on every linear layer of the language model
lora_r = 16  # tiny world (paper 128); lora_alpha is twice lora_r, as in the paper
max_records = 0  # pairs to train on (seeded subset); 0: max_steps × global batch, at most all
output_name = ""  # default f"{loss}_seed{seed}"
n_show = 4  # descriptions shown before / after
n_eval = 64  # held-out test images for a quick CHAIR check before / after; 0 skips it
save_steps = 50  # checkpoint every this many steps; a killed run continues from the last complete one
cpu_threads = 1  # torch threads on a CPU; 0 keeps torch's default (one thread is fastest for this tiny model)

# %%
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from realign_lib import train_cli, vlm
from realign_lib.files import read_json, read_jsonl, write_json

t_start = time.time()
torch.manual_seed(seed)
if cpu_threads and not torch.cuda.is_available():
    torch.set_num_threads(cpu_threads)
run = Path(run_dir)
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
    max_steps = min(max_steps or 10, 10)
    max_records = min(max_records or 32, 32)
global_batch = per_device_batch * grad_accum
max_records = min(max_records or (max_steps * global_batch if max_steps else len(records)), len(records))
cfg = train_cli.config_from_notebook(dict(
    loss=loss, beta=beta, learning_rate=learning_rate, per_device_batch=per_device_batch, grad_accum=grad_accum,
    sft_weight=sft_weight, use_lora=use_lora, lora_r=lora_r, seed=seed, max_steps=max_steps, save_steps=save_steps))
print(f"{len(records)} pairs in {pref_path}; training {loss} on {max_records} of them, "
      f"{f'{max_steps} steps' if max_steps else 'one epoch'} × "
      f"{global_batch} pairs; lr {learning_rate}, β {beta}, sft_weight {sft_weight}, LoRA r {lora_r if use_lora else '-'}")
print(f"model {model_dir} → {out_dir}")

# %% [markdown]
# ## 1 · Before: a few descriptions of the starting model
#
# Held-out test images (never in the preference data), greedy decoding. A quick CHAIR check on
# `n_eval` of them: the share of named objects that are absent (`chair_i`) and of descriptions with
# one or more (`chair_s`); stage 05 does the full evaluation.

# %%
from realign_lib import tinyworld

test_ann = run / "data" / "tiny_world" / "annotations_test.jsonl"
eval_scenes = tinyworld.load_annotations(test_ann)[:max(n_eval, n_show)] if test_ann.is_file() else []
eval_images = [run / "data" / "tiny_world" / "test_images" / f"{s.id}.png" for s in eval_scenes]
prompt = tinyworld.DESCRIBE_PROMPT


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
# `train_cli.train` builds the dataset (a seeded subset of `max_records` pairs), precomputes the
# reference log-probs (cached in `reference_logps.jsonl`), trains with `PreferenceTrainer`, logs every
# step to `train_log.jsonl` and saves the adapter with the processor. Every `save_steps` steps it
# checkpoints; a run killed part-way continues from the last complete checkpoint when the notebook
# is run again with the same parameters, and ends with the same weights as an uninterrupted run.

# %%
res = train_cli.train(pref_path, model_dir, out_dir, cfg, root=run, max_records=max_records)
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
    comparison = {"before": tinyworld.caption_hallucination(before[:n_eval], eval_scenes[:n_eval]),
                  "after": tinyworld.caption_hallucination(after[:n_eval], eval_scenes[:n_eval])}
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
