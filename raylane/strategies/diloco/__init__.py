"""DiLoCo and Streaming DiLoCo: the strategy (strategy.py), the outer optimizer and its (quantized) sync
(outer.py), fragment schedules (fragments.py)."""
