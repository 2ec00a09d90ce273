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
# # 01 · Embed the images and retrieve their nearest neighbours
#
# Re-Align induces a hallucination by showing the VLM a *different but similar* image: one that
# shares most of the context (the scene, some objects) but not everything. Step 3 of Algorithm 1:
# embed every training image with the VLM's own vision encoder, L2-normalise, and retrieve the
# top-k most cosine-similar **other** images with FAISS (the image itself and exact duplicates are
# excluded).
#
# Reads `data/samples.jsonl` and the model from stage 00; writes `01_retrieval/embeddings.npy`,
# `ids.json`, `index.faiss` and `neighbours.jsonl` (id → top-k ids and scores).

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
top_k = 5  # retrieved images per sample (stage 01 keeps them, stage 03 tries them in rank order)
index_kind = "flat"  # flat (exact) | ivf | hnsw
batch_size = 64  # inputs per batched model call
max_samples = 0  # use the first N samples of stage 00; 0: all
n_show = 6  # examples shown in the notebook

# %%
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from realign_lib import retrieval, vlm, workspace
from realign_lib.data import load_samples
from realign_lib.files import atomic_save_npy, write_json, write_jsonl
from realign_lib.stages import RetrievalStage

stage = RetrievalStage.from_namespace(globals())  # checks every parameter by name: type, range, choices

run = workspace.resolve_run_dir(run_dir)  # a relative run_dir is under the repository (or $REALIGN_HOME), wherever the kernel starts
workspace.ensure_stages(run, needs=['00'])  # missing? built in the small setting, with one realign run call
stage_dir = run / "01_retrieval"
stage_dir.mkdir(parents=True, exist_ok=True)
samples = load_samples(run / "data" / "samples.jsonl")
if small_run:
    max_samples = max_samples or 300
if max_samples:
    samples = samples[:max_samples]
model_dir = Path(model_path) if model_path else run / "model" / "tiny_vlm"
image_paths = [run / s["image_root"] / s["image"] for s in samples]  # image_root: relative to run, or absolute
print(f"{len(samples)} samples; model {model_dir}; index {index_kind}; k={top_k}")
t_start = time.time()

# %% [markdown]
# ## 1 · Embeddings from the model's own vision tower
#
# `vlm.image_embeddings` mean-pools the image features the language model receives (vision tower
# and projector); chunks are saved as they finish, so a killed run resumes.

# %%
model, processor = vlm.load_vlm(model_dir, device=None)
t0 = time.time()
emb = retrieval.embed_images_resumable(model, processor, image_paths, stage_dir / "embedding_parts",
                                       batch_size=batch_size, progress=False)
t_embed = time.time() - t0
atomic_save_npy(stage_dir / "embeddings.npy", emb)
write_json(stage_dir / "ids.json", [s["id"] for s in samples])
print(f"embeddings {emb.shape} in {t_embed:.1f} s ({len(samples) / max(t_embed, 1e-9):.0f} images/s)")

# %% [markdown]
# ## 2 · FAISS index and the top-k other images

# %%
t0 = time.time()
index = retrieval.build_index(emb, kind=index_kind, seed=seed)
nbrs, scores, n_dups = retrieval.nearest_others(index, emb, k=top_k)
t_search = time.time() - t0
retrieval.save_index(index, stage_dir / "index.faiss")
records = []
for i, s in enumerate(samples):
    records.append({"id": s["id"], "image": s["image"], "image_root": s["image_root"],
                    "neighbours": [{"rank": r + 1, "id": samples[j]["id"], "image": samples[j]["image"],
                                    "score": round(float(sc), 6)}
                                   for r, (j, sc) in enumerate(zip(nbrs[i], scores[i])) if j >= 0]})
write_jsonl(stage_dir / "neighbours.jsonl", records)
print(f"index + search {t_search:.2f} s; exact duplicates skipped: {n_dups}; "
      f"mean cosine rank 1 {scores[:, 0].mean():.3f}, rank {top_k} {scores[:, -1].mean():.3f}")

# %%
fig, axes = plt.subplots(n_show, top_k + 1, figsize=(1.9 * (top_k + 1), 2.1 * n_show))
for row, i in enumerate(np.random.default_rng(seed).choice(len(samples), n_show, replace=False)):
    axes[row, 0].imshow(Image.open(image_paths[i]), interpolation="nearest")
    axes[row, 0].set_title("query", fontsize=8, color="blue")
    for c in range(top_k):
        j = nbrs[i, c]
        axes[row, c + 1].imshow(Image.open(image_paths[j]), interpolation="nearest")
        axes[row, c + 1].set_title(f"#{c + 1}  cos {scores[i, c]:.3f}", fontsize=8)
for ax in axes.flat:
    ax.axis("off")
fig.tight_layout()
fig.savefig(stage_dir / "neighbours.png", dpi=80)
plt.show()

# %% [markdown]
# ## 3 · Are the neighbours *similar but different*? (tiny world)
#
# A useful retrieved image shares the query's context but not all of its objects: filling the
# masks while looking at it makes the model name objects that are plausible here but absent.

# %%
world_stats = {}
ann_path = run / "data" / "tiny_world" / "annotations_train.jsonl"
if ann_path.is_file():
    from realign_lib.tinyworld import load_annotations

    by_id = {s.id: s for s in load_annotations(ann_path)}
    same_scene_diff_objects = share_object = same_objects = 0
    total = 0
    rand = np.random.default_rng(seed)
    base_scene = 0
    for i, s in enumerate(samples):
        q = by_id[s["id"]]
        for j in nbrs[i]:
            if j < 0:
                continue
            n = by_id[samples[j]["id"]]
            total += 1
            same_scene_diff_objects += n.scene == q.scene and set(n.types) != set(q.types)
            share_object += bool(set(n.types) & set(q.types))
            same_objects += set(n.types) == set(q.types)
        base_scene += by_id[samples[int(rand.integers(len(samples)))]["id"]].scene == q.scene
    world_stats = {"same_scene_not_all_objects": same_scene_diff_objects / total,
                   "shares_an_object": share_object / total, "same_object_set": same_objects / total,
                   "random_pair_same_scene": base_scene / len(samples)}
    print(json.dumps({k: round(v, 3) for k, v in world_stats.items()}, indent=1))

# %%
metrics = {"stage": "01_retrieval", "n_images": len(samples), "dim": int(emb.shape[1]), "top_k": top_k,
           "index_kind": index_kind, "duplicates_skipped": int(n_dups),
           "mean_score_by_rank": [round(float(v), 4) for v in scores.mean(0)],
           "tiny_world": world_stats,
           "seconds": {"embed": round(t_embed, 2), "index_search": round(t_search, 2),
                       "total": round(time.time() - t_start, 1)},
           "images_per_second": round(len(samples) / max(t_embed, 1e-9), 1)}
write_json(stage_dir / "metrics.json", metrics)
print(f"wrote {stage_dir / 'metrics.json'}")
