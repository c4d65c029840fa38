import math

import pytest
import torch

from model_zoo.losses import gkt_loss, kd_loss


def test_kd_loss_matches_hand_computation():
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    teacher = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    t = 2.0

    def softmax(row):
        e = [math.exp(v / t) for v in row]
        return [v / sum(e) for v in e]

    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p, q = softmax(t_row), softmax(s_row)
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = expected / 2 * t * t
    assert kd_loss(student, teacher, t).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_zero_when_equal_and_empty():
    x = torch.randn(4, 5)
    assert kd_loss(x, x.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(torch.zeros(0, 5), torch.zeros(0, 5), 3.0).item() == 0.0


def test_kd_loss_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)


def test_gkt_loss_masks_samples_without_teacher():
    torch.manual_seed(0)
    logits, teacher = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.tensor([0, 1, 2, 0])
    mask = torch.tensor([True, False, True, False])
    loss, ce, kd = gkt_loss(logits, labels, teacher, mask, kd_weight=0.5, temperature=2.0)
    assert ce.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())
    assert kd.item() == pytest.approx(kd_loss(logits[mask], teacher[mask], 2.0).item())
    assert loss.item() == pytest.approx(ce.item() + 0.5 * kd.item())
    loss0, _, kd0 = gkt_loss(logits, labels, None, None, 0.5, 2.0)
    assert kd0.item() == 0 and loss0.item() == pytest.approx(ce.item())
