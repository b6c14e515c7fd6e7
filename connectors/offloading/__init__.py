"""The OffloadingConnector and its parts: config, offload blocks (keys and
window math), lookups off the step loop, loads in flight, device copies."""
from .config import OffloadingConfig
from .connector import OffloadingConnector, tier_stats

__all__ = ["OffloadingConfig", "OffloadingConnector", "tier_stats"]
