"""FedGKT's losses as pure functions: knowledge distillation and the edge/server objectives."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch.

    The T^2 factor keeps the gradient scale independent of T (Hinton et al. 2015). An empty
    batch gives 0 so callers need no special case.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t)


def gkt_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
             has_teacher: torch.Tensor | None, kd_weight: float, temperature: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CE(labels) + kd_weight * KD(teacher) where the teacher exists; returns (loss, ce, kd).

    Used on the edge (teacher = server soft labels, weight alpha) and on the server (teacher =
    client logits, weight beta). The KD term is averaged over the samples that have a teacher.
    """
    ce = F.cross_entropy(logits, labels)
    if teacher_logits is None or kd_weight == 0.0:
        return ce, ce.detach(), torch.zeros((), dtype=logits.dtype)
    if has_teacher is not None:
        logits, teacher_logits = logits[has_teacher], teacher_logits[has_teacher]
    kd = kd_loss(logits, teacher_logits, temperature)
    return ce + kd_weight * kd, ce.detach(), kd.detach()
