"""Full-graph GNN training: partitioning (partition.py), the stage engine (engine.py), the hybrid's halo
exchange (hybrid.py), shared options and the driver (common.py), gnnpipe and graph_parallel."""
