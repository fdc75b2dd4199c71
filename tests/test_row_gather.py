"""engines/row_gather.py: the block copy of slot rows into a strided buffer equals
index_select, and the copy back into the slots equals index_copy_. On a machine without a GPU it runs under Triton's interpreter, where Triton is
installed (PyTorch's CPU wheels do not bring it); the GPU suite runs it on the device
(tests/gpu/test_gpu_fast_cudagraph.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from engines import row_gather

CHECK = textwrap.dedent("""
    import torch
    from engines import row_gather
    torch.manual_seed(0)
    L, S, C, D = 3, 7, 5, 6
    src = torch.randn(L, S, C, D, dtype=torch.float16)
    big = torch.zeros(L, 9, C + 2, D, dtype=torch.float16)   # room for new frames: strided rows
    out = big[:, :4, :C]
    index = torch.tensor([6, 0, 3, 3], dtype=torch.int64)
    assert row_gather.usable(src, out)
    assert row_gather.gather_rows(src, index, out)
    assert torch.equal(out, src.index_select(1, index))
    assert torch.count_nonzero(big[:, :4, C:]) == 0 and torch.count_nonzero(big[:, 4:]) == 0  # nothing else written
    assert not row_gather.usable(src, big[:, :4, :C, :3])  # pieces not contiguous: the caller's index_select
    assert not row_gather.gather_rows(src.float(), index, out)  # dtypes differ
    # and back: the rows written into their slots (distinct), the other slots untouched
    pool = torch.randn(L, S, C, D, dtype=torch.float16)
    want = pool.clone()
    slots = torch.tensor([5, 1, 2], dtype=torch.int64)
    rows = big[:, 4:7, :C]  # strided rows, as a step's outputs may be
    rows.copy_(torch.randn(L, 3, C, D, dtype=torch.float16))
    assert row_gather.scatter_rows(rows, slots, pool)
    want.index_copy_(1, slots, rows)
    assert torch.equal(pool, want)
    # a ring's new frames: rows of one frame into a flattened [L, S * C, D] pool
    ring = torch.randn(L, S, C, D, dtype=torch.float16)
    want = ring.clone()
    positions = torch.tensor([3 * C + 4, 0 * C + 1, 6 * C + 0], dtype=torch.int64)
    frames = torch.randn(L, 3, D, dtype=torch.float16)
    assert row_gather.scatter_rows(frames, positions, ring.flatten(1, 2))
    want.flatten(1, 2).index_copy_(1, positions, frames)
    assert torch.equal(ring, want)
    assert not row_gather.scatter_rows(frames, positions[:2], ring.flatten(1, 2))  # one index a row
    print("ok")
""")


def test_block_copies_equal_index_select_and_index_copy_under_the_interpreter():
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("Triton is not installed (PyTorch's CPU wheels do not bring it); the GPU suite runs the kernel")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_without_a_device_or_interpreter_it_declines_and_the_caller_keeps_index_select():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton's interpreter is on in this process")
    src = torch.randn(2, 3, 4)
    out = torch.empty(2, 2, 4)
    assert not row_gather.usable(src, out)
    assert not row_gather.gather_rows(src, torch.tensor([2, 0]), out)


def test_a_kernel_that_fails_leaves_the_copy_to_index_select(monkeypatch):
    """A compiler or driver failure at the first launch: gather_rows declines from then on and
    the caller keeps index_select (engines/slot_pool.py)."""

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("no compiler here")
            return launch

    monkeypatch.setattr(row_gather, "usable", lambda src, out: True)
    monkeypatch.setattr(row_gather, "triton", type("T", (), {"cdiv": staticmethod(lambda a, b: -(-a // b))}))
    monkeypatch.setattr(row_gather, "_copy_rows_kernel", Broken(), raising=False)
    monkeypatch.setattr(row_gather, "_failed", None)
    src = torch.randn(2, 5, 3, 4)
    out = torch.zeros(2, 3, 3, 4)
    assert not row_gather.gather_rows(src, torch.tensor([4, 1, 0]), out)
    assert row_gather._failed and "no compiler here" in row_gather._failed
    assert not row_gather.gather_rows(src, torch.tensor([4, 1, 0]), out)  # not tried again
    assert not row_gather.scatter_rows(out, torch.tensor([4, 1, 0]), src)  # nor for a commit
    assert torch.count_nonzero(out) == 0
