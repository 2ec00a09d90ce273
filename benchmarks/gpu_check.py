"""One GPU check: LLaVA-1.5-7B- and LLaVA-1.6-Mistral-7B-shaped models with random weights, no network.

    python benchmarks/gpu_check.py --out $OUT/gpu_check.json   # on a GPU machine (bf16; a few minutes on one H200)
    python benchmarks/gpu_check.py --tiny --out x.json  # the same code at a tiny shape on a CPU (the tests run it)

For each shape it builds the model on the device (the real classes ``LlavaForConditionalGeneration`` /
``LlavaNextForConditionalGeneration`` at the checkpoints' sizes: CLIP ViT-L/14-336, Llama-2-7B or
Mistral-7B, 32,064-token embedding; weights random, so nothing is downloaded) and the real
processors (336-px CLIP preprocessing: 576 image tokens; LLaVA-1.6 anyres tiles on 640×480 images),
writes a handful of synthetic preference records, then:

* runs the kit's rDPO trainer (``PreferenceTrainer``: LoRA r 128 on the language model, batch 1 × 8,
  cached reference pass) for two steps, with activation checkpointing off and on, recording the
  reference-pass time, the time of each optimiser step (compute alone, and wall time with the
  collation of its micro-batches), the tokens scored per step, peak allocated and reserved device
  memory, the bf16 model-FLOPs utilisation (``mfu_bf16``: 6 × parameters × tokens per step over the
  step's wall time and the GPU's dense peak) and the step-1 losses
  (``loss_dpo`` and ``loss_vdpo`` are log 2 = 0.6931 each: the adapters start as the identity);
* times greedy generation through :func:`realign_lib.models.vlm.generate` for a POPE-style batch (8 new
  tokens) and a fill-style batch (256 new tokens), EOS disabled so every row runs to the end;
* times :func:`realign_lib.models.vlm.image_embeddings` (stage 01's pooled vision features).

A run that does not fit in memory is recorded as ``{"error": "out of memory"}`` and the check goes on.
Writes one JSON where ``--out`` says. Without a CUDA GPU it refuses to start unless ``--tiny``.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_CLIP = dict(image=336, patch=14, v_hidden=1024, v_layers=24, v_heads=16, v_inter=4096)
SHAPES = {  # the llava-hf checkpoints' config.json values
    "llava15_7b": dict(arch="llava", text="llama", hidden=4096, layers=32, heads=32, kv_heads=32, inter=11008,
                       vocab=32064, rope_theta=10000.0, **_CLIP),
    "llava16_mistral_7b": dict(arch="llava_next", text="mistral", hidden=4096, layers=32, heads=32, kv_heads=8,
                               inter=14336, vocab=32064, rope_theta=1000000.0, **_CLIP),
}
_TINY = dict(image=32, patch=8, v_hidden=32, v_layers=2, v_heads=2, v_inter=64, hidden=32, layers=2, heads=2,
             kv_heads=2, inter=64, vocab=0)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
WORDS = ("a the red blue green cat dog car tree house person ball cup table sky on in at left right top bottom "
         "small large big two three and with of there is are").split()


def build(shape: dict, device: str, dtype):
    """``(model, processor)`` of ``shape`` with random weights, created directly on ``device`` in ``dtype``."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        LlavaProcessor,
        MistralConfig,
    )

    from realign_lib.models.vlm import LLAVA_CHAT_TEMPLATE
    from tests.support import tiny_models as testing

    nxt = shape["arch"] == "llava_next"
    template = testing.LLAVA_NEXT_TEMPLATE if nxt else LLAVA_CHAT_TEMPLATE
    tok = testing._tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>", "[INST]", "[/INST]"], template, unk="<unk>",
                             pad="<pad>", bos="<s>", eos="</s>", extra={"image_token": "<image>"})
    s, p = shape["image"], shape["patch"]
    common = dict(image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True, size={"shortest_edge": s},
                  crop_size={"height": s, "width": s})
    kw = dict(tokenizer=tok, patch_size=p, vision_feature_select_strategy="default", num_additional_image_tokens=1,
              chat_template=template)
    text_cls = MistralConfig if shape["text"] == "mistral" else LlamaConfig
    text = text_cls(vocab_size=max(shape["vocab"], len(tok)), hidden_size=shape["hidden"],
                    intermediate_size=shape["inter"], num_hidden_layers=shape["layers"],
                    num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                    max_position_embeddings=4096 if shape["text"] == "llama" else 32768,
                    rope_parameters={"rope_type": "default", "rope_theta": shape["rope_theta"]},
                    pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = CLIPVisionConfig(hidden_size=shape["v_hidden"], intermediate_size=shape["v_inter"],
                              num_hidden_layers=shape["v_layers"], num_attention_heads=shape["v_heads"],
                              image_size=s, patch_size=p, projection_dim=768)
    mm = dict(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
              image_seq_length=(s // p) ** 2, vision_feature_select_strategy="default", vision_feature_layer=-2,
              projector_hidden_act="gelu")
    if nxt:
        pins = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]
        proc = LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil(image_grid_pinpoints=pins, **common), **kw)
        config, cls = LlavaNextConfig(image_grid_pinpoints=pins, **mm), LlavaNextForConditionalGeneration
    else:
        proc = LlavaProcessor(image_processor=CLIPImageProcessorPil(**common), **kw)
        config, cls = LlavaConfig(**mm), LlavaForConditionalGeneration
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = cls(config)
    finally:
        torch.set_default_dtype(old)
    return testing._finish(model, tok), proc


