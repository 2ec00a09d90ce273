"""realign_lib.training.config on the tiny random LLaVA: collator rows, losses vs. separate scoring, the
reference cache, one step against TRL's DPOTrainer, and short PreferenceTrainer runs (+ resume)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from realign_lib.models import vlm
from realign_lib.models.scoring import response_logprobs
from realign_lib.training import config as training
from realign_lib.training import losses, reference
from realign_lib.training.batches import PreferenceCollator, PreferenceDataset, random_crop
from realign_lib.training.config import PreferenceConfig
from realign_lib.training.objective import compute_preference_loss, score_pairs
from realign_lib.training.trainer import PreferenceTrainer
from tests.support import tiny_models as testing

PROMPTS = ["what is in the image ?", "describe the picture", "what colour is the car ?", "is there a dog ?"]
CHOSEN = ["a red cat on the left .", "two dogs and a tree", "the car is blue .", "yes"]
REJECTED = ["a blue dog on the right .", "one cat and a house", "the car is red .", "no there is not"]


@pytest.fixture(scope="module")
def tiny():
    return testing.tiny_llava()


@pytest.fixture()
def prefs(tmp_path):
    """4 preference records with small PNGs; returns the jsonl path."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    recs = []
    for i in range(4):
        for name in (f"v{i}.png", f"r{i}.png"):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "img" / name)
        recs.append({"id": f"s{i}", "prompt": PROMPTS[i], "images": [f"img/v{i}.png"],
                     "retrieved_image": f"img/r{i}.png", "chosen": CHOSEN[i], "rejected": REJECTED[i],
                     "similarity": 0.9, "rank": 1})
    path = tmp_path / "preferences.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_config_checks_name_the_field():
    with pytest.raises(ValueError, match="loss"):
        PreferenceConfig(loss="ipo")
    with pytest.raises(ValueError, match="beta"):
        PreferenceConfig(beta=0)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        PreferenceConfig(gradient_accumulation_steps=0)
    cfg = PreferenceConfig()
    assert (cfg.beta, cfg.lora_r, cfg.lora_alpha, cfg.learning_rate, cfg.projector_learning_rate, cfg.num_train_epochs,
            cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.sft_weight, cfg.precompute_ref,
            cfg.weight_decay) == (0.1, 128, 256, 1e-5, 2e-5, 1.0, 1, 8, 0.0, True, 0.0)
    args = cfg.training_arguments("unused_out")
    assert args.remove_unused_columns is False and args.lr_scheduler_type.value == "cosine"
    assert args.warmup_steps == 0.03 and args.get_warmup_steps(1000) == 30 and args.bf16 is torch.cuda.is_available()


def test_lora_targets_only_language_model(tiny):
    model, _ = tiny
    names = training.lora_target_names(model, "language_model")
    assert names and all(".language_model." in n for n in names)
    assert not any("vision_tower" in n or "lm_head" in n or "projector" in n for n in names)


def test_lora_targets_as_the_config_names_them(tiny):
    model, _ = tiny
    lm = training.lora_target_names(model, "language_model")
    qkvo = training.lora_target_names(model, "q_proj,k_proj,v_proj,o_proj")  # the authors' released scripts
    assert qkvo and set(qkvo) < set(lm) and {n.split(".")[-1] for n in qkvo} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    every = training.lora_target_names(model, "all_linear")
    assert set(lm) < set(every) and any("vision_tower" in n for n in every) and any("projector" in n for n in every)
    assert not any(n.endswith("lm_head") for n in every)
    with pytest.raises(ValueError, match=r"no linear layer named \['qproj'\]"):
        training.lora_target_names(model, "qproj")
    cfg = PreferenceConfig(lora_target_modules="q_proj,v_proj")
    assert sorted(cfg.lora_config(model).target_modules) == sorted(training.lora_target_names(model, "q_proj,v_proj"))


def test_lora_targets_find_idefics3s_text_model():
    """Idefics3 / SmolVLM call their language model ``text_model``: LoRA stays inside it."""
    reason = testing.unavailable_reason("idefics3")
    if reason:
        pytest.skip(reason)
    model, _ = testing.build_tiny("idefics3")
    names = training.lora_target_names(model, "language_model")
    assert names and all(".text_model." in n for n in names)
    assert not any("vision" in n or "connector" in n for n in names)


