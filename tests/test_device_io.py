"""engines/device_io.to_device on the CPU (the pinned, non-blocking path needs CUDA: the GPU
suite's step test runs it under torch's sync debug mode)."""

from __future__ import annotations

import numpy as np
import torch

from engines.device_io import copy_into, host_buffer, to_device


def test_values_and_dtypes():
    a = np.arange(6, dtype=np.int64)[::2]  # not contiguous
    t = to_device(a, torch.device("cpu"), torch.long)
    assert t.dtype == torch.long and t.tolist() == [0, 2, 4]
    mask = to_device(np.array([True, False]), torch.device("cpu"))
    assert mask.dtype == torch.bool and mask.tolist() == [True, False]
    empty = to_device(np.zeros(0, dtype=np.int64), torch.device("cpu"))
    assert empty.shape == (0,) and empty.dtype == torch.int64


def test_lists_and_conversions_match_torch_as_tensor():
    for value, dtype in (([1.5, 2.0], None), ([1, 2], None), ([True, False], None), (np.arange(3), torch.int32),
                         (np.array([0.5, 1.5], dtype=np.float64), torch.float16), (np.zeros((2, 3), np.float32), None)):
        got = to_device(value, torch.device("cpu"), dtype)
        want = torch.as_tensor(np.asarray(value) if isinstance(value, np.ndarray) else value, dtype=dtype)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), (value, dtype)


def test_a_host_buffer_is_copied_as_it_is():
    """host_buffer: filled through its numpy view, then copied to the device without a second
    host copy (pinned on a GPU; on the CPU a plain tensor the device tensor may share)."""
    host = host_buffer((2, 3), torch.float32, torch.device("cpu"))
    assert not host.is_pinned() and host.shape == (2, 3)
    host.numpy()[...] = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert to_device(host, torch.device("cpu")).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert to_device(host, torch.device("cpu"), torch.float16).dtype == torch.float16
    dst = torch.zeros(2, 3)
    copy_into(dst, host)
    assert torch.equal(dst, host) and dst.data_ptr() != host.data_ptr()
