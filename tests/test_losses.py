"""The preference losses against values computed by hand."""
import math

import pytest
import torch

from realign_lib.training import losses

B = 0.1


def t(*v):
    return torch.tensor(v, dtype=torch.float64, requires_grad=True)


def test_dpo_equal_ratios_give_log2_and_known_margin():
    out = losses.dpo(t(-5.0, -1.0), t(-7.0, -3.0), t(-5.0, -1.0), t(-7.0, -3.0), beta=B)
    assert torch.allclose(out["loss"], torch.full((2,), math.log(2), dtype=torch.float64))
    # policy raises chosen by 2 nats and lowers rejected by 3 → margin 5
    out = losses.dpo(t(-3.0), t(-10.0), t(-5.0), t(-7.0), beta=B)
    assert out["loss"].item() == pytest.approx(-math.log(1 / (1 + math.exp(-B * 5))))
    assert out["reward_chosen"].item() == pytest.approx(0.2) and out["reward_rejected"].item() == pytest.approx(-0.3)


def test_dpo_gradient_signs():
    pc, pr = t(-4.0), t(-6.0)
    losses.dpo(pc, pr, t(-4.0), t(-6.0), beta=B)["loss"].sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises chosen, lowers rejected
    assert pc.grad.item() == pytest.approx(-B / 2) and pr.grad.item() == pytest.approx(B / 2)


def test_rdpo_is_dpo_plus_visual_term():
    pc, pr, pv = t(-3.0), t(-9.0), t(-8.0)
    rc, rr, rv = t(-5.0), t(-7.0), t(-6.0)
    out = losses.rdpo(pc, pr, pv, rc, rr, rv, beta=B)
    m_text, m_vis = (-3 + 5) - (-9 + 7), (-3 + 5) - (-8 + 6)
    expect = -math.log(1 / (1 + math.exp(-B * m_text))) - math.log(1 / (1 + math.exp(-B * m_vis)))
    assert out["loss"].item() == pytest.approx(expect)
    assert out["loss_dpo"].item() + out["loss_vdpo"].item() == pytest.approx(expect)
    out["loss"].sum().backward()
    assert pv.grad.item() > 0 and pr.grad.item() > 0 and pc.grad.item() < 0  # chosen|retrieved image pushed down
    same = losses.rdpo(t(-1.0), t(-2.0), t(-3.0), t(-1.0), t(-2.0), t(-3.0), beta=B)
    assert same["loss"].item() == pytest.approx(2 * math.log(2))


def test_mdpo_terms():
    pc, pr, pcrop = t(-3.0), t(-9.0), t(-8.0)
    rc, rr, rcrop = t(-5.0), t(-7.0), t(-6.0)
    out = losses.mdpo(pc, pr, pcrop, rc, rr, rcrop, beta=B)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expect = -math.log(sig(B * 4)) - math.log(sig(B * 4)) - math.log(sig(B * 2))
    assert out["loss"].item() == pytest.approx(expect)
    eq = losses.mdpo(t(-1.0), t(-2.0), t(-3.0), t(-1.0), t(-2.0), t(-3.0), beta=B)
    assert eq["loss"].item() == pytest.approx(3 * math.log(2))


def test_released_noisy_logprobs_score_the_argmax_token_not_the_label():
    logits = torch.tensor([[[0.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]])
    mask = torch.tensor([[0, 0, 1, 1]])  # response = tokens 2 and 3, predicted at positions 1 and 2
    logp = logits.log_softmax(-1)
    expect = logp[0, 1].max() + logp[0, 2].max()
    assert losses.released_noisy_logprobs(logits, mask).item() == pytest.approx(expect.item())
    from realign_lib.models.scoring import sequence_logprobs
    ids = torch.tensor([[0, 1, 2, 1]])  # labels 2 (not the argmax 0 at position 1) and 1
    assert sequence_logprobs(logits, ids, mask).item() < losses.released_noisy_logprobs(logits, mask).item()
