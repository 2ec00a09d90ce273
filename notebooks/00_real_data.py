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
#
# The model itself is not touched here: stages 01–05 take it by `model_path` (a hub id such as
# `llava-hf/llava-1.5-7b-hf` or a local folder). See `configs/backbones/` for the paper's models.

# %% tags=["parameters"]
run_dir = "runs/tiny_world"  # run folder shared by all stages
seed = 0  # seed of everything random in the stage
small_run = False  # smoke setting: every size shrunk to run in about a minute
llava_json = ""  # LLaVA-Instruct-150K JSON, e.g. /data/llava/llava_instruct_150k.json
image_folder = ""  # its images (COCO train2017 files such as 000000033471.jpg)
n_samples = 6000  # samples handed to stages 01-03
prompt_contains = ""  # keep only records whose first question contains this text; empty: all
shuffle = True  # a seeded random subset of the images; False: the file's first images
records_per_image = 1  # records kept per image (the paper samples images: 1); more keep further conversations under the ids <id>_1, <id>_2
chosen_source = "llava"  # llava (the dataset's answers) | openai (a VLM behind an OpenAI-compatible endpoint answers)
api_base_url = ""  # openai backend: base URL, e.g. http://localhost:8000/v1 (vLLM); empty: OpenAI
api_model = ""  # openai backend: the served model name
api_key_env = "OPENAI_API_KEY"  # openai backend: NAME of the environment variable holding the key (never the key)
max_concurrency = 8  # openai backend: requests in flight at once
n_show = 6  # examples shown in the notebook

# %%
import json
import time
from pathlib import Path

from realign_lib.data import SKIP_REASONS, samples_from_llava
from realign_lib.files import write_json, write_jsonl
from realign_lib.stages import RealDataStage

stage = RealDataStage.from_namespace(globals())  # checks every parameter by name: type, range, choices

t0 = time.time()
run = Path(run_dir)
if not llava_json or not image_folder:
    raise ValueError("set llava_json (the LLaVA-Instruct-150K JSON) and image_folder (its COCO images); "
                     "for the offline tiny world use notebook 00_tiny_world instead")
for p, what in ((Path(llava_json), "llava_json"), (Path(image_folder), "image_folder")):
    if not p.exists():
        raise FileNotFoundError(f"{what} {p} does not exist")
if small_run:
    n_samples = min(n_samples or 20, 20)
# group the records by image (one per image by default, as the paper samples images), take a seeded
# subset of the images, and open only the images taken (not the whole COCO folder)
samples, counts = samples_from_llava(llava_json, image_folder, limit=n_samples or None,
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
    from realign_lib.data import chosen_from_endpoint
    from realign_lib.endpoint import ChatEndpoint

    ep = ChatEndpoint(api_model, base_url=api_base_url or None, api_key_env=api_key_env,
                      max_concurrency=max_concurrency, max_tokens=512)
    samples, endpoint_counts = chosen_from_endpoint(samples, ep, run / "00_real_data" / "chosen_answers.jsonl")
    ep.close()
    print(f"chosen responses from {ep.name}: {endpoint_counts}; requests {dict(ep.stats)}")
elif chosen_source != "llava":
    raise ValueError(f"chosen_source {chosen_source!r}: use llava or openai")
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
metrics = {"stage": "00_real_data", "small_run": small_run, "llava_json": str(llava_json), "image_root": image_root,
           "n_samples": len(samples), "loader_counts": counts, "chosen_source": chosen_source,
           "endpoint_counts": endpoint_counts, "shuffle": shuffle, "seed": seed,
           "chosen_words_median": lengths[len(lengths) // 2], "seconds": round(time.time() - t0, 1)}
(run / "00_real_data").mkdir(parents=True, exist_ok=True)
write_json(run / "00_real_data" / "metrics.json", metrics)
print(json.dumps(metrics, indent=1))
