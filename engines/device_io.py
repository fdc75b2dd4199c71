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


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host tensor to fill (through its `.numpy()` view) and then copy to `device` as it is:
    pinned for a CUDA device, from PyTorch's caching host allocator, so that the copy is
    asynchronous and reads it in place, where a numpy array is first copied into a pinned block
    (`_pinned`): one pass over the bytes on the host instead of two. The allocator keeps the
    block until the copy that reads it has run, so a new buffer per step is safe."""
    return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")


def to_device(array, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`array` (numpy array or list, or a host tensor: host_buffer's) as a tensor on `device`,
    queued without a synchronization. On the CPU the tensor may share the array's memory (as
    torch.from_numpy does)."""
    if isinstance(array, torch.Tensor):
        return array.to(device, dtype=dtype, non_blocking=array.is_pinned())
    host = np.ascontiguousarray(array, dtype=None if dtype is None else _NUMPY_OF[dtype])
    if dtype is None and not isinstance(array, np.ndarray) and host.dtype == np.float64:
        host = host.astype(np.float32)  # a list of floats: torch's default dtype, as torch.as_tensor gives
    if device.type != "cuda":
        return torch.from_numpy(host).to(device)
    dtype = dtype or torch.from_numpy(host[:0].reshape(-1)).dtype
    if host.size == 0:  # nothing to copy: no pinned block to ask for
        return torch.empty(host.shape, dtype=dtype, device=device)
    return _pinned(host, dtype).to(device, non_blocking=True)


def copy_into(dst: torch.Tensor, array) -> None:
    """Copy a host array into the device tensor `dst` (same shape) without a synchronization:
    through a pinned block, as `to_device`, but into a buffer that already exists (a CUDA
    graph's static input). A host tensor (host_buffer's) is copied as it is."""
    if isinstance(array, torch.Tensor):
        dst.copy_(array, non_blocking=array.is_pinned())
        return
    host = np.ascontiguousarray(array, dtype=_NUMPY_OF[dst.dtype])
    if dst.device.type != "cuda":
        dst.copy_(torch.from_numpy(host))
        return
    if host.size == 0:
        return
    dst.copy_(_pinned(host, dst.dtype), non_blocking=True)


def _pinned(host: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A pinned block from PyTorch's caching host allocator (kept until the copy that reads it
    has run), filled by numpy's copy on this thread: torch's own copy into the pinned block runs
    on its intra-op pool, whose threads then spin. On the H200 that cost the engine process
    about 5 cores at 1,536 streams and slowed the step (bench/RESULTS.md, run 24)."""
    pinned = torch.empty(host.shape, dtype=dtype, pin_memory=True)
    pinned.numpy()[...] = host
    return pinned


_NUMPY_OF = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
             torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8,
             torch.uint8: np.uint8, torch.bool: np.bool_}