def test_collator_rows(tiny, prefs):
    _, processor = tiny
    ds = PreferenceDataset(prefs)
    items = [ds[0], ds[1]]
    pix = lambda paths: processor.image_processor([vlm.to_pil(p) for p in paths], return_tensors="pt")["pixel_values"]
    tok = processor.tokenizer

    batch = PreferenceCollator(processor, PreferenceConfig(loss="rdpo"))(items)
    assert batch["input_ids"].shape[0] == 6 and batch["ids"] == ["s0", "s1"]
    v, vl = [it["image"] for it in items], [it["retrieved_image"] for it in items]
    torch.testing.assert_close(batch["pixel_values"], pix(v + v + vl))
    resp = [tok.decode(batch["input_ids"][r][batch["response_mask"][r].bool()]) for r in range(6)]
    want = CHOSEN[:2] + REJECTED[:2] + CHOSEN[:2]
    for got, w in zip(resp, want):
        assert got.replace(" ", "") == (w + "</s>").replace(" ", ""), (got, w)

    dpo = PreferenceCollator(processor, PreferenceConfig(loss="dpo"))(items)
    assert dpo["input_ids"].shape[0] == 4
    col = PreferenceCollator(processor, PreferenceConfig(loss="mdpo"))
    m1, m2 = col(items), col(items)
    assert m1["input_ids"].shape[0] == 6
    torch.testing.assert_close(m1["pixel_values"], m2["pixel_values"])  # crops are seeded per sample
    assert not torch.allclose(m1["pixel_values"][4:], pix(v))
    crop = random_crop(v[0], seed=1)
    assert 0.005 * 1024 <= crop.size[0] * crop.size[1] <= 0.25 * 1024


