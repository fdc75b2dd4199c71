"""Host arrays onto the engine's device without waiting for the device.

A plain `torch.as_tensor(array, device="cuda")` or `.to("cuda")` copies from pageable memory and
then synchronizes the stream: the host waits until every kernel queued before it has finished.
A step made about nine such waits (H200 profile of the 0.6B model at batch 256,
bench/results/h200_run23_ring_long60/step_profile.txt: 9.3 stream synchronizations and 9.7 ms
of host time in them per step), so the host could never prepare a step while the device still
ran the previous one's tail. Through pinned memory the copy is asynchronous: PyTorch's caching
host allocator keeps the pinned block until the copy that reads it has run, so the source array
may change as soon as this returns.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(array, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`array` (numpy array or list) as a tensor on `device`, queued without a synchronization.
    On the CPU the tensor may share the array's memory (as torch.from_numpy does)."""
    host = torch.as_tensor(np.ascontiguousarray(array), dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    if host.numel() == 0:  # nothing to copy: no pinned block to ask for
        return torch.empty(host.shape, dtype=host.dtype, device=device)
    return host.pin_memory().to(device, non_blocking=True)
