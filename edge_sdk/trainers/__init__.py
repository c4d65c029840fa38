"""Edge trainers, selectable by name (``edge.trainer``)."""
from edge_sdk.trainers.base import (EdgeTrainer, StepResult, check_trainer_options, create_trainer, list_trainers,
                                    register_trainer)
from edge_sdk.trainers import async_fgd, backprop, forward_grad  # noqa: F401  (register the trainers)

__all__ = ["EdgeTrainer", "StepResult", "check_trainer_options", "create_trainer", "list_trainers", "register_trainer"]
