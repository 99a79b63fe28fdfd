"""Bytes between workers: a counting Communicator over re-formable process groups, compressors,
and the compressed collectives built on them.

Imports nothing else of raylane.
"""

from raylane.comm.collectives import (CollectiveHandle, compressed_allgather, expected_bytes_sent,
                                      powersgd_allreduce, quantized_allreduce)
from raylane.comm.communicator import CommStats, Communicator, Handle, Link
from raylane.comm.compression_config import (CompressionConfig, compressor_names, parse_spec, register_compressor,
                                             spec_of)
from raylane.comm.compressors import Compressor, Payload
from raylane.comm.error_feedback import ErrorFeedback
from raylane.comm.process_group import connect, host_store

__all__ = ["CollectiveHandle", "CommStats", "Communicator", "CompressionConfig", "Compressor", "ErrorFeedback",
           "Handle", "Link", "Payload", "compressed_allgather", "compressor_names", "connect",
           "expected_bytes_sent", "host_store", "parse_spec", "powersgd_allreduce", "quantized_allreduce",
           "register_compressor", "spec_of"]
