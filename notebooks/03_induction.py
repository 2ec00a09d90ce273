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
# # 03 · Induce hallucinations: the dual-preference dataset
#
# Step 4 of Algorithm 1. For each sample, in rank order over its top-k retrieved images, the
# hallucination-prone VLM fills the `[MASK]` segments of the masked chosen response while looking
# at the retrieved image t; a sentence-transformers model embeds the chosen response and the
# candidate; if their cosine is below τ (0.95) the candidate becomes the **rejected** response and
# image t the **retrieved image**, otherwise rank t + 1 is tried; a sample with no accepted
# candidate is skipped and counted. Rank 1 is done for all samples in one batched pass, then
# rank 2 for those still pending, and so on.
#
# Two ways to fill the masks (`realign_lib.fillers.MaskFiller`):
#
# * **`instruction`** — the paper's completion prompt, *"Please complete the following sentence
#   based on the input image by filling in the masked segments."*, with the masked sentence and
#   the retrieved image; the VLM's reply is the candidate. The default for real chat VLMs.
# * **`slot`** — the default for the tiny VLM, which cannot follow that long instruction (it
#   answers "no ."): keep the unmasked scaffold, generate only the masked spans, greedily, with
#   the sample's own prompt ("Describe the image in detail.") and the retrieved image, forcing
#   the scaffold's tokens; a span ends when the model (nearly) chooses the next scaffold token.
#
# Reads `02_masking/masked.jsonl`, `01_retrieval/neighbours.jsonl`, `data/samples.jsonl` and the
# model; writes `03_induction/preferences.jsonl` (TRL's `prompt`, `chosen`, `rejected`, `images`
# plus `retrieved_image`, `similarity`, `rank`, `masked`), `skipped.jsonl`, the comparison sets
# for the ablations and `metrics.json`. Output is appended as it is made: a killed run resumes.

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
model_path = ""  # hub id or model folder; empty: the tiny VLM of stage 00
fill_mode = "slot"  # slot (tiny VLM: keep scaffold, generate spans) | instruction (chat VLMs: completion prompt)
fill_backend = "local"  # local (model_path, in this process) | openai (a VLM behind an OpenAI-compatible endpoint, e.g. vLLM)
api_base_url = ""  # openai backend: base URL, e.g. http://localhost:8000/v1 (vLLM); empty: OpenAI
api_model = ""  # openai backend: the served model name
api_key_env = "OPENAI_API_KEY"  # openai backend: NAME of the environment variable holding the key (never the key)
max_concurrency = 8  # openai backend: requests in flight at once
sentence_model = ""  # sentence-transformers id or path; empty: offline all-MiniLM-L6-v2 (paper: all-mpnet-base-v2)
tau = 0.95  # accept a candidate when cos(chosen, candidate) < tau (paper 0.95)
top_k = 5  # retrieved images per sample (stage 01 keeps them, stage 03 tries them in rank order)
batch_size = 64  # inputs per batched model call
max_samples = 0  # use the first N samples of stage 00; 0: all
max_span_tokens = 6  # slot mode: longest fill per [MASK]
stop_margin = 5.0  # slot mode: end a span once the next scaffold token is within this many nats of the best (0: argmax)
corruption = "crop"  # comparison: crop (keep 1-20 % of the area, as mDPO) | noise (Gaussian)
comparisons = True  # also build the random-swap and corrupted-image comparison sets
min_length_ratio = 0.5  # refuse a candidate with fewer words than this share of the chosen response (a cut-off reply); 0: off
n_show = 6  # examples shown in the notebook

# %%
import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from realign_lib import fillers, induction, similarity, vlm, workspace
from realign_lib.comparisons import corrupted_candidates, random_swap_records
from realign_lib.data import load_samples
from realign_lib.files import read_jsonl, write_json, write_jsonl
from realign_lib.stages import InductionStage

stage = InductionStage.from_namespace(globals())  # checks every parameter by name: type, range, choices

t_start = time.time()
run = workspace.resolve_run_dir(run_dir)  # a relative run_dir is under the repository (or $REALIGN_HOME), wherever the kernel starts
workspace.ensure_stages(run, needs=['00', '01', '02'])  # missing? built in the small setting, with one realign run call
stage_dir = run / "03_induction"
stage_dir.mkdir(parents=True, exist_ok=True)
masked_path = run / "02_masking" / "masked.jsonl"
if not masked_path.is_file():
    raise FileNotFoundError(f"{masked_path} not found: run notebooks/02_masking first")
samples = load_samples(run / "data" / "samples.jsonl")
masked_records = read_jsonl(masked_path)
if small_run:
    max_samples = min(max_samples or 150, 150)
