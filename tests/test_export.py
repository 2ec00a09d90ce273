"""realign_lib.training.export: a LoRA adapter (and a projector trained with it) merged into a plain
save_pretrained checkpoint scores responses as base + adapter does, within 1e-5."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from realign_lib.models import vlm
from realign_lib.models.scoring import response_logprobs
from realign_lib.training import export
from realign_lib.training.config import PreferenceConfig
from tests.support import tiny_models as testing

PROMPTS = ["describe the picture", "what is in the image ?", "is there a dog ?"]
RESPONSES = ["a red cat on the left .", "two dogs and a tree", "no there is not"]


@pytest.mark.parametrize("name", ["llava", "llava_next"])
def test_merged_checkpoint_scores_as_base_plus_adapter(name, tmp_path):
    from peft import get_peft_model

    base_dir = testing.save_tiny(name, tmp_path / "base")
    model, processor = vlm.load_vlm(base_dir, device="cpu")
    cfg = PreferenceConfig(lora_r=4, lora_alpha=8, train_projector=True)
    peft_model = get_peft_model(model, cfg.lora_config(model))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: every LoRA B and the projector copy moved
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    processor.save_pretrained(adapter)

    out = export.merge_adapter(base_dir, adapter, tmp_path / "merged", dtype="float32", device="cpu")
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert (out / "chat_template.jinja").is_file() and (out / "processor_config.json").is_file()
    assert not (out / "adapter_config.json").exists()

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 40, 3), dtype=np.uint8) for _ in PROMPTS]
    with_adapter, _ = vlm.load_vlm(base_dir, device="cpu", adapter=adapter)
    merged, merged_proc = vlm.load_vlm(out, device="cpu")
    plain, _ = vlm.load_vlm(base_dir, device="cpu")
    want = response_logprobs(with_adapter, processor, images, PROMPTS, RESPONSES)
    got = response_logprobs(merged, merged_proc, images, PROMPTS, RESPONSES)
    base = response_logprobs(plain, processor, images, PROMPTS, RESPONSES)
    assert float((got - want).abs().max()) < 1e-5, (got, want)
    assert float((want - base).abs().max()) > 1e-2  # the adapter does change the scores
    assert merged_proc.apply_chat_template is not None and vlm.chat_prompt(merged_proc, "hi") == \
        vlm.chat_prompt(processor, "hi")


def test_merged_config_keeps_every_base_field_and_adds_the_transformers_4_names(tmp_path):
    """Key by key, the merged config.json holds the base checkpoint's values; transformers 5 writes
    rope_parameters and dtype, so rope_theta and torch_dtype are added for transformers-4.x readers
    (a missing rope_theta reads as 1e4 there: Mistral's is 1e6)."""
    import json

    from peft import get_peft_model

    base_dir = testing.save_tiny("llava_next", tmp_path / "base")
    conf = json.loads((base_dir / "config.json").read_text())
    conf["text_config"]["rope_parameters"]["rope_theta"] = 1e6  # as Mistral-7B's
    (base_dir / "config.json").write_text(json.dumps(conf))
    model, processor = vlm.load_vlm(base_dir, device="cpu")
    peft_model = get_peft_model(model, PreferenceConfig(lora_r=4, lora_alpha=8).lora_config(model))
    peft_model.save_pretrained(tmp_path / "adapter")
    out = export.merge_adapter(base_dir, tmp_path / "adapter", tmp_path / "merged", dtype="float32", device="cpu")
    merged = json.loads((out / "config.json").read_text())

    def same(a, b, where=""):
        for k, v in a.items():
            if k in ("transformers_version",):
                continue
            assert k in b, f"{where}{k} lost"
            if isinstance(v, dict):
                same(v, b[k], f"{where}{k}.")
            else:
                assert b[k] == v, (f"{where}{k}", v, b[k])

    same(conf, merged)
    assert merged["text_config"]["rope_theta"] == 1e6 and merged["torch_dtype"] == merged["dtype"] == "float32"
    assert export.with_v4_config_fields({"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}}) \
        == {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}, "rope_theta": 5e5,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
