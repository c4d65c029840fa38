"""Model zoo: FedGKT edge extractors, server bodies and the full baselines, by name."""
from model_zoo._registry import create_model, is_model, list_models, register_model, seeded
from model_zoo import resnet_gkt  # noqa: F401  (registers the family)

__all__ = ["create_model", "is_model", "list_models", "register_model"]
