"""Which stream slots are taken: the admission limit as a free list. Python and numpy (no torch), so a
process that keeps the books without the model (server.runtime.engine_worker) can allocate too."""

from __future__ import annotations

import threading

import numpy as np

from engines.api import PoolExhaustedError


class SlotAllocator:
    """Thread-safe free list. The event loop acquires; the scheduler releases."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._free = list(range(capacity - 1, -1, -1))
        self._used = np.zeros(capacity, dtype=bool)  # by slot: a batch is checked as one array
        self._lock = threading.Lock()

    def acquire(self) -> int:
        with self._lock:
            if not self._free:
                raise PoolExhaustedError(f"all {self.capacity} stream slots are in use")
            slot = self._free.pop()
            self._used[slot] = True
            return slot

    def release(self, slot: int) -> None:
        with self._lock:
            if not self._is_used(slot):
                raise KeyError(f"slot {slot} is not in use")
            self._used[slot] = False
            self._free.append(slot)

    def in_use(self) -> int:
        with self._lock:
            return self.capacity - len(self._free)

    def used_mask(self, slots: np.ndarray) -> np.ndarray:
        """Whether each of `slots` (each in 0..capacity-1) is in use, as a bool array."""
        with self._lock:
            return self._used[slots]

    def is_used(self, slot: int) -> bool:
        with self._lock:
            return self._is_used(slot)

    def _is_used(self, slot: int) -> bool:
        return 0 <= slot < self.capacity and bool(self._used[slot])