@pytest.mark.parametrize("loss,n_terms", [("dpo", 1), ("rdpo", 2), ("mdpo", 3), ("rdpo_released", 2)])
def test_policy_equal_reference_gives_log2_per_term(tiny, prefs, loss, n_terms):
    model, processor = tiny
    cfg = PreferenceConfig(loss=loss)
    batch = PreferenceCollator(processor, cfg)([PreferenceDataset(prefs)[i] for i in range(3)])
    ref = reference.reference_logps_for_batch(model, batch, cfg, ref_model=model)
    with torch.no_grad():
        value, metrics = compute_preference_loss(model, batch, ref, cfg)
    assert float(value) == pytest.approx(n_terms * math.log(2), abs=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(0, abs=1e-6)


def test_loss_matches_separate_scoring(tiny, prefs):
    model, processor = tiny
    cfg = PreferenceConfig(loss="rdpo", beta=0.3, sft_weight=0.5)
    items = [PreferenceDataset(prefs)[i] for i in range(3)]
    batch = PreferenceCollator(processor, cfg)(items)
    g = torch.Generator().manual_seed(0)
    ref = {k: -20 * torch.rand(3, generator=g) for k in ("chosen", "rejected", "retrieved")}
    value, metrics = compute_preference_loss(model, batch, ref, cfg)
    value.backward()  # differentiable
    im = [it["image"] for it in items]
    sep = lambda images, resp: response_logprobs(model, processor, images, PROMPTS[:3], resp, batch_size=1)
    pc, pr = sep(im, CHOSEN[:3]), sep(im, REJECTED[:3])
    pv = sep([it["retrieved_image"] for it in items], CHOSEN[:3])
    want = losses.rdpo(pc, pr, pv, ref["chosen"], ref["rejected"], ref["retrieved"], beta=0.3)
    n_tok = batch["response_mask"][:3, 1:].sum(1).float()
    nll = (-pc / n_tok).mean()
    assert float(value.detach()) == pytest.approx(float(want["loss"].mean() + 0.5 * nll), rel=1e-5)
    assert metrics["loss_dpo"] == pytest.approx(float(want["loss_dpo"].mean()), rel=1e-5)
    assert metrics["loss_vdpo"] == pytest.approx(float(want["loss_vdpo"].mean()), rel=1e-5)
    assert metrics["loss_sft"] == pytest.approx(float(nll), rel=1e-5)
    rc, rv = want["reward_chosen"], want["reward_retrieved"]
    assert metrics["rewards/visual_margins"] == pytest.approx(float((rc - rv).mean()), rel=1e-5, abs=1e-6)
    assert metrics["rewards/visual_accuracies"] == pytest.approx(float((rc > rv).float().mean()))


def test_released_noisy_terms_from_same_logits(tiny, prefs):
    model, processor = tiny
    cfg = PreferenceConfig(loss="rdpo_released")
    items = [PreferenceDataset(prefs)[i] for i in range(2)]
    batch = PreferenceCollator(processor, cfg)(items)
    with torch.no_grad():
        out = score_pairs(model, batch, cfg)
        inputs = {k: v for k, v in batch.items() if k not in ("response_mask", "ids")}
        logits = model(**inputs).logits
    noisy = losses.released_noisy_logprobs(logits, batch["response_mask"])
    torch.testing.assert_close(out["rejected_noisy"], noisy[2:4])
    torch.testing.assert_close(out["retrieved_noisy"], noisy[4:6])
    assert bool((out["rejected_noisy"] >= out["rejected"] - 1e-5).all())  # argmax ≥ label log-prob


def test_reference_cache_is_reused(tiny, prefs, tmp_path):
    model, processor = tiny
    cfg = PreferenceConfig(loss="rdpo")
    ds = PreferenceDataset(prefs)
    col = PreferenceCollator(processor, cfg)
    cache = tmp_path / "ref.jsonl"
    first = reference.precompute_reference_logps(model, ds, col, cfg, cache, ref_model=model, batch_size=3)
    assert len(cache.read_text().splitlines()) == 4 and set(first) == {"s0", "s1", "s2", "s3"}

    def boom(*a, **k):
        raise AssertionError("the cache should have been used")

    hook = model.register_forward_pre_hook(boom)
    try:
        second = reference.precompute_reference_logps(model, ds, col, cfg, cache, ref_model=model)
    finally:
        hook.remove()
    assert second == first
    assert "ref_retrieved" in col([ds[0], ds[1]])
    # resumable: a partial cache computes only the missing samples
    cache.write_text("".join(cache.read_text().splitlines(keepends=True)[:2]))
    third = reference.precompute_reference_logps(model, ds, col, cfg, cache, ref_model=model)
    assert len(cache.read_text().splitlines()) == 4
    for k in first:
        for kind in first[k]:
            assert third[k][kind] == pytest.approx(first[k][kind], rel=1e-5)


def test_one_step_matches_trl_dpo_trainer(tiny, prefs, tmp_path):
    """One SGD step of TRL's DPOTrainer (sigmoid) vs. the kit's path on the same tiny LLaVA and batch."""
    import copy

    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    base, processor = tiny
    lr, beta = 0.5, 5.0  # a large β so that the loss is visibly not log 2 with near-uniform tiny models
    ds = PreferenceDataset(prefs)
    items = [ds[0], ds[1]]
    images = [vlm.to_pil(it["image"]) for it in items]
    tok = processor.tokenizer

    # kit: one scoring batch, reference = frozen copy, losses.dpo, one SGD step
    other = testing.tiny_llava(seed=1)[0]  # a reference unlike the policy, so the loss is not log 2
    kit, ref = copy.deepcopy(base).train(), copy.deepcopy(other).eval()
    cfg = PreferenceConfig(loss="dpo", beta=beta)
    batch = PreferenceCollator(processor, cfg)(items)
    ref_lp = reference.reference_logps_for_batch(kit, batch, cfg, ref_model=ref)
    kit_loss, _ = compute_preference_loss(kit, batch, ref_lp, cfg)
    opt = torch.optim.SGD(kit.parameters(), lr=lr)
    kit_loss.backward()
    opt.step()

    # TRL: the same texts (prompt = chat prompt, completion = " " + response + EOS), same images
    data = Dataset.from_dict({
        "images": [[im] for im in images],
        "prompt": [vlm.chat_prompt(processor, it["prompt"]) for it in items],
        "chosen": [" " + it["chosen"] + tok.eos_token for it in items],
        "rejected": [" " + it["rejected"] + tok.eos_token for it in items]})
    args = DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, beta=beta, loss_type=["sigmoid"],
                     per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=1, learning_rate=lr,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="sgd", max_grad_norm=0,
                     max_length=None, report_to="none", logging_steps=1, save_strategy="no", seed=0,
                     dataloader_drop_last=False, precompute_ref_log_probs=False)
    policy = copy.deepcopy(base).train()
    trainer = DPOTrainer(model=policy, ref_model=copy.deepcopy(other).eval(), args=args, train_dataset=data,
                         processing_class=processor)
    trainer.train()
    trl_loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    assert abs(float(kit_loss) - math.log(2)) > 1e-3
    assert trl_loss == pytest.approx(float(kit_loss.detach()), rel=1e-4)
    moved = 0
    for (n, p_kit), (_, p_trl), (_, p0) in zip(kit.named_parameters(), trainer.model.named_parameters(),
                                              base.named_parameters()):
        torch.testing.assert_close(p_trl.detach().cpu(), p_kit.detach(), rtol=1e-4, atol=1e-6, msg=n)
        moved += int(not torch.equal(p_kit.detach(), p0.detach()))
    assert moved > 0