def write_records(folder: Path, n: int, size: tuple[int, int], words: int) -> Path:
    """``n`` preference records with random ``size`` (w, h) images and ``words``-word responses."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        for name in (f"v{i}.jpg", f"r{i}.jpg"):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
        recs.append({"id": f"s{i}", "prompt": "describe the picture in detail", "images": [f"v{i}.jpg"],
                     "retrieved_image": f"r{i}.jpg", "chosen": " ".join(rng.choice(WORDS, words)) + " .",
                     "rejected": " ".join(rng.choice(WORDS, words)) + " ."})
    path = folder / "preferences.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_reset():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_reserved_mb() -> float | None:
    """Peak memory the CUDA caching allocator held (what nvidia-smi sees), None on a CPU."""
    import torch

    return round(torch.cuda.max_memory_reserved() / 2 ** 20, 1) if torch.cuda.is_available() else None


#: dense bf16 peak of the GPUs a lent machine may have (the vendors' figures, no sparsity), FLOP/s
PEAK_BF16 = {"H100 PCIe": 756e12, "H200": 989e12, "H100": 989e12, "A100": 312e12}


def _mfu(n_params: int, tokens_per_step: float, step_seconds: float) -> float | None:
    """Model FLOPs utilisation of one optimiser step: 6 × parameters × tokens per step (the usual
    convention; the policy's forward and backward, the reference being cached) over the step's wall
    time and the GPU's dense bf16 peak. LoRA computes no gradients of the frozen weights (≈ 4 N per
    token), so this convention overstates the work by about 1.5×. None on a CPU or an unknown GPU."""
    import torch

    if not torch.cuda.is_available() or step_seconds <= 0:
        return None
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return round(6 * n_params * tokens_per_step / step_seconds / peak, 4) if peak else None


def _peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # process peak RSS (CPU)


def train_run(model, processor, prefs: Path, out: Path, checkpointing: bool) -> dict:
    """Two rDPO steps (LoRA r 128, batch 1 × 8); returns timings, peak memory and step-1 losses.
    The model comes back without its adapters (peft ``unload``)."""
    import torch
    from peft import get_peft_model
    from transformers import TrainerCallback

    from realign_lib.training.batches import PreferenceDataset
    from realign_lib.training.config import PreferenceConfig
    from realign_lib.training.trainer import PreferenceTrainer

    class Clock(TrainerCallback):
        """Each optimiser step's compute (step begin to end) and its wall time from the end of the step
        before, which includes fetching and collating its micro-batches (image preprocessing)."""

        def __init__(self):
            self.steps, self.walls, self.t, self.last = [], [], 0.0, 0.0

        def on_train_begin(self, *a, **k):
            _sync()
            self.last = time.perf_counter()

        def on_step_begin(self, *a, **k):
            _sync()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            _sync()
            now = time.perf_counter()
            self.steps.append(round(now - self.t, 3))
            self.walls.append(round(now - self.last, 3))
            self.last = now

    cfg = PreferenceConfig(loss="rdpo", lora_r=128, lora_alpha=256, per_device_train_batch_size=1,
                           gradient_accumulation_steps=8, max_steps=2, warmup_steps=0.0,
                           activation_checkpointing=checkpointing, dataloader_num_workers=0, logging_steps=1)
    args = cfg.training_arguments(out, save_strategy="no", disable_tqdm=True)
    _peak_reset()
    clock = Clock()
    torch.manual_seed(0)  # the same LoRA initialisation and dropout in every run
    peft_model = get_peft_model(model, cfg.lora_config(model))  # unloaded below, whatever happens
    trainer = None
    try:
        t0 = time.perf_counter()
        trainer = PreferenceTrainer(peft_model, cfg, PreferenceDataset(prefs), processor, args=args,
                                    callbacks=[clock])
        _sync()
        t_ref = time.perf_counter() - t0
        tokens = []  # scored tokens (image tokens included) of every micro-batch the collator builds
        collate = trainer.data_collator

        def counting(items):
            batch = collate(items)
            tokens.append(int(batch["attention_mask"].sum()))
            return batch

        trainer.data_collator = counting
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss_dpo" in h]
        per_step = sum(tokens) / max(len(clock.steps), 1)
        n_params = sum(p.numel() for p in trainer.model.parameters())
        res = {"reference_seconds": round(t_ref, 2), "step_seconds": clock.steps,
               "step_seconds_with_collation": clock.walls, "tokens_per_step": round(per_step),
               "peak_memory_mb": _peak_mb(), "peak_reserved_mb": _peak_reserved_mb(),
               "mfu_bf16": _mfu(n_params, per_step, clock.walls[-1] if clock.walls else 0.0),
               "step1": {k: round(logs[0][k], 4) for k in ("loss_dpo", "loss_vdpo", "pref/loss")},
               "step2": {k: round(logs[1][k], 4) for k in ("loss_dpo", "loss_vdpo", "pref/loss")},
               "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}
    except torch.OutOfMemoryError:
        res = {"error": "out of memory", "peak_memory_mb": _peak_mb()}
    finally:
        del trainer
        peft_model.unload()
        _peak_reset()
    return res


def generation_run(model, processor, images, new_tokens: int, batch: int) -> dict:
    """Greedy generation of ``new_tokens`` for ``batch`` (image, question) rows, EOS off."""
    from realign_lib.models import vlm

    model.eval()
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        qs = ["is there a dog in the image ?"] * batch
        vlm.generate(model, processor, images[:1], qs[:1], max_new_tokens=2, batch_size=1)  # warm-up
        _sync()
        t0 = time.perf_counter()
        vlm.generate(model, processor, images[:batch], qs, max_new_tokens=new_tokens, batch_size=batch)
        _sync()
        sec = time.perf_counter() - t0
    finally:
        model.generation_config.eos_token_id = eos
    return {"batch": batch, "new_tokens": new_tokens, "seconds": round(sec, 3),
            "tokens_per_second": round(batch * new_tokens / sec, 1)}


def embedding_run(model, processor, images, batch: int) -> dict:
    from realign_lib.models import vlm

    vlm.image_embeddings(model, processor, images[:2], batch_size=2)  # warm-up
    _sync()
    t0 = time.perf_counter()
    emb = vlm.image_embeddings(model, processor, images, batch_size=batch)
    _sync()
    sec = time.perf_counter() - t0
    return {"images": len(images), "batch": batch, "dim": int(emb.shape[1]), "seconds": round(sec, 3),
            "images_per_second": round(len(images) / sec, 1)}


def check_shape(name: str, shape: dict, device: str, dtype, tiny: bool, work: Path) -> dict:
    """Everything for one shape; the model is freed at the end."""
    import torch

    from realign_lib.models.scoring import build_scoring_batch

    _peak_reset()
    t0 = time.perf_counter()
    model, processor = build(shape, device, dtype)
    _sync()
    out = {"shape": shape, "build_seconds": round(time.perf_counter() - t0, 1),
           "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(dtype)}
    size = (40, 32) if tiny else (640, 480)  # COCO-like images: LLaVA-1.6 picks 2 × 1 tiles of 336 px + the base
    folder = work / name
    folder.mkdir()
    prefs = write_records(folder, 16, size, words=12 if tiny else 80)
    batch = build_scoring_batch(processor, [folder / "v0.jpg"], ["describe the picture in detail"],
                                [json.loads(prefs.read_text().splitlines()[0])["chosen"]])
    out["tokens_per_row"] = int(batch["attention_mask"].sum())
    model.train()
    for ck in (False, True):
        out[f"train_checkpointing_{'on' if ck else 'off'}"] = train_run(model, processor, prefs, folder / f"t{ck}", ck)
    images = [folder / f"v{i}.jpg" for i in range(16)]
    with torch.no_grad():
        out["generation_pope"] = generation_run(model, processor, images, 8, 16)
        out["generation_fill"] = generation_run(model, processor, images, 16 if tiny else 256, 16)
        out["image_embeddings"] = embedding_run(model, processor, images * (1 if tiny else 4), 8 if tiny else 32)
    del model
    _peak_reset()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU, float32): the test of this script")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--out", required=True, help="the JSON to write, e.g. $OUT/gpu_check.json on a lent machine; "
                                                "commit it as benchmarks/results/gpu_check.json")
    args = ap.parse_args(argv)
    import torch
    import transformers

    if not torch.cuda.is_available() and not args.tiny:
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False: a CPU build of torch, or "
              "CUDA_VISIBLE_DEVICES hides them). The 7B shapes would be built in fp32 on the CPU and run for hours; "
              "run it on a GPU machine, or with --tiny to check the script itself on the CPU.", file=sys.stderr)
        return 2

    t0 = time.time()
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        torch.set_num_threads(1)
    result = {"device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu", "tiny": args.tiny,
              "torch": torch.__version__, "transformers": transformers.__version__, "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes.split(","):
            shape = dict(SHAPES[name], **(_TINY if args.tiny else {}))
            if args.tiny and shape["text"] == "mistral":
                shape["kv_heads"] = 1  # grouped-query attention, as Mistral's 8 of 32
            print(f"{name}: building on {device} ({dtype})", flush=True)
            result["shapes"][name] = check_shape(name, shape, device, dtype, args.tiny, Path(tmp))
            print(json.dumps(result["shapes"][name]), flush=True)
    result["seconds_total"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['seconds_total']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
