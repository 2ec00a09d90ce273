"""The preference objective on a scoring batch (stage 04): the policy's summed response log-probs per
row kind (:func:`score_pairs`), the names of the reference's (:func:`reference_keys`), and the loss of
:mod:`realign_lib.training.losses` with its metrics (:func:`compute_preference_loss`).
"""
from __future__ import annotations

import torch

from realign_lib.models.scoring import sequence_logprobs
from realign_lib.training import losses
from realign_lib.training.config import PreferenceConfig

__all__ = ["score_pairs", "reference_keys", "compute_preference_loss"]


# ------------------------------------------------------------------------------------------- loss
_NOT_MODEL_INPUTS = ("response_mask", "ids")


def _model_inputs(model, batch: dict) -> dict:
    """The model's inputs of a scoring batch on its device, floats (pixels) in its dtype.

    Device and dtype come from the first floating parameter, so a DDP / accelerate-wrapped
    model (which has no ``.device``) works too.
    """
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    out = {}
    for k, v in batch.items():
        if k in _NOT_MODEL_INPUTS or k.startswith("ref_"):
            continue
        if torch.is_tensor(v) and param is not None:
            v = v.to(param.device, dtype=param.dtype if v.is_floating_point() else None)
        out[k] = v
    return out


def score_pairs(model, batch: dict, cfg: PreferenceConfig) -> dict[str, torch.Tensor]:
    """One forward pass over the scoring batch → ``(B,)`` summed response log-probs per row kind:
    ``chosen``, ``rejected`` and ``retrieved`` / ``cropped``; for ``rdpo_released`` also
    ``rejected_noisy`` and ``retrieved_noisy`` (:func:`realign_lib.training.losses.released_noisy_logprobs`
    from the same logits). Keeps the graph; wrap in ``torch.no_grad()`` for the reference.
    """
    inputs = _model_inputs(model, batch)
    logits = model(**inputs).logits
    mask = batch["response_mask"].to(logits.device)
    logps = sequence_logprobs(logits, inputs["input_ids"], mask)
    n = len(batch["ids"]) if "ids" in batch else logps.shape[0] // (2 if cfg.third_kind is None else 3)
    out = {"chosen": logps[:n], "rejected": logps[n:2 * n]}
    if cfg.third_kind is not None:
        out[cfg.third_kind] = logps[2 * n:3 * n]
    if cfg.loss == "rdpo_released":
        noisy = losses.released_noisy_logprobs(logits[n:3 * n], mask[n:3 * n])
        out["rejected_noisy"], out["retrieved_noisy"] = noisy[:n], noisy[n:]
    out["chosen_tokens"] = mask[:n, 1:].sum(-1).float()
    return out


def _loss_terms(policy: dict, ref: dict, cfg: PreferenceConfig) -> dict:
    c, r = policy["chosen"], ref["chosen"]
    if cfg.loss == "dpo":
        return losses.dpo(c, policy["rejected"], r, ref["rejected"], cfg.beta)
    if cfg.loss == "rdpo":
        return losses.rdpo(c, policy["rejected"], policy["retrieved"], r, ref["rejected"], ref["retrieved"], cfg.beta)
    if cfg.loss == "mdpo":
        return losses.mdpo(c, policy["rejected"], policy["cropped"], r, ref["rejected"], ref["cropped"], cfg.beta)
    return losses.rdpo_released(c, policy["rejected_noisy"], policy["retrieved_noisy"], r, ref["rejected_noisy"],
                                ref["retrieved_noisy"], cfg.beta)


def reference_keys(cfg: PreferenceConfig) -> tuple[str, ...]:
    """The reference log-probs a loss needs."""
    return {"dpo": ("chosen", "rejected"), "rdpo": ("chosen", "rejected", "retrieved"),
            "mdpo": ("chosen", "rejected", "cropped"),
            "rdpo_released": ("chosen", "rejected_noisy", "retrieved_noisy")}[cfg.loss]


def compute_preference_loss(model, batch: dict, ref_logps: dict | None, cfg: PreferenceConfig,
                            policy_logps: dict | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """``(loss, metrics)`` for one scoring batch from :class:`PreferenceCollator`.

    ``ref_logps``: ``{kind: (B,) tensor}`` with the keys of :func:`reference_keys`; None takes the
    ``ref_<kind>`` tensors of the batch. ``policy_logps``: already computed :func:`score_pairs`
    output (else one forward pass of ``model``). The loss is the batch mean of the
    :mod:`realign_lib.training.losses` function of ``cfg.loss`` plus ``cfg.sft_weight`` × the per-token NLL
    of the chosen response. Metrics (floats, batch means): ``loss`` and each term, rewards,
    the textual margin/accuracy (chosen vs rejected) and, for rDPO/mDPO, the visual ones
    (chosen under v vs under v_l / the crop), and the policy log-probs.
    """
    policy = policy_logps if policy_logps is not None else score_pairs(model, batch, cfg)
    device = policy["chosen"].device
    if ref_logps is None:
        ref_logps = {k[4:]: v for k, v in batch.items() if k.startswith("ref_")}
    missing = [k for k in reference_keys(cfg) if k not in ref_logps]
    if missing:
        raise KeyError(f"reference log-probs {missing} missing for loss {cfg.loss!r}")
    ref = {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in ref_logps.items()}
    out = _loss_terms(policy, ref, cfg)
    loss = out["loss"].mean()
    metrics: dict[str, float] = {}
    for k, v in out.items():
        if k.startswith("loss_"):
            metrics[k] = float(v.float().mean())
    if cfg.sft_weight > 0:
        nll = (-policy["chosen"] / policy["chosen_tokens"].clamp(min=1)).mean()
        loss = loss + cfg.sft_weight * nll
        metrics["loss_sft"] = float(nll.detach())
    metrics["loss"] = float(loss.detach())
    rc, rr = out["reward_chosen"], out["reward_rejected"]
    metrics["rewards/chosen"] = float(rc.mean())
    metrics["rewards/rejected"] = float(rr.mean())
    metrics["rewards/margins"] = float((rc - rr).mean())
    metrics["rewards/accuracies"] = float((rc > rr).float().mean())
    third = {"retrieved": "reward_retrieved", "cropped": "reward_cropped"}.get(cfg.third_kind or "")
    if third:
        rv = out[third]
        metrics[f"rewards/{cfg.third_kind}"] = float(rv.mean())
        metrics["rewards/visual_margins"] = float((rc - rv).mean())
        metrics["rewards/visual_accuracies"] = float((rc > rv).float().mean())
    for k in ("chosen", "rejected", "retrieved", "cropped"):
        if k in policy:
            metrics[f"logps/{k}"] = float(policy[k].detach().float().mean())
    return loss, metrics
