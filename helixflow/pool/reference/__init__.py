"""Pure-Python reference of ``helixflow._native``: same classes, same methods, same results.

It is the oracle of the differential tests and the baseline of ``bench/bench_scheduler.py``.
``from helixflow.pool import reference as core`` and ``from helixflow import _native as core``
are interchangeable.
"""

from helixflow.pool.reference.batch_builder import BatchBuilder
from helixflow.pool.reference.block_allocator import ROOT_HASH, BlockAllocator, hash_block_tokens
from helixflow.pool.reference.scheduler import Scheduler, SchedulerOutput, UpdateOutput

__all__ = [
    "ROOT_HASH",
    "BatchBuilder",
    "BlockAllocator",
    "Scheduler",
    "SchedulerOutput",
    "UpdateOutput",
    "hash_block_tokens",
]
