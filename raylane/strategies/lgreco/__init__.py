"""L-GreCo: layer-wise adaptive gradient compression; its config (config.py) and the strategy
(strategy.py). The planner it runs is a block (raylane.strategies.blocks.compression_plan)."""
