"""Building blocks any sync path can call (DiLoCo's outer sync, a replica's cross-replica step, a coded
round, the robust strategy): aggregators, attacks on a row, per-tensor compression plans."""
