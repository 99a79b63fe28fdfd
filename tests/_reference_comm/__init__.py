"""Frozen copy of raylane/comm's compressors and collectives as they were before the speed work
(issue 11): the oracle that tests/test_fast_collectives.py compares the new path with, bit for bit.
Only the imports were rewritten; the Communicator and the byte formulas (wire) are raylane's. The
modules the speed work left unchanged (compressors, quantizers, quant, powersgd, error_feedback)
are aliases of raylane's own, so only what changed (collectives, sparse) is copied.
Do not edit: a change here would move the reference, not fix the code under test.
"""
