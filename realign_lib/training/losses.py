"""Preference losses as pure functions of summed response log-probabilities.

Notation (Re-Align, Eq. 3–5): ``x`` prompt, ``v`` the image, ``v_l`` the
retrieved image, ``y_w`` chosen, ``y_l`` rejected; every ``*_logps`` argument is a ``(B,)``
tensor of log π(y | x, v) summed over the response tokens (see
:func:`realign_lib.models.scoring.sequence_logprobs`), for the policy or the frozen reference. Each function
returns a dict of ``(B,)`` tensors: ``loss`` (to be averaged by the caller), its terms, and the
implicit rewards ``β·(log π − log π_ref)`` (detached) for logging.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dpo", "rdpo", "mdpo", "rdpo_released", "released_noisy_logprobs"]


def _reward(policy: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    return beta * (policy - ref).detach()


def dpo(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float) -> dict:
    """Sigmoid DPO (Rafailov et al. 2023; Re-Align Eq. 3), all inputs ``(B,)``:

        L_DPO = −log σ(β[log π(y_w|x,v)/π_ref(y_w|x,v) − log π(y_l|x,v)/π_ref(y_l|x,v)])
    """
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(beta * margin)
    return {"loss": loss, "loss_dpo": loss.detach(),
            "reward_chosen": _reward(policy_chosen_logps, ref_chosen_logps, beta),
            "reward_rejected": _reward(policy_rejected_logps, ref_rejected_logps, beta)}


def rdpo(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
         policy_retrieved_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
         ref_rejected_logps: torch.Tensor, ref_retrieved_logps: torch.Tensor, beta: float) -> dict:
    """Re-Align's rDPO (Eq. 5) = L_DPO + L_vDPO, all inputs ``(B,)``; ``*_retrieved_logps`` are
    log π(y_w | x, v_l): the *chosen* response under the *retrieved* image.

        L_vDPO = −log σ(β[log π(y_w|x,v)/π_ref(y_w|x,v) − log π(y_w|x,v_l)/π_ref(y_w|x,v_l)])
    """
    out = dpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    visual = dpo(policy_chosen_logps, policy_retrieved_logps, ref_chosen_logps, ref_retrieved_logps, beta)
    out["loss_vdpo"] = visual["loss"].detach()
    out["loss"] = out["loss"] + visual["loss"]
    out["reward_retrieved"] = visual["reward_rejected"]
    return out


def mdpo(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
         policy_cropped_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
         ref_rejected_logps: torch.Tensor, ref_cropped_logps: torch.Tensor, beta: float) -> dict:
    """mDPO (Wang et al. 2024) = L_DPO + L_cond + L_anchor, all inputs ``(B,)``;
    ``*_cropped_logps`` are log π(y_w | x, v_crop) with a random crop keeping 1–20 % of the image:

        L_cond   = −log σ(β[log π(y_w|x,v)/π_ref(y_w|x,v) − log π(y_w|x,v_crop)/π_ref(y_w|x,v_crop)])
        L_anchor = −log σ(β · log π(y_w|x,v)/π_ref(y_w|x,v))          (anchor δ = 0)
    """
    out = dpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    cond = dpo(policy_chosen_logps, policy_cropped_logps, ref_chosen_logps, ref_cropped_logps, beta)["loss"]
    anchor = -F.logsigmoid(beta * (policy_chosen_logps - ref_chosen_logps))
    out["loss_cond"], out["loss_anchor"] = cond.detach(), anchor.detach()
    out["loss"] = out["loss"] + cond + anchor
    out["reward_cropped"] = _reward(policy_cropped_logps, ref_cropped_logps, beta)
    return out


def released_noisy_logprobs(logits: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """The authors' released "noisy" log-probs (``_get_noisy_batch_logps`` in their TRL copy).

    At every response position it scores the model's own most likely token — ``argmax`` of the
    logits, whatever the label is — instead of the label. ``logits``: ``(B, L, V)`` (position
    ``t`` predicts token ``t + 1``), ``response_mask``: ``(B, L)``. Returns ``(B,)`` =
    ``sum_t mask[t] · max_v log softmax(logits[t-1])_v``. Not the paper's equation: for comparison only.
    """
    logp = logits[:, :-1].float().log_softmax(-1)
    best = logp.max(-1).values
    return (best * response_mask[:, 1:].to(best.dtype)).sum(-1)


def rdpo_released(policy_chosen_logps: torch.Tensor, policy_rejected_noisy: torch.Tensor,
                  policy_retrieved_noisy: torch.Tensor, ref_chosen_logps: torch.Tensor,
                  ref_rejected_noisy: torch.Tensor, ref_retrieved_noisy: torch.Tensor, beta: float) -> dict:
    """rDPO as the authors' release computes it: :func:`rdpo`'s formula, but the rejected and the
    retrieved-image terms take :func:`released_noisy_logprobs` (argmax-token log-probs of the
    rejected sequence and of the chosen sequence under the retrieved image) instead of the
    labels' log-probs. Inputs ``(B,)``. Offered to compare with the paper's loss, not to use.
    """
    return rdpo(policy_chosen_logps, policy_rejected_noisy, policy_retrieved_noisy,
                ref_chosen_logps, ref_rejected_noisy, ref_retrieved_noisy, beta)
