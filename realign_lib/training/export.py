"""Export a trained adapter as a plain checkpoint that transformers, vLLM and lmms-eval load.

    python -m realign_lib.training.export --base llava-hf/llava-1.5-7b-hf --adapter runs/x/04_training/rdpo_seed0 \\
        --out runs/x/merged/rdpo_seed0 [--dtype bfloat16]

:func:`merge_adapter` loads the base model with the LoRA adapter (and a projector trained with
it), folds the adapter into the weights (``peft``'s ``merge_and_unload``) and writes a
``save_pretrained`` folder: ``config.json``, ``model*.safetensors``, ``generation_config.json``,
the processor (image processor, tokenizer) and the chat template — the same layout as a
llava-hf checkpoint, so ``vllm serve <folder>`` and ``lmms-eval --model llava_hf
--model_args pretrained=<folder>`` take it as they take the base model (``docs/gpu.md``). Its
``config.json`` carries the transformers-4.x names (``rope_theta``, ``torch_dtype``) beside the
transformers-5 ones, for serving environments on transformers 4.x (:func:`with_v4_config_fields`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["merge_adapter", "with_v4_config_fields", "main"]


def with_v4_config_fields(config: dict) -> dict:
    """``config`` (a ``config.json`` as transformers 5 writes it) with the fields transformers 4.x reads
    added beside the new ones, at every level (``text_config``, ``vision_config`` …): ``rope_theta`` and
    ``rope_scaling`` from ``rope_parameters``, ``torch_dtype`` from ``dtype``. A vLLM or lmms-eval
    environment on transformers 4.x would otherwise take its default ``rope_theta`` (1e4; Mistral's is
    1e6) and generate quietly wrong text. Nothing is removed or changed."""
    out = {}
    for key, value in config.items():
        out[key] = with_v4_config_fields(value) if isinstance(value, dict) and key.endswith("_config") else value
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        out.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            out.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    if "dtype" in config:
        out.setdefault("torch_dtype", config["dtype"])
    return out


def merge_adapter(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike,
                  dtype: str = "auto", device: str | None = None) -> Path:
    """Merge the adapter folder ``adapter`` into ``base`` and save the result to ``out``; returns ``out``.

    ``dtype``: ``"auto"`` (bf16 on a GPU that supports it, else fp32) or a torch dtype name; the
    merge happens in that dtype (bf16 rounds the merged weights to bf16, as serving does anyway).
    The processor saved is the adapter folder's if it has one (training saves it there), else the
    base model's.
    """
    from transformers import AutoProcessor

    from realign_lib.files import read_json, write_json
    from realign_lib.models.vlm import load_vlm

    model, processor = load_vlm(base, dtype=dtype, device=device, adapter=adapter)
    merged = model.merge_and_unload()
    merged.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    conf = read_json(out / "config.json")
    write_json(out / "config.json", with_v4_config_fields(conf))  # readable by transformers 4.x too
    adapter = Path(adapter)
    if (adapter / "processor_config.json").is_file() or (adapter / "preprocessor_config.json").is_file():
        processor = AutoProcessor.from_pretrained(str(adapter))
    processor.save_pretrained(out)
    if getattr(processor, "chat_template", None) and not any(out.glob("chat_template.*")):
        (out / "chat_template.jinja").write_text(processor.chat_template, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m realign_lib.training.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the model the adapter was trained on (hub id or folder)")
    p.add_argument("--adapter", required=True, help="the adapter folder a stage-04 run wrote")
    p.add_argument("--out", required=True, help="folder for the merged checkpoint")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    p.add_argument("--device", default=None, help="cuda | cpu (default: a GPU if there is one)")
    args = p.parse_args(argv)
    out = merge_adapter(args.base, args.adapter, args.out, dtype=args.dtype, device=args.device)
    print(f"merged checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
