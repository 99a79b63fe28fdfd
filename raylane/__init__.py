"""raylane: distributed training on Ray for thin networks and slow, lying or dying machines."""

__version__ = "0.1.0"
