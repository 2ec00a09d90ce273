"""Every backbone config stays runnable: its model class, built tiny, takes one rDPO step with the
config's own training settings (paper hyper-parameters), through the kit's trainer."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from realign_lib import testing, training
from realign_lib.stages import TrainingStage
from realign_lib.trainer import PreferenceTrainer
from realign_lib.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs" / "backbones").glob("*.yaml"))


def test_there_is_a_config_per_paper_backbone():
    names = {p.stem for p in CONFIGS}
    assert {"llava15_7b", "llava15_13b", "llava16_mistral_7b", "llava16_vicuna_7b", "llava16_vicuna_13b",
            "janus_pro_1b", "janus_pro_7b", "smolvlm_256m"} <= names


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefs")
    rng = np.random.default_rng(0)
    recs = []
    for i in range(2):
        for name in (f"v{i}.png", f"r{i}.png"):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / name)
        recs.append({"id": f"s{i}", "prompt": "describe the picture", "images": [f"v{i}.png"],
                     "retrieved_image": f"r{i}.png", "chosen": "a red cat on the left .",
                     "rejected": "a blue dog on the right ."})
    (folder / "preferences.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return folder / "preferences.jsonl"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_backbone_config_takes_one_rdpo_step(path, prefs, tmp_path):
    cfg = load_config(path)
    params = cfg.parameters("04_training")
    models = {cfg.parameters(s).get("model_path") for s in cfg.stages if s[:2] in ("01", "03", "04", "05")}
    assert models == {params["model_path"]}, f"{path.name}: stages name different models {models}"
    # the paper's settings (Re-Align §4.1)
    stage = TrainingStage(**params)
    assert (stage.loss, stage.learning_rate, stage.beta, stage.lora_r, stage.lora_alpha, stage.max_steps) == \
        ("rdpo", 1e-5, 0.1, 128, 256, -1) and stage.per_device_train_batch_size * stage.gradient_accumulation_steps == 8
    assert (stage.lr_scheduler_type, stage.warmup_steps, stage.num_train_epochs, stage.sft_weight) == \
        ("cosine", 0.03, 1.0, 0.0)
    arch = testing.arch_of(params["model_path"])
    reason = testing.unavailable_reason(arch)
    if reason:
        pytest.skip(reason)
    model, processor = testing.build_tiny(arch)
    pc = TrainingStage(**{**params, "max_steps": 1, "gradient_accumulation_steps": 1,
                          "per_device_train_batch_size": 2}).preference_config()
    ds = training.PreferenceDataset(str(prefs), root=prefs.parent)
    args = pc.training_arguments(tmp_path / "out", use_cpu=True, save_strategy="no", disable_tqdm=True,
                                 learning_rate=1e-2, warmup_steps=0)  # a visible step on a random tiny model
    trainer = PreferenceTrainer(model, pc, ds, processor, args=args)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert before and all("lora_" in n for n in before)
    trainer.train()
    log = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert np.isfinite(log["loss"]) and "loss_vdpo" in log and log["loss_dpo"] == pytest.approx(np.log(2), abs=1e-4)
    moved = sum(not torch.equal(p.detach(), before[n]) for n, p in trainer.model.named_parameters() if n in before)
    assert moved > 0
