"""One strategy per algorithm behind :class:`Strategy`: ``fedgkt_sync``, ``fedgkt_async``, ``fedavg``."""
from cloud_runtime.strategies.base import STRATEGIES, RunContext, Strategy, strategy_name
from cloud_runtime.strategies import fedavg, fedgkt, fedgkt_async  # noqa: F401  (register the strategies)

__all__ = ["STRATEGIES", "RunContext", "Strategy", "strategy_name"]