def _run_trainer(model, processor, prefs, out, **cfg_kw):
    cfg = PreferenceConfig(**{"loss": "rdpo", "lora_r": 4, "lora_alpha": 8, "learning_rate": 5e-3,
                              "gradient_accumulation_steps": 1, "max_steps": 3, "warmup_steps": 0.0,
                              "lr_scheduler_type": "constant", "save_steps": 2, "dataloader_num_workers": 0,
                              **cfg_kw})
    args = cfg.training_arguments(out, use_cpu=True, disable_tqdm=True)
    return PreferenceTrainer(model, cfg, PreferenceDataset(prefs), processor, args=args)


def test_trainer_three_steps_logs_and_resumes(prefs, tmp_path):
    model, processor = testing.tiny_llava()
    trainer = _run_trainer(model, processor, prefs, tmp_path / "run", per_device_train_batch_size=4)  # same 4 each step
    assert (tmp_path / "run" / "reference_logps.jsonl").is_file()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for key in ("loss", "learning_rate", "pref/loss", "loss_dpo", "loss_vdpo", "rewards/chosen", "rewards/rejected",
                "rewards/retrieved", "rewards/margins", "rewards/accuracies", "rewards/visual_margins",
                "rewards/visual_accuracies", "logps/chosen"):
        assert all(key in h for h in logs), key
    assert logs[0]["pref/loss"] == pytest.approx(2 * math.log(2), abs=1e-4)  # LoRA starts as identity
    assert logs[2]["pref/loss"] < logs[1]["pref/loss"] < logs[0]["pref/loss"]  # the same batch: loss falls
    assert logs[2]["rewards/margins"] > 0 and logs[2]["rewards/visual_margins"] > 0
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert (ckpt / "trainer_state.json").is_file()

    # resume from checkpoint-2 in a fresh trainer: it runs only step 3 and continues the log
    model2, _ = testing.tiny_llava()
    resumed = _run_trainer(model2, processor, prefs, tmp_path / "run", per_device_train_batch_size=4)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 3
    logs2 = [h for h in resumed.state.log_history if "loss" in h]
    assert [h["step"] for h in logs2] == [1, 2, 3]
    assert logs2[-1]["pref/loss"] == pytest.approx(logs[-1]["pref/loss"], rel=1e-4)


def test_trainer_on_the_fly_reference_mdpo(prefs, tmp_path):
    model, processor = testing.tiny_llava()
    trainer = _run_trainer(model, processor, prefs, tmp_path / "run", loss="mdpo", precompute_ref=False, max_steps=2,
                           per_device_train_batch_size=2)
    assert not (tmp_path / "run" / "reference_logps.jsonl").exists()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["pref/loss"] == pytest.approx(3 * math.log(2), abs=1e-4)
    assert all("loss_anchor" in h and "rewards/cropped" in h for h in logs)
    ev = trainer.evaluate(PreferenceDataset(prefs))  # eval set: reference computed on the fly
    assert math.isfinite(ev["eval_loss"]) and "eval_rewards/visual_accuracies" in ev and "eval_loss_cond" in ev


