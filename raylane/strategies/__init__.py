"""Training strategies; importing this package registers every built-in one."""

from raylane.strategies import ddp  # noqa: F401  (registers "ddp")
from raylane.strategies import diloco  # noqa: F401  (registers "diloco")
from raylane.strategies import gradient_coding  # noqa: F401  (registers "gradient_coding")
from raylane.strategies import robust  # noqa: F401  (registers "robust")
from raylane.strategies import lgreco  # noqa: F401  (registers "lgreco")
from raylane.strategies.base import get, names, register

__all__ = ["get", "names", "register"]
