"""Build the next step's micro-batches on a background thread while this step computes.

Batches are addressed by (step, micro-batch), so which thread builds them changes nothing
in them; building them (image decoding, tokenising, collating: about 8% of a default-job
step) then overlaps the forward and backward instead of preceding it. One worker, and
never two builds at once: the data sources keep counters and caches that are not meant
for concurrent use. What reads those counters (``DataBundle.stats``) must do so between
``take`` and ``ahead``, when the worker is idle, so a run's records do not depend on the
thread's timing.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Optional, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """``take(step)`` returns ``make(step)``, built ahead if ``ahead(step)`` asked for it
    (else now, on the caller's thread). ``enabled=False``: no thread, every build on
    ``take``. Use as a context manager (the worker is stopped on exit)."""

    def __init__(self, make: Callable[[int], T], enabled: bool = True):
        self._make = make
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if enabled else None
        self._pending: Optional[tuple[int, Future]] = None

    def take(self, step: int) -> T:
        """Step ``step``'s batches; a build's exception is raised here, in the caller."""
        pending, self._pending = self._pending, None
        if pending is not None:
            got = pending[1].result()  # wait even if unused: never two builds at once
            if pending[0] == step:
                return got
        return self._make(step)

    def ahead(self, step: int) -> None:
        """Start building step ``step``'s batches on the worker (nothing when disabled)."""
        if self._pool is not None and self._pending is None:
            self._pending = (step, self._pool.submit(self._make, step))

    def close(self) -> None:
        """Stop the worker after its current build (whose result is dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending = None

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
