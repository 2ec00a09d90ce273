"""Stage-00 health check: does the tiny VLM learn yes/no (POPE) answers on a given world seed?

    python experiments/stage00_health.py --seed 3                       # today's recipe (configs/tiny_world.yaml)
    python experiments/stage00_health.py --seed 3 --sft_steps 1500 --curve 250,500,1000,1500
    python experiments/stage00_health.py --seed 3 --questions_per_image 4   # more yes/no turns per image

Builds the world once per seed (``experiments/worlds/seed<S>_n<N>``; only training settings change
between runs, and scene i depends only on (seed, i), so ``--n_train`` below the built size uses the
first images of the built world: the same images and conversations a smaller world would have), trains
the tiny VLM with the library's own phases (``tinyvlm.build_model`` → ``pretrain_vision_tower`` →
``instruction_tune``, as ``train_tiny_vlm`` does, in memory), and measures on the VALIDATION images
POPE accuracy / recall / yes-ratio per split on a seeded subset of questions, optionally CHAIR_i, and
the wall time per phase. One JSON line per run is appended to experiments/results/stage00_health.jsonl.

``--curve 250,500``: also POPE (a smaller subset) at those instruction-tuning steps, with the model as it
is then (learning curve; the schedule is the run's own cosine, so early points have a higher lr).
``--questions_per_image K``: regenerate the conversations with K yes/no turns per image
(``tinyworld.llava_record``; the world builds 2) without re-rendering images.
``--existence_per_image K``: K extra existence turns per image (half yes, half no with a uniformly random
absent object, as the world's own negatives; no MME/lmms suffix, as POPE asks).
``--partner_negatives P``: that share of the extra existence negatives asks for the absent partner of a
present object (hard negatives, as POPE-adversarial asks) instead of a uniformly random absent object.
``--yn_repeat R``: each image's yes/no exchanges appear R times among the exchanges (description once).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from realign_lib.evaluation import chair, health, pope  # noqa: E402
from realign_lib.files import read_json  # noqa: E402
from realign_lib.prompts import DESCRIBE_PROMPT  # noqa: E402
from realign_lib.tinyworld import model as tinymodel  # noqa: E402
from realign_lib.tinyworld import scenes as tws  # noqa: E402
from realign_lib.tinyworld import training as tinyvlm  # noqa: E402
from realign_lib.tinyworld import world as tw  # noqa: E402
from realign_lib.tinyworld.settings import TinyVLMConfig, WorldConfig  # noqa: E402

LEXICON = tws.object_lexicon()

RESULTS = ROOT / "experiments" / "results" / "stage00_health.jsonl"
WORLDS = ROOT / "experiments" / "worlds"


def pope_subset(world: dict, n: int, seed: int = 123) -> dict[str, list[dict]]:
    out = {}
    for split, path in world["pope_val"].items():
        qs = pope.load_pope_questions(path)
        qs = health.pope_subset(qs, n, seed=[seed, len(split)])  # whole (yes, no) pairs: exactly half "yes"
        assert sum(q["label"] == "yes" for q in qs) == len(qs) // 2
        out[split] = qs
    return out


def eval_pope(model, processor, world, subsets, tmp: Path, tag: str, batch_size: int = 64) -> dict:
    val_scenes = tws.load_annotations(world["annotations_val"])
    res = {}
    for split, qs in subsets.items():
        ans = pope.answer_pope(model, processor, qs, world["val_images"], tmp / f"{tag}_{split}.jsonl",
                               batch_size=batch_size, model_key=f"{tag}-{time.time()}")
        pairs = pope.join_answers(qs, ans)
        preds = [pope.parse_yes_no(t) for _, t in pairs]
        m = pope.score_pope([q["label"] for q in qs], preds)
        m |= chair.partner_yes_rate(qs, preds, {f"{s.id}.png": s.types for s in val_scenes}, LEXICON, tws.PARTNER)
        m["other_answers"] = sum(pope.answer_kind(t) == "other" for _, t in pairs)
        res[split] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}
    return res


def sft_data_stats(records: list[dict]) -> dict:
    """Exchange kinds and the label balance of the yes/no exchanges, as instruction_tune sees them."""
    kinds = {"description": 0, "yes_no": 0, "other": 0}
    yn = {"existence": [0, 0], "colour": [0, 0], "count": [0, 0], "position": [0, 0]}  # [yes, no]
    for r in records:
        for ex in tinyvlm.split_exchanges(r["conversations"]):
            q = ex[0]["value"].replace("<image>\n", "")
            a = ex[1]["value"]
            if q == DESCRIBE_PROMPT:
                kinds["description"] += 1
                continue
            if a not in ("Yes.", "No."):
                kinds["other"] += 1
                continue
            kinds["yes_no"] += 1
            if q.startswith("Is there a ") and len(q.split(" in the image")[0].split()) == 4:
                k = "existence"
            elif q.startswith(("Is there one", "Are there")):
                k = "count"
            elif q.startswith("Is the "):
                k = "position"
            else:
                k = "colour"
            yn[k][0 if a == "Yes." else 1] += 1
    total = sum(kinds.values())
    return {"exchanges": kinds, "share_yes_no": round(kinds["yes_no"] / total, 3),
            "yes_no_by_kind": {k: {"yes": v[0], "no": v[1]} for k, v in yn.items()},
            "share_existence": round(sum(yn["existence"]) / total, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--world_n_train", type=int, default=15000, help="images the built world has")
    ap.add_argument("--n_train", type=int, default=15000, help="training images used (first of the world)")
    ap.add_argument("--tower_steps", type=int, default=900)
    ap.add_argument("--tower_batch", type=int, default=128)
    ap.add_argument("--tower_lr", type=float, default=2e-3)
    ap.add_argument("--sft_steps", type=int, default=1000)
    ap.add_argument("--sft_batch", type=int, default=48)
    ap.add_argument("--sft_lr", type=float, default=1e-3)
    ap.add_argument("--questions_per_image", type=int, default=0, help="0: the world's own conversations (2)")
    ap.add_argument("--yn_repeat", type=int, default=1)
    ap.add_argument("--existence_per_image", type=int, default=0, help="extra existence turns per image")
    ap.add_argument("--partner_negatives", type=float, default=0.0,
                    help="share of the extra existence negatives asking for an absent partner of a present object")
    ap.add_argument("--n_pope", type=int, default=600, help="POPE questions per split (validation)")
    ap.add_argument("--n_chair", type=int, default=150)
    ap.add_argument("--curve", default="", help="SFT steps at which to measure POPE too")
    ap.add_argument("--n_curve", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--restart_steps", type=int, default=0,
                    help="after instruction tuning and its POPE: another cosine cycle of this many steps (warm restart)")
    ap.add_argument("--restart_lr", type=float, default=0.0, help="its peak lr (0: --sft_lr)")
    ap.add_argument("--restart_curve", default="", help="steps of the restart cycle at which to measure POPE too")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    rec = {"tag": args.tag, "seed": args.seed, "settings": vars(args), "torch_threads": torch.get_num_threads(),
           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    sec = {}
    t0 = time.time()
    wdir = WORLDS / f"seed{args.seed}_n{args.world_n_train}"
    # the world's own conversations without extra existence turns (--existence_per_image adds them here): the
    # runs logged before this was pinned, on worlds built while WorldConfig's default was 4 (seed 5), had 4 + K
    world = tw.build_world(wdir, WorldConfig(seed=args.seed, n_train=args.world_n_train, n_test=1000, n_mme=30,
                                             n_val=500, existence_per_image=0, partner_negatives=0.0),
                           progress=False, workers=1)
    sec["world"] = round(time.time() - t0, 1)  # ~0 when the world was already built

    t0 = time.time()
    records = read_json(world["train_json"])[:args.n_train]
    scenes = tws.load_annotations(world["annotations_train"])[:args.n_train]
    by_id = {s.id: s for s in scenes}
    if args.questions_per_image:
        rng = np.random.default_rng([args.seed, 99, args.questions_per_image])
        records = [tw.llava_record(by_id[r["id"]], r["image"], rng, args.questions_per_image) for r in records]
    if args.existence_per_image:  # extra "Is there a X in the image?" turns, as the world's own (tw.existence_questions)
        rng = np.random.default_rng([args.seed, 98, args.existence_per_image])
        records = [dict(r, conversations=list(r["conversations"]) + [
            {"from": fr, "value": v} for qa in tw.existence_questions(by_id[r["id"]], rng, args.existence_per_image,
                                                                      args.partner_negatives)
            for fr, v in (("human", qa["question"]), ("gpt", "Yes." if qa["answer"] == "yes" else "No."))])
            for r in records]
    if args.yn_repeat > 1:
        out = []
        for r in records:
            exs = tinyvlm.split_exchanges(r["conversations"])
            conv = []
            for ex in exs:
                reps = 1 if ex[0]["value"].endswith(DESCRIBE_PROMPT) else args.yn_repeat
                for _ in range(reps):
                    conv += ex
            out.append(dict(r, conversations=conv))
        records = out
    rec["sft_data"] = sft_data_stats(records)
    from PIL import Image
    img_dir = Path(world["train_images"])
    pixels = tinymodel.images_to_pixels(np.stack([np.asarray(Image.open(img_dir / r["image"]).convert("RGB"))
                                                for r in records]))
    sec["load_images"] = round(time.time() - t0, 1)

    cfg = TinyVLMConfig(seed=args.seed, tower_steps=args.tower_steps, tower_batch=args.tower_batch,
                        tower_lr=args.tower_lr, sft_steps=args.sft_steps, sft_batch=args.sft_batch,
                        sft_lr=args.sft_lr, cpu_threads=args.threads)
    rec["config"] = asdict(cfg)
    tokenizer = tinymodel.build_tokenizer(tw.world_vocabulary())
    processor = tinymodel.build_processor(tokenizer, cfg)
    model = tinymodel.build_model(tokenizer, cfg)

    t0 = time.time()
    tower_hist = tinyvlm.pretrain_vision_tower(model, pixels, [by_id[r["id"]] for r in records], cfg)
    sec["tower"] = round(time.time() - t0, 1)
    last = tower_hist[-1]
    rec["tower_end"] = {k: last[k] for k in ("step", "loss", "presence_exact", "position_object_acc")}
    rec["tower_curve"] = [{k: h[k] for k in ("step", "loss", "presence_exact")} for h in tower_hist[::4]]

    tmp = Path(tempfile.mkdtemp(prefix="s00h_"))
    curve_steps = {int(s) for s in args.curve.split(",") if s}
    curve_sub = pope_subset(world, args.n_curve, seed=7)
    curve, curve_sec = [], [0.0]
    sft_log = []

    def on_log(r):
        sft_log.append({"step": r["step"], "loss": r["loss"]})
        step_done = r["step"]
        if step_done in curve_steps and step_done < args.sft_steps - 1:
            tc = time.time()
            model.eval()
            with torch.no_grad():
                m = eval_pope(model, processor, world, curve_sub, tmp, f"curve{step_done}")
            model.train()
            model.model.vision_tower.eval()
            curve.append({"step": step_done, "lr": r["lr"],
                          **{s: {k: m[s][k] for k in ("accuracy", "recall", "yes_ratio")} for s in m}})
            print("curve", curve[-1], flush=True)
            curve_sec[0] += time.time() - tc

    # instruction_tune logs (and so calls on_log) every 50 steps: curve steps must be multiples of 50
    t0 = time.time()
    tinyvlm.instruction_tune(model, tokenizer, pixels, records, cfg, log=on_log)
    sec["sft"] = round(time.time() - t0 - curve_sec[0], 1)
    sec["curve_eval"] = round(curve_sec[0], 1)
    rec["sft_loss"] = sft_log[::4] + [sft_log[-1]]

    t0 = time.time()
    model.eval()
    with torch.no_grad():
        rec["pope_val"] = eval_pope(model, processor, world, pope_subset(world, args.n_pope), tmp, "final")
    sec["pope"] = round(time.time() - t0, 1)
    rec["n_pope_per_split"] = {s: m["n"] for s, m in rec["pope_val"].items()}
    if args.curve:
        curve.append({"step": args.sft_steps, **{s: {k: rec["pope_val"][s][k] for k in ("accuracy", "recall", "yes_ratio")}
                                                 for s in rec["pope_val"]}})
        rec["curve"] = curve
    if args.restart_steps:  # a warm restart: a fresh optimiser and cosine cycle from the trained model
        from dataclasses import replace
        cfg2 = replace(cfg, sft_steps=args.restart_steps, sft_lr=args.restart_lr or cfg.sft_lr, seed=cfg.seed + 1000)
        r_steps = {int(x) for x in args.restart_curve.split(",") if x}
        r_curve = []

        def on_log2(r):
            if r["step"] in r_steps and r["step"] < args.restart_steps - 1:
                model.eval()
                with torch.no_grad():
                    m = eval_pope(model, processor, world, curve_sub, tmp, f"restart{r['step']}")
                model.train()
                model.model.vision_tower.eval()
                r_curve.append({"step": r["step"], "lr": r["lr"],
                                **{x: {k: m[x][k] for k in ("accuracy", "recall", "yes_ratio")} for x in m}})
                print("restart curve", r_curve[-1], flush=True)

        t0 = time.time()
        tinyvlm.instruction_tune(model, tokenizer, pixels, records, cfg2, log=on_log2)
        sec["restart"] = round(time.time() - t0, 1)
        model.eval()
        with torch.no_grad():
            final = eval_pope(model, processor, world, pope_subset(world, args.n_pope), tmp, "restarted")
        rec["restart"] = {"steps": args.restart_steps, "lr": cfg2.sft_lr, "curve": r_curve,
                          "pope_val_before": rec["pope_val"]}
        rec["pope_val"] = final  # the figures below (and the table) are the restarted model's
    if args.n_chair:
        t0 = time.time()
        val_scenes = tws.load_annotations(world["annotations_val"])[:args.n_chair]
        with torch.no_grad():
            desc = chair.describe_images(model, processor, [Path(world["val_images"]) / f"{s.id}.png"
                                                            for s in val_scenes], batch_size=64)
        rec["chair_val"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in chair.chair_scores(
            desc, [s.types for s in val_scenes], LEXICON, tws.PARTNER).items()}
        sec["chair"] = round(time.time() - t0, 1)
    rec["seconds"] = sec
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(rec) + "\n")
    p = rec["pope_val"]
    print(f"seed {args.seed} {args.tag}: POPE acc " + "/".join(f"{100 * p[s]['accuracy']:.1f}" for s in p)
          + " recall " + "/".join(f"{100 * p[s]['recall']:.1f}" for s in p)
          + " yes " + "/".join(f"{100 * p[s]['yes_ratio']:.1f}" for s in p)
          + (f" CHAIR_i {100 * rec['chair_val']['chair_i']:.1f}" if args.n_chair else "") + f" | s {sec}", flush=True)


if __name__ == "__main__":
    main()
