"""Every backbone config stays runnable: its model class, built tiny, takes one rDPO step with the
config's own training settings (the `paper` preset, Table 6, or the `release` preset, the authors'
scripts), through the kit's trainer; the presets hold the values they name; POPE's prompt."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from realign_lib.run.config import load_config
from realign_lib.run.stages import TrainingStage
from realign_lib.training.batches import PreferenceDataset
from realign_lib.training.trainer import PreferenceTrainer
from tests.support import tiny_models as testing

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs" / "backbones").rglob("*.yaml"))
PAPER = {"lora_target_modules": "language_model", "train_projector": True, "learning_rate": 1e-5,
         "projector_learning_rate": 2e-5, "model_max_length": 0}
RELEASE = {"lora_target_modules": "q_proj,k_proj,v_proj,o_proj", "train_projector": True,
           "projector_learning_rate": 2e-5, "learning_rate": 1e-6, "model_max_length": 1048}


def _preset(path: Path) -> str:
    return "release" if path.parent.name == "release" else "paper"


def test_presets_hold_their_values():
    paper = TrainingStage(**load_config(ROOT / "configs" / "paper.yaml").parameters("04_training"))
    release = TrainingStage(**load_config(ROOT / "configs" / "release.yaml").parameters("04_training"))
    for preset, stage, want in (("paper", paper, PAPER), ("release", release, RELEASE)):
        assert {k: getattr(stage, k) for k in want} == want, preset
    assert paper.per_device_train_batch_size * paper.gradient_accumulation_steps == 32  # Table 6 on four GPUs
    assert 16 <= release.per_device_train_batch_size * release.gradient_accumulation_steps <= 32
    # everything else is shared: beta, LoRA rank, schedule, epochs, the loss
    for name in ("loss", "beta", "lora_r", "lora_alpha", "lr_scheduler_type", "warmup_steps", "num_train_epochs",
                 "max_steps", "sft_weight", "projector_learning_rate"):
        assert getattr(paper, name) == getattr(release, name), name
    # both evaluate POPE with LLaVA's / lmms-eval's prompt
    for name in ("paper", "release"):
        assert load_config(ROOT / "configs" / f"{name}.yaml").parameters("05_evaluation")["pope_suffix"] is True


def test_pope_prompt_is_newline_joined(tmp_path):
    from realign_lib.evaluation import pope
    from realign_lib.prompts import LMMS_EVAL_SUFFIX

    model, processor = testing.tiny_llava()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    qs = [{"question_id": 1, "image": "a.png", "text": "Is there a dog in the image?", "label": "no"}]
    ans = pope.answer_pope(model, processor, qs, tmp_path, tmp_path / "ans.jsonl", suffix=LMMS_EVAL_SUFFIX,
                           max_new_tokens=2)
    assert ans[0]["prompt"] == "Is there a dog in the image?\nAnswer the question using a single word or phrase."


def test_there_is_a_config_per_paper_backbone():
    names = {p.stem for p in CONFIGS}
    assert {"llava15_7b", "llava15_13b", "llava16_mistral_7b", "llava16_vicuna_7b", "llava16_vicuna_13b",
            "janus_pro_1b", "janus_pro_7b", "smolvlm_256m", "qwen2_vl_2b"} <= names  # + the README's others


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    return testing.write_preferences(tmp_path_factory.mktemp("prefs"), 2)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_backbone_config_takes_one_rdpo_step(path, prefs, tmp_path):
    cfg = load_config(path)
    params = cfg.parameters("04_training")
    models = {cfg.parameters(s).get("model_path") for s in cfg.stages if s[:2] in ("01", "03", "04", "05")}
    assert models == {params["model_path"]}, f"{path.name}: stages name different models {models}"
    # the paper's settings (Re-Align §4.1)
    stage = TrainingStage(**params)
    want = RELEASE if _preset(path) == "release" else PAPER
    if _preset(path) == "release" and "llava16" in path.name:  # anyres tiles: see the test below
        want = dict(want, model_max_length=4096)
    assert {k: getattr(stage, k) for k in want} == want
    assert (stage.loss, stage.beta, stage.lora_r, stage.lora_alpha, stage.max_steps) == ("rdpo", 0.1, 128, 256, -1)
    assert (stage.lr_scheduler_type, stage.warmup_steps, stage.num_train_epochs, stage.sft_weight) == \
        ("cosine", 0.03, 1.0, 0.0)
    arch = testing.arch_of(params["model_path"])
    reason = testing.unavailable_reason(arch)
    if reason:
        pytest.skip(reason)
    model, processor = testing.build_tiny(arch)
    pc = TrainingStage(**{**params, "max_steps": 1, "gradient_accumulation_steps": 1, "per_device_train_batch_size": 2,
                          "learning_rate": 1e-2, "warmup_steps": 0.0}).preference_config()  # a visible step
    ds = PreferenceDataset(str(prefs), root=prefs.parent)                         # on a random tiny model
    args = pc.training_arguments(tmp_path / "out", use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = PreferenceTrainer(model, pc, ds, processor, args=args)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert before and all("lora_" in n or ("modules_to_save" in n and stage.train_projector) for n in before)
    trainer.train()
    log = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert np.isfinite(log["loss"]) and "loss_vdpo" in log and log["loss_dpo"] == pytest.approx(np.log(2), abs=1e-4)
    moved = sum(not torch.equal(p.detach(), before[n]) for n, p in trainer.model.named_parameters() if n in before)
    assert moved > 0


def _llava16_image_tokens(width: int, height: int) -> int:
    """Image tokens of one ``width`` × ``height`` image through LLaVA-NeXT's processor at the llava-hf
    LLaVA-1.6 checkpoints' settings (336-px CLIP tiles of patch 14, their five grid pinpoints, anyres)."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    _, tiny = testing.tiny_llava_next()
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                    image_grid_pinpoints=pinpoints, do_convert_rgb=True)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tiny.tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    batch = proc(images=[Image.new("RGB", (width, height))], text=["<image>\ndescribe"], return_tensors="pt")
    return int((batch["input_ids"] == tiny.tokenizer.convert_tokens_to_ids("<image>")).sum())


def test_release_presets_leave_room_for_llava16_anyres_images():
    """The authors cut sequences at 1048 tokens with LLaVA-1.6 images padded to one 576-token view; the
    Hugging Face LLaVA-NeXT processor tiles every image, so a COCO image alone is longer than 1048: the
    kit's LLaVA-1.6 release presets cut later, and the LLaVA-1.5 ones (576 image tokens) keep 1048."""
    coco = {size: _llava16_image_tokens(*size) for size in ((640, 480), (480, 640), (640, 427), (500, 375))}
    assert all(1800 < n < 3000 for n in coco.values()), coco
    assert all(n > 1048 for n in coco.values())  # the authors' cut would refuse every image
    for path in sorted((ROOT / "configs" / "backbones" / "release").glob("*.yaml")):
        cut = load_config(path).parameters("04_training")["model_max_length"]
        need = (max(coco.values()) if "llava16" in path.name else 576) + 400  # the image, prompt and a response
        assert cut == 0 or cut >= need, (path.name, cut, need)
