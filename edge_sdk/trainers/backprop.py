"""Local SGD/Adam with backpropagation: the default edge trainer."""
from __future__ import annotations

from model_zoo.losses import gkt_loss
from model_zoo.optim import make_optimizer
from edge_sdk.trainers.base import EdgeTrainer, StepResult, register_trainer


@register_trainer("backprop")
class BackpropTrainer(EdgeTrainer):
    def __init__(self, model, cfg):
        super().__init__(model, cfg)
        self.optimizer = make_optimizer(model.parameters(), cfg)

    def train_step(self, images, labels, teacher_logits, has_teacher) -> StepResult:
        self.model.train()
        out = self.model(images)
        logits = out[0] if isinstance(out, tuple) else out  # GKT edge models also return features
        loss, ce, kd = gkt_loss(logits, labels, teacher_logits, has_teacher, self.cfg.kd_alpha, self.cfg.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        correct = int((logits.detach().argmax(1) == labels).sum())
        return StepResult(float(loss.detach()), float(ce), float(kd), correct, len(labels))

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
