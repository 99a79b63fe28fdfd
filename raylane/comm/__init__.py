"""Bytes between workers: a counting Communicator over re-formable process groups.

Imports nothing else of raylane.
"""

from raylane.comm.communicator import CommStats, Communicator, Handle, Link
from raylane.comm.process_group import connect, host_store

__all__ = ["CommStats", "Communicator", "Handle", "Link", "connect", "host_store"]
