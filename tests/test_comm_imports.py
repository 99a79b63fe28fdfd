"""raylane.comm imports with only torch: no ray, hydra, wandb, zstandard, omegaconf or yaml (GPU hosts that
run benchmarks/gpu_check_comm.py have none of them); zstd is imported when a Zstd stage runs."""

import subprocess
import sys

BLOCKED = ("ray", "hydra", "wandb", "zstandard", "omegaconf", "yaml")

SCRIPT = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {BLOCKED!r}:
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
import raylane.comm, raylane.comm.pipeline, raylane.comm.kernels
from raylane.comm import CompressionConfig
CompressionConfig(name='int', bits=4).build()
print('imported')
"""


def test_raylane_comm_imports_without_ray_hydra_wandb_zstandard_omegaconf():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-2000:]