def test_projector_trained_at_its_own_learning_rate(prefs, tmp_path):
    model, processor = testing.tiny_llava()
    trainer = _run_trainer(model, processor, prefs, tmp_path / "run", train_projector=True,
                           projector_learning_rate=1e-2, max_steps=1)
    opt = trainer.create_optimizer()
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    lrs = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    proj = [n for n in lrs if "multi_modal_projector" in n]
    assert proj and all(lrs[n] == 1e-2 for n in proj)
    assert all(lrs[n] == 5e-3 for n in lrs if n not in proj) and any("lora_" in n for n in lrs)
    assert not any("vision_tower" in n for n in lrs)
    trainer.train()
    saved = tmp_path / "run" / "checkpoint-1" / "adapter_model.safetensors"
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as fh:
        assert any("multi_modal_projector" in k for k in fh.keys())


def test_full_finetune_uses_frozen_copy_as_reference(prefs, tmp_path):
    model, processor = testing.tiny_llava()
    trainer = _run_trainer(model, processor, prefs, tmp_path / "run", use_lora=False, max_steps=2,
                           loss="dpo", sft_weight=1.0, precompute_ref=False, gradient_accumulation_steps=2)
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    before = [p.detach().clone() for p in trainer.ref_model.parameters()]
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.ref_model.parameters()))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("loss_sft" in h for h in logs)
    # with policy == reference at step 1, the Trainer's loss (GA-scaled back) is log 2 + the NLL term
    assert logs[0]["loss"] == pytest.approx(logs[0]["pref/loss"], rel=1e-4)
    assert logs[0]["pref/loss"] == pytest.approx(math.log(2) + logs[0]["loss_sft"], rel=1e-4)


def test_activation_checkpointing_changes_no_number(prefs, tmp_path):
    """Non-reentrant checkpointing (on by default on a GPU) recomputes the same forward pass: on the
    CPU, with LoRA dropout on, three steps give the same losses and the same adapter weights."""
    runs = {}
    for on in (False, True):
        model, processor = testing.tiny_llava()
        torch.manual_seed(0)
        trainer = _run_trainer(model, processor, prefs, tmp_path / f"ckpt{on}", per_device_train_batch_size=2,
                               lora_dropout=0.1, activation_checkpointing=on)
        assert trainer.args.activation_checkpointing is on
        trainer.train()
        base = trainer.model.get_base_model()
        assert base.is_activation_checkpointing is on  # the Trainer really switched it on (or left it off)
        runs[on] = ([h["pref/loss"] for h in trainer.state.log_history if "loss" in h],
                    {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n})
    assert runs[False][0] == runs[True][0] and len(runs[True][0]) == 3
    for n, p in runs[False][1].items():
        assert torch.equal(p, runs[True][1][n]), n


def test_gpu_defaults_follow_the_device():
    cfg = PreferenceConfig()
    on_gpu = torch.cuda.is_available()
    assert cfg.use_activation_checkpointing() is on_gpu and (cfg.num_workers() > 0) is on_gpu
    args = cfg.training_arguments("unused")
    assert args.activation_checkpointing is on_gpu and args.activation_checkpointing_kwargs == {"use_reentrant": False}
    args = PreferenceConfig(activation_checkpointing=True, dataloader_num_workers=2).training_arguments("unused")
    assert args.activation_checkpointing is True and args.dataloader_num_workers == 2
    with pytest.raises(ValueError, match="dataloader_num_workers"):
        PreferenceConfig(dataloader_num_workers=-1)
    with pytest.raises(TypeError, match="activation_checkpointing"):
        PreferenceConfig(activation_checkpointing="yes")


