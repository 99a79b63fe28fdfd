"""Multi-rank replicas: the shard helpers and the torch engine (engine.py), DeepSpeed's engine
(deepspeed.py, ds_config.py, ds_comm.py), hsdp (hsdp.py, which picks the engine) and replica_diloco
(strategies/diloco/strategy.py)."""