items, missing = induction.build_items(samples, masked_records, read_jsonl(run / "01_retrieval" / "neighbours.jsonl"),
                                       run, top_k=top_k, limit=max_samples)
model_dir = Path(model_path) if model_path else run / "model" / "tiny_vlm"
print(f"{len(items)} samples with a masked text and neighbours (left out: {missing}); model {model_dir}; "
      f"fill mode {fill_mode}; tau {tau}; top-{top_k}")
print("e.g.", items[0].masked)

# %% [markdown]
# ## 1 · The models: the VLM that fills, the sentence model that judges

# %%
t0 = time.time()
if fill_backend == "openai":
    from realign_lib.endpoint import ChatEndpoint

    if fill_mode != "instruction":
        raise ValueError("fill_backend openai fills with the completion prompt: set fill_mode instruction")
    filler = fillers.EndpointFiller(ChatEndpoint(api_model, base_url=api_base_url or None, api_key_env=api_key_env,
                                                 max_concurrency=max_concurrency, max_tokens=2048))
    model_label = f"openai:{api_model}@{api_base_url or 'api.openai.com'}"
elif fill_backend == "local":
    model, processor = vlm.load_vlm(model_dir)
    filler = fillers.MaskFiller(model, processor, mode=fill_mode, max_span_tokens=max_span_tokens,
                                stop_margin=stop_margin, batch_size=batch_size)
    model_label = str(model_dir.resolve()) if model_dir.exists() else str(model_path)
else:
    raise ValueError(f"fill_backend {fill_backend!r}: use local or openai")
encoder = similarity.SentenceEncoder(sentence_model)
t_load = time.time() - t0
weights = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() and fill_backend == "local" else []
digest = lambda p: hashlib.sha1(Path(p).read_bytes()).hexdigest()[:16]  # noqa: E731
# results are reused on a rerun only if these match (other inputs or settings: start over)
settings = {"model": model_label,
            "weights": [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in weights],
            "inputs": [digest(masked_path), digest(run / "01_retrieval" / "neighbours.jsonl")],
            "fill_mode": fill_mode, "sentence_model": encoder.name, "top_k": top_k}
settings.update({"max_span_tokens": max_span_tokens, "stop_margin": stop_margin} if fill_mode == "slot" else
                {"max_new_tokens": filler.max_new_tokens})
print(f"loaded in {t_load:.1f} s; sentence model {encoder.name}")

# %% [markdown]
# ## 2 · The τ loop over the retrieved images (resumable)

# %%
summary = induction.induce(items, filler, encoder, tau, stage_dir / "preferences.jsonl", stage_dir / "skipped.jsonl",
                           signature={"generator": "re-align", **settings}, chunk_size=1024, on_change="restart",
                           min_length_ratio=min_length_ratio)
prefs = read_jsonl(stage_dir / "preferences.jsonl")
skipped = read_jsonl(stage_dir / "skipped.jsonl")
by_rank = induction.acceptance_by_rank(prefs, skipped, top_k)
print(f"{len(prefs)} pairs from {len(items)} samples ({len(prefs) / max(len(items), 1):.1%}); skipped "
      f"{dict(Counter(s['reason'] for s in skipped))}; {summary['fills']} fills computed in {summary['seconds']:.0f} s "
      f"(fill {summary['seconds_fill']:.0f} s, similarity {summary['seconds_similarity']:.0f} s); "
      f"{summary['too_short']} candidates refused as cut short (min_length_ratio {min_length_ratio})")
print("acceptance by rank:", [f"#{r['rank']} {r['accepted']}/{r['tried']}" for r in by_rank])

# %% [markdown]
# The file is exactly what TRL's `DPOTrainer` and `datasets` read (stage 04 loads the images
# from the relative paths in `images` / `retrieved_image`):

# %%
from datasets import load_dataset

ds = load_dataset("json", data_files=str(stage_dir / "preferences.jsonl"), split="train")
print(ds)
assert {"prompt", "chosen", "rejected", "images"} <= set(ds.column_names)

# %% [markdown]
# ## 3 · Examples: original image, retrieved image, chosen and rejected (changed words in red)

# %%
def draw_words(ax, y, words, size=8.5, line=0.085, gap=0.006):
    """Write (word, changed) pairs from the left edge down, wrapping at the axis width."""
    renderer = ax.figure.canvas.get_renderer()
    x = 0.0
    for w, changed in words:
        kw = dict(fontsize=size, transform=ax.transAxes, va="top", color="crimson" if changed else "black",
                  fontweight="bold" if changed else "normal")
        t = ax.text(x, y, w, **kw)
        box = t.get_window_extent(renderer=renderer).transformed(ax.transAxes.inverted())
        if box.x1 > 1.0 and x > 0:
            t.remove()
            x, y = 0.0, y - line
            t = ax.text(x, y, w, **kw)
            box = t.get_window_extent(renderer=renderer).transformed(ax.transAxes.inverted())
        x = box.x1 + gap
    return y - line