def test_a_training_argument_has_one_name():
    """A PreferenceConfig setting given again as a TrainingArguments override (--targs) is an error,
    not a silent winner; records_to_train is the one rule for max_records."""
    from realign_lib.training.config import records_to_train

    with pytest.raises(ValueError, match="learning_rate: a PreferenceConfig setting"):
        PreferenceConfig().training_arguments("unused", learning_rate=1e-3)
    cfg = PreferenceConfig(max_steps=10, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert records_to_train(1000, 0, cfg) == 80 and records_to_train(1000, 0, cfg, processes=2) == 160
    assert records_to_train(50, 0, cfg) == 50 and records_to_train(1000, 30, cfg) == 30
    assert records_to_train(1000, 0, PreferenceConfig()) == 1000


def test_several_gpus_in_one_process_train_on_one_not_with_dataparallel(prefs, tmp_path):
    """With N GPUs visible to one process the Trainer would wrap the model in DataParallel: each step would
    see N× the pairs and N× fewer steps would be taken. The kit trains on one device and says so. (The GPU
    count is faked: this machine has none.)"""
    model, processor = testing.tiny_llava()
    cfg = PreferenceConfig(loss="rdpo", lora_r=4, lora_alpha=8, gradient_accumulation_steps=1, max_steps=2,
                           per_device_train_batch_size=2, save_steps=10, dataloader_num_workers=0)
    args = cfg.training_arguments(tmp_path / "run", use_cpu=True, disable_tqdm=True)
    args._n_gpu = 4  # what TrainingArguments finds on a 4-GPU machine in one process
    with pytest.warns(UserWarning, match=r"4 GPUs are visible to this one process: training on one of them"):
        trainer = PreferenceTrainer(model, cfg, PreferenceDataset(prefs), processor, args=args)
    assert trainer.args.n_gpu == 1 and trainer._train_batch_size == 2 and trainer.gpus_visible == 4
    trainer.train()
    assert trainer.state.global_step == 2 and not isinstance(trainer.model, torch.nn.DataParallel)


def test_reference_and_policy_take_the_same_precision_path(prefs, tmp_path):
    """bf16 mixed precision: the cached reference pass runs under the same autocast as the policy's
    training forward, so the step-1 rewards are exactly 0 (the adapters start as the identity)."""
    model, processor = testing.tiny_llava()
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    cfg = PreferenceConfig(loss="rdpo", lora_r=4, lora_alpha=8, gradient_accumulation_steps=1, max_steps=1,
                           per_device_train_batch_size=4, save_steps=10, dataloader_num_workers=0, bf16=True)
    trainer = PreferenceTrainer(model, cfg, PreferenceDataset(prefs),
                                processor, args=cfg.training_arguments(tmp_path / "run", use_cpu=True, disable_tqdm=True))
    reference_pass = list(seen)
    trainer.train()
    training = seen[len(reference_pass):]
    assert reference_pass and training and set(reference_pass) == set(training) == {True}
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert log["rewards/chosen"] == log["rewards/rejected"] == log["rewards/retrieved"] == 0.0


def test_the_reference_pass_has_its_own_batch_size(prefs, tmp_path):
    """Training takes one pair per device step (the paper's batch 1); the no-gradient reference pass
    scores reference_batch_size pairs per forward pass."""
    counts = {}
    for ref_batch in (0, 4):
        model, processor = testing.tiny_llava()
        calls = []
        model.register_forward_pre_hook(lambda m, a: calls.append(1))
        cfg = PreferenceConfig(loss="rdpo", lora_r=4, lora_alpha=8, per_device_train_batch_size=1, max_steps=1,
                               save_steps=10, dataloader_num_workers=0, reference_batch_size=ref_batch)
        PreferenceTrainer(model, cfg, PreferenceDataset(prefs), processor,
                          args=cfg.training_arguments(tmp_path / f"run{ref_batch}", use_cpu=True, disable_tqdm=True))
        counts[ref_batch] = len(calls)
    assert counts == {0: 4, 4: 1}  # 4 pairs: one forward each, or all four in one
    with pytest.raises(ValueError, match="reference_batch_size"):
        PreferenceConfig(reference_batch_size=-1)
