"""Training the tiny VLM (:mod:`realign_lib.tinyworld.model`) on the tiny world, in two phases.
The first is needed: with a tower that has not learned the world's objects first, the model's
descriptions ignore the image beyond its scene.

1. :func:`pretrain_vision_tower` — the CLIP tower alone with small heads on the world's labels
   (scene, object presence, per-position object and colour), a stand-in for CLIP's pre-training;
2. :func:`instruction_tune` — the projector and language model on LLaVA-Instruct-style
   conversations (tower frozen), loss on the assistant turns only, as LLaVA's stage 2 does.

A killed run continues from its last saved state (:class:`realign_lib.tinyworld.resume.ResumeState`).

Given a ``check`` (a health check: the figures the model misses), :func:`train_tiny_vlm` then makes
*warm restarts* of phase 2 while the model misses them (:mod:`realign_lib.tinyworld.restarts`).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from realign_lib.tinyworld.model import build_model, build_processor, build_tokenizer, images_to_pixels
from realign_lib.tinyworld.resume import ResumeState
from realign_lib.tinyworld.settings import TinyVLMConfig

__all__ = ["region_weights", "pretrain_vision_tower", "encode_conversations", "split_exchanges", "exchange_loss",
           "instruction_tune", "train_tiny_vlm"]


# -------------------------------------------------------------------------- phase 1: the tower
def _tower_labels(scenes) -> dict[str, torch.Tensor]:
    from realign_lib.tinyworld.scenes import COLOURS, OBJECTS, POSITIONS, SCENES
    pos_index = {p: i for i, p in enumerate(POSITIONS)}
    n = len(scenes)
    scene = torch.zeros(n, dtype=torch.long)
    present = torch.zeros(n, len(OBJECTS))
    pos_obj = torch.full((n, len(POSITIONS)), len(OBJECTS), dtype=torch.long)  # last class = empty
    pos_col = torch.full((n, len(POSITIONS)), len(COLOURS), dtype=torch.long)
    for i, s in enumerate(scenes):
        scene[i] = list(SCENES).index(s.scene)
        for o in s.objects:
            present[i, OBJECTS.index(o.type)] = 1
            pos_obj[i, pos_index[o.position]] = OBJECTS.index(o.type)
            pos_col[i, pos_index[o.position]] = list(COLOURS).index(o.colour)
    return {"scene": scene, "present": present, "pos_obj": pos_obj, "pos_col": pos_col}


def region_weights(image_size: int, patch_size: int) -> torch.Tensor:
    """``(5, P)`` weights averaging the patch tokens that cover each of the world's five positions.

    A patch belongs to a region if its centre is within 1.2 patches of the region's centre (both
    axes); rows are normalised to sum to one. P = (image_size / patch_size)².
    """
    from realign_lib.tinyworld.scenes import IMAGE_SIZE, POSITIONS
    g = image_size // patch_size
    centres = (torch.arange(g, dtype=torch.float32) + 0.5) * patch_size
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    w = torch.zeros(len(POSITIONS), g * g)
    for k, (x, y) in enumerate(POSITIONS.values()):
        x, y = x * image_size / IMAGE_SIZE, y * image_size / IMAGE_SIZE
        near = ((cx - x).abs() <= 1.2 * patch_size) & ((cy - y).abs() <= 1.2 * patch_size)
        w[k] = near.flatten().float()
    return w / w.sum(1, keepdim=True)


def pretrain_vision_tower(model, pixels: torch.Tensor, scenes, cfg: TinyVLMConfig,
                          log: Callable[[dict], None] | None = None,
                          resume: ResumeState | None = None) -> list[dict]:
    """Phase 1: train ``model``'s CLIP tower with small heads on the world's labels.

    ``pixels``: ``(N, 3, H, W)`` normalised images; ``scenes``: their ground truth. Scene and
    object presence are read from the mean of the patch tokens; the object type and colour at each
    of the five positions from the patch tokens covering that position (:func:`region_weights`),
    with heads shared across positions, so that every patch token — which is what the language
    model attends to — carries what is drawn there. The heads are thrown away afterwards.
    With ``resume``, the phase saves its state as it goes and continues from the latest save.
    Returns the loss history.
    """
    from realign_lib.tinyworld.scenes import COLOURS, OBJECTS, SCENES
    tower = model.model.vision_tower
    h = tower.config.hidden_size
    regions = region_weights(cfg.image_size, cfg.patch_size)          # (5, P)
    heads = torch.nn.ModuleDict({
        "scene": torch.nn.Linear(h, len(SCENES)),
        "present": torch.nn.Linear(h, len(OBJECTS)),
        "pos_obj": torch.nn.Linear(h, len(OBJECTS) + 1),               # + "nothing here"
        "pos_col": torch.nn.Linear(h, len(COLOURS) + 1),
    })
    labels = _tower_labels(scenes)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.tower_lr, weight_decay=0.01)
    sched = _cosine(opt, cfg.tower_steps, warmup=max(1, cfg.tower_steps // 20))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    saved_parts = {"model": model, "heads": heads}
    start, hist = resume.restore("tower", saved_parts, opt, sched, g) if resume else (0, [])
    tower.train()
    for step in range(start, cfg.tower_steps):
        idx = torch.randint(0, pixels.shape[0], (cfg.tower_batch,), generator=g)
        patches = tower(pixel_values=pixels[idx]).last_hidden_state[:, 1:]   # (B, P, h), CLS dropped
        pooled = patches.mean(1)                                             # (B, h)
        local = torch.einsum("rp,bph->brh", regions, patches)                # (B, 5, h)
        present_logits = heads["present"](pooled)
        loss = (F.cross_entropy(heads["scene"](pooled), labels["scene"][idx])
                + F.binary_cross_entropy_with_logits(present_logits, labels["present"][idx])
                + F.cross_entropy(heads["pos_obj"](local).flatten(0, 1), labels["pos_obj"][idx].flatten())
                + F.cross_entropy(heads["pos_col"](local).flatten(0, 1), labels["pos_col"][idx].flatten()))
        _optimizer_step(loss, opt, sched, params)
        if step % 50 == 0 or step == cfg.tower_steps - 1:
            with torch.no_grad():
                hit = ((present_logits > 0).float() == labels["present"][idx]).all(1).float().mean()
                pos_acc = (heads["pos_obj"](local).argmax(-1) == labels["pos_obj"][idx]).float().mean()
            rec = {"phase": "tower", "step": step, "loss": round(loss.item(), 4),
                   "presence_exact": round(hit.item(), 3),      # images with every object's presence right
                   "position_object_acc": round(pos_acc.item(), 3)}
            hist.append(rec)
            if log:
                log(rec)
        if resume:
            resume.checkpoint("tower", step + 1, cfg.tower_steps, saved_parts, opt, sched, g, hist)
    tower.eval()
    return hist


def _optimizer_step(loss: torch.Tensor, opt, sched, params) -> None:
    """Backward, clip the gradient norm to 1, step the optimiser and the schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def _cosine(opt, total: int, warmup: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


# ---------------------------------------------------------------------- phase 2: instruction tuning
def _messages(conversations: list[dict]) -> list[dict]:
    """LLaVA-Instruct turns (``from``/``value``, ``<image>`` tag) → chat messages with an image item."""
    messages = []
    for turn in conversations:
        role = "user" if turn["from"] == "human" else "assistant"
        text = turn["value"]
        if role == "user" and "<image>" in text:
            text = text.replace("<image>\n", "").replace("<image>", "").strip()
            messages.append({"role": role, "content": [{"type": "image"}, {"type": "text", "text": text}]})
        else:
            messages.append({"role": role, "content": [{"type": "text", "text": text}]})
    return messages


def _render(m: dict) -> str:
    """One message exactly as :data:`realign_lib.models.vlm.LLAVA_CHAT_TEMPLATE` renders it (checked in the tests)."""
    text = "".join("<image>\n" if c["type"] == "image" else c["text"] for c in m["content"])
    return f"USER: {text} " if m["role"] == "user" else f"ASSISTANT: {text}</s> "


def encode_conversations(conversations: list[list[dict]], tokenizer, n_image_tokens: int) -> list[tuple[list[int], list[int]]]:
    """LLaVA-Instruct conversations → ``[(input_ids, labels)]`` as the chat template renders them.

    The ``<image>`` placeholder is expanded to ``n_image_tokens`` image tokens as the processor
    does; labels are ``-100`` everywhere except on assistant replies and their ``</s>`` (the
    ``ASSISTANT:`` header is not learnt). All turns are tokenised in one batched call.
    """
    msgs = [_messages(c) for c in conversations]
    flat = [_render(m) for ms in msgs for m in ms]
    toks = tokenizer(flat, add_special_tokens=False)["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    head = len(tokenizer("ASSISTANT:", add_special_tokens=False)["input_ids"])
    out, k = [], 0
    for ms in msgs:
        ids, labels = [], []
        for m in ms:
            expanded = []
            for t in toks[k]:
                expanded.extend([image_id] * n_image_tokens if t == image_id else [t])
            k += 1
            ids.extend(expanded)
            labels.extend([-100] * head + expanded[head:] if m["role"] == "assistant" else [-100] * len(expanded))
        out.append((ids, labels))
    return out


def split_exchanges(conversations: list[dict]) -> list[list[dict]]:
    """One LLaVA-Instruct conversation → its single exchanges (user turn + reply), each with the image.

    Training the tiny model on exchanges rather than whole conversations gives the one-word yes/no
    replies as much weight as the long descriptions, keeps sequences short (faster steps), and
    makes every answer depend on the image rather than on an earlier description in the context.
    """
    out = []
    for i in range(0, len(conversations) - 1, 2):
        q, a = conversations[i], conversations[i + 1]
        text = q["value"].replace("<image>\n", "").replace("<image>", "").strip()
        out.append([{"from": "human", "value": "<image>\n" + text}, a])
    return out


def exchange_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged per exchange, then over the batch.

    ``logits``: ``(B, L, V)``; ``labels``: ``(B, L)`` with ``-100`` where nothing is learnt.
    Averaging per exchange first gives a one-word "yes ." reply the same weight as a 30-word
    description; a token-level mean would let descriptions drown the yes/no answers.
    """
    target = labels[:, 1:]
    mask = (target != -100).float()
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), target.clamp(min=0), reduction="none")  # (B, L-1)
    per_seq = (nll * mask).sum(1) / mask.sum(1).clamp(min=1)
    return per_seq.mean()


def instruction_tune(model, tokenizer, pixels: torch.Tensor, records: list[dict], cfg: TinyVLMConfig,
                     log: Callable[[dict], None] | None = None,
                     resume: ResumeState | None = None, phase: str = "sft") -> list[dict]:
    """Phase 2: train projector + language model on single exchanges (vision tower frozen).

    ``pixels``: ``(N, 3, H, W)``, row ``i`` is the image of ``records[i]``; each step samples
    ``sft_batch`` exchanges (see :func:`split_exchanges`); ``cfg.sft_steps`` steps of AdamW under a
    cosine schedule (5 % warm-up) peaking at ``cfg.sft_lr``. With ``resume``, the phase (named
    ``phase`` in the saves and the log) saves its state as it goes and continues from the latest
    save. Returns the loss history.
    """
    n_img = model.config.image_seq_length
    exchanges = [(i, ex) for i, r in enumerate(records) for ex in split_exchanges(r["conversations"])]
    image_of = torch.tensor([i for i, _ in exchanges])
    enc = encode_conversations([ex for _, ex in exchanges], tokenizer, n_img)
    pad = tokenizer.pad_token_id
    tower = model.model.vision_tower
    for p in tower.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.sft_lr, weight_decay=0.0)
    sched = _cosine(opt, cfg.sft_steps, warmup=max(1, cfg.sft_steps // 20))
    g = torch.Generator().manual_seed(cfg.seed + 2)
    saved_parts = {"model": model}
    start, hist = resume.restore(phase, saved_parts, opt, sched, g) if resume else (0, [])
    model.train()
    tower.eval()
    # length buckets (short yes/no exchanges vs long descriptions): each step draws a bucket with
    # probability proportional to its size, then a batch from it, so sampling stays uniform over
    # exchanges in expectation while short batches are not padded to description length
    lengths = torch.tensor([len(ids) for ids, _ in enc])
    cut = float(lengths.float().median()) + 8
    buckets = [torch.nonzero(lengths <= cut).flatten(), torch.nonzero(lengths > cut).flatten()]
    buckets = [b for b in buckets if len(b)]
    bucket_p = torch.tensor([float(len(b)) for b in buckets])
    for step in range(start, cfg.sft_steps):
        bucket = buckets[int(torch.multinomial(bucket_p, 1, generator=g))]
        idx = bucket[torch.randint(0, len(bucket), (cfg.sft_batch,), generator=g)].tolist()
        L = min(cfg.max_length, max(len(enc[i][0]) for i in idx))
        input_ids = torch.full((len(idx), L), pad, dtype=torch.long)
        labels = torch.full((len(idx), L), -100, dtype=torch.long)
        attn = torch.zeros((len(idx), L), dtype=torch.long)
        for row, i in enumerate(idx):  # right padding for training
            ids, lab = enc[i]
            ids, lab = ids[:L], lab[:L]
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, :len(lab)] = torch.tensor(lab)
            attn[row, :len(ids)] = 1
        logits = model(input_ids=input_ids, attention_mask=attn, pixel_values=pixels[image_of[idx]]).logits
        loss = exchange_loss(logits, labels)
        _optimizer_step(loss, opt, sched, params)
        if step % 50 == 0 or step == cfg.sft_steps - 1:
            rec = {"phase": phase, "step": step, "loss": round(loss.item(), 4), "lr": sched.get_last_lr()[0]}
            hist.append(rec)
            if log:
                log(rec)
        if resume:
            resume.checkpoint(phase, step + 1, cfg.sft_steps, saved_parts, opt, sched, g, hist)
    for p in tower.parameters():
        p.requires_grad_(True)
    model.eval()
    return hist


def train_tiny_vlm(world: dict, out_dir: str | os.PathLike, cfg: TinyVLMConfig = TinyVLMConfig(),
                   log: Callable[[dict], None] | None = None, checkpoint_every: int = 100,
                   check: Callable[[object, object, int], list[str]] | None = None) -> dict:
    """Build, train and ``save_pretrained`` the tiny VLM on a world made by ``build_world``.

    Writes the model and processor to ``out_dir`` (safetensors) with ``train_log.jsonl`` and
    ``tiny_vlm.json`` (config, the world's config, timings, parameter count, warm restarts) beside
    them; ``tiny_vlm.json`` is written last and marks a complete model, reused only for the same
    recipe and the same world. Returns that summary.

    ``check(model, processor, restarts)``: the targets the model (in memory, equal to the saved one,
    after ``restarts`` warm restarts) misses, ``[]`` when it meets them all. While it misses some and
    fewer than ``cfg.sft_restarts`` restarts were made, instruction tuning runs another cycle of
    ``cfg.sft_restart_steps`` steps (fresh AdamW, cosine schedule peaking at ``cfg.sft_lr``, sampling
    seed ``cfg.seed + 1000 * cycle``) and the model is saved again. Each check's result is kept in
    the summary's ``checks``; the cycles made in ``restarts``. A reused model is checked again (a run
    with more restarts allowed continues where the last one stopped); one made with other restart
    steps, or more restarts than now allowed, is trained again.

    Killed and called again with the same config, training continues from the last state saved
    in ``out_dir/resume`` (every ``checkpoint_every`` steps; 0 saves none) and ends with the same
    weights and log as an uninterrupted run; the folder is removed once the model is complete.
    """
    from PIL import Image

    from realign_lib.files import append_jsonl, read_appended, read_json, write_json, write_jsonl
    from realign_lib.tinyworld.restarts import finish_swap, recipe, warm_restarts
    from realign_lib.tinyworld.scenes import load_annotations
    from realign_lib.tinyworld.world import world_vocabulary

    out = Path(out_dir)
    marker = out / "tiny_vlm.json"
    trained_on = world.get("config")  # the world's seed and sizes: another world means another model
    log_path = out / "train_log.jsonl"
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)

    def _log(rec):
        append_jsonl(log_path, [rec])
        if log:
            log(rec)

    loaded: dict = {}

    def _data():  # the training images and conversations, loaded once
        if not loaded:
            t0 = time.time()
            records = read_json(world["train_json"])
            img_dir = Path(world["train_images"])
            arr = np.stack([np.asarray(Image.open(img_dir / r["image"]).convert("RGB")) for r in records])
            loaded.update(records=records, pixels=images_to_pixels(arr), seconds=time.time() - t0)
        return loaded["records"], loaded["pixels"]

    summary = None
    if marker.is_file():
        done = read_json(marker)
        made = done.get("restarts", [])
        if (recipe(done.get("config", {})) == recipe(cfg) and done.get("world") == trained_on
                and len(made) <= cfg.sft_restarts and all(r["steps"] == cfg.sft_restart_steps for r in made)):
            finish_swap(out, done)
            summary = dict(done, path=str(out), reused=True)  # (a copied folder: its own path, not the one trained in)
            if check is None or (done.get("checks") and not done["checks"][-1]["missed"]):
                return summary  # nothing to check, or it met its targets: no restart could follow
            from transformers import AutoProcessor, LlavaForConditionalGeneration
            processor = AutoProcessor.from_pretrained(out)
            model = LlavaForConditionalGeneration.from_pretrained(out)
        else:
            marker.unlink()  # made with other settings or on another world: train again
    if summary is None:
        out.mkdir(parents=True, exist_ok=True)
        resume = ResumeState(out / "resume", {"model": recipe(cfg), "world": trained_on}, checkpoint_every, log_path)
        latest = resume.latest()
        if latest is None:
            resume.clear()
            if log_path.exists():
                log_path.unlink()
        else:  # cut the log back to what the saved state had logged
            write_jsonl(log_path, read_appended(log_path)[:latest["log_lines"]])
        records, pixels = _data()
        by_id = {s.id: s for s in load_annotations(world["annotations_train"])}
        tokenizer = build_tokenizer(world_vocabulary(short_answers=world["config"].get("short_answers_per_image", 0) > 0))
        processor = build_processor(tokenizer, cfg)
        model = build_model(tokenizer, cfg)
        t1 = time.time()
        if latest is None or latest["phase"] == "tower":  # a saved instruction-tuning state holds the tower too
            pretrain_vision_tower(model, pixels, [by_id[r["id"]] for r in records], cfg, log=_log, resume=resume)
        t_tower = time.time() - t1
        t2 = time.time()
        instruction_tune(model, processor.tokenizer, pixels, records, cfg, log=_log, resume=resume)
        t_sft = time.time() - t2
        model.save_pretrained(out, safe_serialization=True)
        processor.save_pretrained(out)
        summary = {
            "config": asdict(cfg),
            "world": trained_on,
            "path": str(out),
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "vocab_size": len(tokenizer),
            "image_tokens": int(model.config.image_seq_length),
            "seconds": {"load_images": round(loaded["seconds"], 1), "tower": round(t_tower, 1), "sft": round(t_sft, 1)},
            "torch_threads": torch.get_num_threads(),
            "resumed_from": {"phase": latest["phase"], "step": latest["step"]} if latest else None,
            "restarts": [],
        }
        write_json(marker, summary)
        resume.clear()
    if check is None:
        return summary
    return warm_restarts(out, summary, model, processor, cfg, check, _data, _log, checkpoint_every, log_path,
                         instruction_tune)