rng = np.random.default_rng(seed)
show = [prefs[i] for i in sorted(rng.choice(len(prefs), min(n_show, len(prefs)), replace=False))] if prefs else []
if show:
    fig, axes = plt.subplots(len(show), 3, figsize=(14, 2.3 * len(show)), gridspec_kw={"width_ratios": [1, 1, 6]})
    axes = np.atleast_2d(axes)
    for row, r in enumerate(show):
        axes[row, 0].imshow(Image.open(run / r["images"][0]), interpolation="nearest")
        axes[row, 0].set_title(r["id"], fontsize=8)
        axes[row, 1].imshow(Image.open(run / r["retrieved_image"]), interpolation="nearest")
        axes[row, 1].set_title(f"retrieved #{r['rank']}", fontsize=8, color="crimson")
        ax = axes[row, 2]
        y = draw_words(ax, 0.98, [("chosen:", False)] + [(w, False) for w in r["chosen"].split()])
        changed = induction.changed_words(r["chosen"], r["rejected"], r["masked"])
        y = draw_words(ax, y - 0.03, [("rejected:", False)] + changed)
        ax.text(0, y - 0.03, f"cos {r['similarity']:.3f}", fontsize=8, color="gray", transform=ax.transAxes, va="top")
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(stage_dir / "examples.png", dpi=80)
    plt.show()
for r in show[:3]:
    print("chosen:  ", r["chosen"])
    changed = induction.changed_words(r["chosen"], r["rejected"], r["masked"])
    print("rejected:", " ".join(f"[{w}]" if c else w for w, c in changed))

# %% [markdown]
# ## 4 · Acceptance by rank and the similarity histogram
#
# Left: of the samples that reached rank t (not accepted before), the share accepted there; the
# line is the share of all samples accepted at rank ≤ t. Right: the cosine of every candidate
# tried — the accepted ones fall below τ, the refused ones at or above it.

# %%
hist = induction.similarity_histogram(prefs, skipped, bins=40)
fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
ranks = [r["rank"] for r in by_rank]
a1.bar(ranks, [r["rate"] for r in by_rank], color="tab:blue", label="accepted at rank t / reached t")
a1.plot(ranks, [r["cumulative"] for r in by_rank], "o-", color="tab:orange", label="cumulative share of samples")
for r in by_rank:
    a1.text(r["rank"], 0.02, f"{r['accepted']}/{r['tried']}", ha="center", fontsize=7, color="white")
a1.set(xlabel="retrieval rank t", ylim=(0, 1), xticks=ranks, title="acceptance by rank")
a1.legend(fontsize=7, loc="upper right")
edges = np.array(hist["edges"])
width = np.diff(edges)
a2.bar(edges[:-1], hist["counts_accepted"], width=width, align="edge", color="tab:green", label="accepted")
a2.bar(edges[:-1], hist["counts_refused"], width=width, align="edge", bottom=hist["counts_accepted"],
       color="tab:gray", label="refused (≥ τ)")
a2.axvline(tau, color="crimson", ls="--", label=f"τ = {tau}")
a2.set(xlabel="cos(T(chosen), T(candidate))", ylabel="candidates", title="similarity of every candidate tried")
a2.legend(fontsize=7)
fig.tight_layout()
fig.savefig(stage_dir / "acceptance_similarity.png", dpi=80)
plt.show()

# %% [markdown]
# ## 5 · Comparison sets for the ablations
#
# Same record format, same files layout: **random swap** replaces each masked span by a random
# other masked span of the same kind (no model; seeded; the kinds come from the tiny world's own
# lexicon in a tiny-world run, else from a generic English one), and **corrupted image** runs the
# same τ loop with the masks filled under corrupted copies of the sample's *own* image (a random
# crop keeping 1–20 % of the area, as mDPO, or Gaussian noise) instead of retrieved images.

