"""Training strategies; importing this package registers every built-in one."""

from raylane.strategies import ddp  # noqa: F401  (registers "ddp")
from raylane.strategies import diloco  # noqa: F401  (registers "diloco")
from raylane.strategies import gradient_coding  # noqa: F401  (registers "gradient_coding")
from raylane.strategies import robust  # noqa: F401  (registers "robust")
from raylane.strategies import lgreco  # noqa: F401  (registers "lgreco")
from raylane.strategies import gnnpipe  # noqa: F401  (registers "gnnpipe")
from raylane.strategies import graph_parallel  # noqa: F401  (registers "graph_parallel")
from raylane.strategies import replicas  # noqa: F401  (registers "hsdp")
from raylane.strategies import replica_diloco  # noqa: F401  (registers "replica_diloco")
from raylane.strategies.base import Layout, get, names, register

__all__ = ["Layout", "get", "names", "register"]
