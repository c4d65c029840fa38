"""Edge trainers, selectable by name (``edge.trainer``)."""
from edge_sdk.trainers.base import EdgeTrainer, StepResult, create_trainer, list_trainers, register_trainer
from edge_sdk.trainers import backprop  # noqa: F401  (registers "backprop")

__all__ = ["EdgeTrainer", "StepResult", "create_trainer", "list_trainers", "register_trainer"]