# %%
results = {"re_align": prefs}
comparison_summary = {}
t_swap = t_corrupt = 0.0
if comparisons:
    t0 = time.time()
    lexicon = None  # word -> kind for swapping like for like; None: a generic English lexicon
    if (run / "data" / "tiny_world" / "annotations_train.jsonl").is_file():
        from realign_lib.tinyworld import span_lexicon

        lexicon = span_lexicon()
    swap, swap_skipped = random_swap_records(items, masked_records, encoder, seed=seed, lexicon=lexicon)
    write_jsonl(stage_dir / "comparison_random_swap.jsonl", swap)
    write_jsonl(stage_dir / "comparison_random_swap_skipped.jsonl", swap_skipped)
    t_swap = time.time() - t0
    results["random_swap"] = swap
    comparison_summary["random_swap"] = {"pairs": len(swap), "skipped": len(swap_skipped), "seconds": round(t_swap, 1)}
    t0 = time.time()
    folder = f"03_induction/corrupted_images/{corruption}_seed{seed}"
    corrupt_items = corrupted_candidates(items, run, folder, kind=corruption, attempts=top_k, seed=seed)
    csum = induction.induce(corrupt_items, filler, encoder, tau, stage_dir / "comparison_corrupted_image.jsonl",
                            stage_dir / "comparison_corrupted_image_skipped.jsonl",
                            signature={"generator": "corrupted_image", "corruption": corruption, "seed": seed,
                                       **settings},
                            chunk_size=1024, on_change="restart", min_length_ratio=min_length_ratio)
    t_corrupt = time.time() - t0
    results["corrupted_image"] = read_jsonl(stage_dir / "comparison_corrupted_image.jsonl")
    comparison_summary["corrupted_image"] = {"pairs": csum["pairs"], "skipped": csum["skipped"],
                                             "corruption": corruption, "seconds": round(t_corrupt, 1)}
    print(json.dumps(comparison_summary, indent=1))
    r0 = results["corrupted_image"][0] if results["corrupted_image"] else None
    if swap:
        print("random swap:    ", swap[0]["rejected"])
    if r0:
        print("corrupted image:", r0["rejected"], f"(copy {r0['retrieved_image']})")

# %% [markdown]
# ## 6 · Do the rejected responses name absent objects? (tiny world)
#
# Share of rejected responses naming at least one object absent from the original image, share of
# named objects that are absent (CHAIR_i style), and of those absent objects, how many are the
# *partner* of a present one (moon↔star, fish↔boat, …: the co-occurrence prior the model leans on)
# and how many are present in the retrieved image.

# %%
world_stats = {}
ann_path = run / "data" / "tiny_world" / "annotations_train.jsonl"
if ann_path.is_file():
    from realign_lib.tinyworld import load_annotations
    from realign_lib.tinyworld_eval import absent_object_stats

    scenes = {s.id: s for s in load_annotations(ann_path)}
    image_scene = lambda p: scenes.get(Path(p).stem)  # noqa: E731
    world_stats = {name: absent_object_stats(recs, scenes, image_scene) for name, recs in results.items()}
    rows = ["generator            pairs  mean cos  with absent  absent/named  partner share  in retrieved"]
    for name, st in world_stats.items():
        recs = results[name]
        mean_sim = np.mean([r["similarity"] for r in recs]) if recs else float("nan")
        rows.append(f"{name:<20} {len(recs):>5}  {mean_sim:8.3f}  {st['responses_with_absent']:11.1%}  "
                    f"{st['object_hallucination_rate']:12.1%}  {st['partner_share']:13.1%}  "
                    f"{st['absent_in_retrieved_share']:12.1%}")
    print("\n".join(rows))

# %%
def _round(d):
    """Floats to 4 decimals (write_json turns NaN into null)."""
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


metrics = {
    "stage": "03_induction", "small_run": small_run, "fill_mode": fill_mode, "tau": tau, "top_k": top_k,
    "sentence_model": encoder.name, "model": settings["model"], "max_span_tokens": max_span_tokens,
    "stop_margin": stop_margin,
    "samples_tried": len(items), "pairs": len(prefs), "pair_rate": round(len(prefs) / max(len(items), 1), 4),
    "skipped": dict(Counter(s["reason"] for s in skipped)), "left_out": missing,
    "acceptance_by_rank": [_round(r) for r in by_rank],
    "mean_similarity_accepted": round(float(np.mean([r["similarity"] for r in prefs])), 4) if prefs else None,
    "similarity_histogram": hist,
    "tiny_world": {k: _round(v) for k, v in world_stats.items()},
    "comparisons": comparison_summary,
    "seconds": {"load": round(t_load, 1), "induction": summary["seconds"], "fill": summary["seconds_fill"],
                "similarity": summary["seconds_similarity"], "random_swap": round(t_swap, 1),
                "corrupted_image": round(t_corrupt, 1), "total": round(time.time() - t_start, 1)},
    "computed_this_run": summary["computed"],
    "fill_backend": fill_backend,
    "endpoint_stats": dict(filler.endpoint.stats) if fill_backend == "openai" else None,
}
write_json(stage_dir / "metrics.json", metrics)
shown = ("samples_tried", "pairs", "pair_rate", "mean_similarity_accepted", "seconds")
print(json.dumps({k: metrics[k] for k in shown}, indent=1))
