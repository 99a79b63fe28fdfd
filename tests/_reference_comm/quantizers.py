"""Unchanged by the speed work (issue 11): the reference is raylane.comm.quantizers itself."""

import sys

from raylane.comm import quantizers as _live

sys.modules[__name__] = _live
