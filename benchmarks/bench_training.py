"""rDPO training step against the kit's DPO and TRL's DPOTrainer, on the same model and batch.

    python benchmarks/bench_training.py                      # tiny-world model if a run exists, else a tiny random LLaVA
    python benchmarks/bench_training.py --model runs/tiny_world/model/tiny_vlm --preferences runs/tiny_world/03_induction/preferences.jsonl

Each configuration runs in its own subprocess (so peak memory is its own): the same LoRA settings
(rank, targets), batch, optimiser (AdamW) and number of steps. Reported per configuration: median
time per optimiser step after ``--warmup`` steps, the one-off reference pass (the kit caches
reference log-probs before training; TRL computes them inside every step, since its
``precompute_ref_log_probs`` refuses vision data), and peak memory — the process's peak resident set
on a CPU (``ru_maxrss``), ``torch.cuda.max_memory_allocated`` on a GPU. Ratios are against TRL's
DPO step, measured in the same run. Figures go to ``benchmarks/results/training.json``. On a CPU the peak resident set is mostly the
libraries (compare ``peak_before_train_mb``); the tiny model itself is a few MB.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the kit and tests/support (tiny random models)
CONFIGS = {
    "kit_dpo": "the kit's dpo (PreferenceTrainer, cached reference)",
    "kit_rdpo": "the kit's rdpo (three sequences per pair, cached reference)",
    "kit_rdpo_onthefly": "the kit's rdpo, reference log-probs computed in every step",
    "trl_dpo": "TRL DPOTrainer, sigmoid loss, LoRA via peft_config (reference = adapters disabled)",
}


def _synthetic_preferences(folder: Path, n: int) -> Path:
    """n records with 32 px images, for the tiny random LLaVA when no tiny-world run exists."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    words = "a red blue green cat dog tree house on the left right top bottom and small big".split()
    recs = []
    for i in range(n):
        for name in (f"v{i}.png", f"r{i}.png"):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "img" / name)
        recs.append({"id": f"s{i}", "prompt": "describe the picture", "images": [f"img/v{i}.png"],
                     "retrieved_image": f"img/r{i}.png",
                     "chosen": " ".join(rng.choice(words, 20)), "rejected": " ".join(rng.choice(words, 20))})
    path = folder / "preferences.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def worker(args) -> dict:
    """Run one configuration; returns its figures (called in a fresh subprocess)."""
    import torch
    from transformers import TrainerCallback, set_seed

    from realign_lib.files import read_jsonl
    from realign_lib.models import vlm
    from realign_lib.training import config as training
    from realign_lib.training.batches import PreferenceDataset
    from realign_lib.training.trainer import PreferenceTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    set_seed(0)
    if args.model:
        model, processor = vlm.load_vlm(args.model, dtype="bfloat16" if args.bf16 else "float32", device=device)
    else:
        from tests.support.tiny_models import tiny_llava
        model, processor = tiny_llava()
        model.to(device)
    pref_path = Path(args.preferences)
    records = read_jsonl(pref_path)[:args.batch * args.steps]
    root = Path(args.root) if args.root else pref_path.parent
    rss_before = _peak_memory_mb(device)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    common = dict(learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                  per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, max_steps=args.steps,
                  report_to="none", logging_steps=1, save_strategy="no", seed=0, bf16=args.bf16,
                  use_cpu=device == "cpu", dataloader_num_workers=0, disable_tqdm=True, optim="adamw_torch")
    KIT_FIELDS = {f.name for f in dataclasses.fields(training.PreferenceConfig)}
    common["warmup_steps"] = 0.0  # PreferenceConfig's type: a fraction or a whole number of steps, as a float
    t_ref = 0.0
    out = Path(tempfile.mkdtemp(prefix=f"bench_{args.config}_"))
    if args.config.startswith("kit_"):
        loss = "dpo" if args.config == "kit_dpo" else "rdpo"
        cfg = training.PreferenceConfig(loss=loss, lora_r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                        precompute_ref=args.config != "kit_rdpo_onthefly",
                                        **{k: v for k, v in common.items() if k in KIT_FIELDS})
        ds = PreferenceDataset(records, root=root, need_retrieved=loss == "rdpo")
        # the settings PreferenceConfig has are its fields (one name per setting); the rest go to TrainingArguments
        targs = cfg.training_arguments(out, **{k: v for k, v in common.items() if k not in KIT_FIELDS})
        t0 = time.perf_counter()
        trainer = PreferenceTrainer(model, cfg, ds, processor, args=targs, ref_cache=out / "ref.jsonl",
                                    callbacks=[Timer()])
        t_ref = time.perf_counter() - t0
    else:
        from datasets import Dataset
        from peft import LoraConfig
        from trl import DPOConfig, DPOTrainer

        ds = PreferenceDataset(records, root=root, need_retrieved=False)
        tok = processor.tokenizer
        items = [ds[i] for i in range(len(ds))]
        data = Dataset.from_dict({
            "images": [[vlm.to_pil(it["image"])] for it in items],
            "prompt": [vlm.chat_prompt(processor, it["prompt"]) for it in items],
            "chosen": [" " + it["chosen"] + tok.eos_token for it in items],
            "rejected": [" " + it["rejected"] + tok.eos_token for it in items]})
        dargs = DPOConfig(output_dir=str(out), beta=0.1, loss_type=["sigmoid"], max_length=None,
                          precompute_ref_log_probs=False, **common)
        peft_cfg = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, bias="none",
                              target_modules=training.lora_target_names(model, "language_model"))
        trainer = DPOTrainer(model=model, args=dargs, train_dataset=data, processing_class=processor,
                             peft_config=peft_cfg, callbacks=[Timer()])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    steady = times[args.warmup:] or times
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"config": args.config, "what": CONFIGS[args.config], "steps": len(times),
            "step_seconds_median": statistics.median(steady), "step_seconds_mean": statistics.fmean(steady),
            "setup_seconds": round(t_ref, 3), "train_wall_seconds": round(wall, 3),
            "peak_memory_mb": round(_peak_memory_mb(device), 1), "peak_before_train_mb": round(rss_before, 1),
            "memory_measure": "torch.cuda.max_memory_allocated" if device == "cuda" else "peak RSS (ru_maxrss)",
            "final_loss": logs[-1]["loss"] if logs else None, "device": device,
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="model folder (default: a tiny-world run's model, else a random tiny LLaVA)")
    ap.add_argument("--preferences", default="", help="preferences.jsonl (default: the run's, else synthetic)")
    ap.add_argument("--root", default="", help="folder the image paths are relative to")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (0: torch's default)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "training.json"))
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        args.config = args.worker
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    if not args.model:
        for run in ("runs/tiny_world", "runs/tiny_world_comparison"):
            m, p = ROOT / run / "model" / "tiny_vlm", ROOT / run / "03_induction" / "preferences.jsonl"
            if (m / "config.json").is_file() and p.is_file():
                args.model, args.preferences, args.root = str(m), str(p), str(ROOT / run)
                break
    if not args.preferences:
        args.preferences = str(_synthetic_preferences(Path(tempfile.mkdtemp(prefix="bench_prefs_")),
                                                      args.batch * args.steps))
    results = {}
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--worker", name, "--model", args.model, "--preferences", args.preferences,
               "--root", args.root, "--batch", str(args.batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--lora-r", str(args.lora_r), "--threads", str(args.threads)]
        if args.bf16:
            cmd.append("--bf16")
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
        line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
        if res.returncode != 0 or line is None:
            print(f"{name}: failed\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[name] = json.loads(line[7:])
        r = results[name]
        print(f"{name:<18} {1000 * r['step_seconds_median']:8.1f} ms/step  setup+ref {r['setup_seconds']:6.1f} s"
              f"  peak {r['peak_memory_mb']:8.1f} MB   ({r['what']})", flush=True)
    ratios = {}
    if "trl_dpo" in results:
        t, m = results["trl_dpo"]["step_seconds_median"], results["trl_dpo"]["peak_memory_mb"]
        for name, r in results.items():
            ratios[name] = {"step_time_vs_trl_dpo": round(r["step_seconds_median"] / t, 3),
                            "peak_memory_vs_trl_dpo": round(r["peak_memory_mb"] / m, 3)}
    if "kit_dpo" in results and "kit_rdpo" in results:
        ratios["kit_rdpo_vs_kit_dpo"] = {
            "step_time": round(results["kit_rdpo"]["step_seconds_median"] / results["kit_dpo"]["step_seconds_median"], 3)}
    for name, r in ratios.items():
        print(f"{name:<22} " + "  ".join(f"{k} {v:.2f}" for k, v in r.items()))
    import torch
    import transformers
    import trl
    summary = {"benchmark": "training_step", "results": results, "ratios": ratios,
               "setup": {"model": args.model or "tiny random LLaVA (testing.tiny_llava)",
                         "preferences": args.preferences, "batch": args.batch, "steps": args.steps,
                         "warmup_steps_excluded": args.warmup, "lora_r": args.lora_r, "threads": args.threads,
                         "bf16": args.bf16},
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "trl": trl.__version__},
               "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    from realign_lib.files import write_json

    print(f"wrote {write_json(args.out, summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
