"""A batch's slot rows copied into a strided buffer at the device's memory bandwidth, and back.

A step gathers each row's attention cache (about 7 MB per stream for the 0.6B model) from the
slot pool straight into the encoder's static buffer, whose rows leave room for the step's new
frames, so the destination is not contiguous. PyTorch's `index_select(..., out=strided)` takes
a generic path there: on the H200 at 512 rows it moved the 3.6 GB at about 1.1 TB/s (5.8 ms of
a 27 ms step, bench/results/h200_run24_overlap_off/step_ring_ab_512.txt), a quarter of what
the memory gives. Each (layer, row) piece is one contiguous block in both tensors, so the copy
is a plain block copy: one Triton program per (layer, row, block of the piece).

The commit writes a batch's rows back into their slots (`scatter_rows`), where PyTorch's
`index_copy_` along the slot dimension (dim 1 of `[L, S, *piece]`) takes the same generic path:
in the triton step's profile on an H100 at 512 rows (bench/results/h100_run42_kernels_c29eaf2,
profile.txt) the commit's index_copy_ took 1.5 ms of a 19 ms step for some 200 MB.

Triton ships with PyTorch's CUDA builds; where it is missing (the CPU builds) `gather_rows` and
`scatter_rows` return False and the caller keeps index_select / index_copy_.
"""

from __future__ import annotations

import logging
import os

import torch

try:  # present with PyTorch's CUDA wheels; not needed on the CPU
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

log = logging.getLogger(__name__)
BLOCK = 4096  # elements per program: 8 KB of float16, enough to keep the loads wide
_failed: str | None = None  # why the kernel failed, once it has


def usable(src: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether `gather_rows` / `scatter_rows` can copy rows of `src [L, *, *piece]` into `out [L,
    *, *piece]`: the device runs Triton (CUDA, or Triton's interpreter), the dtypes agree, and
    each piece is contiguous in both."""
    if triton is None or src.dtype != out.dtype or src.dim() < 3 or src.dim() != out.dim():
        return False
    if src.shape[0] != out.shape[0] or src.shape[2:] != out.shape[2:]:
        return False
    if src.device.type != "cuda" and not _interpreted():
        return False
    return _piece_contiguous(src) and _piece_contiguous(out)


def gather_rows(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> bool:
    """out[:, r] = src[:, index[r]] for every row r; False (nothing done) where `usable` is not,
    or where the kernel could not be built or launched (then never again in this process: the
    caller's index_select serves, slower, rather than the step failing)."""
    if index.dim() != 1 or index.numel() != out.shape[1]:
        return False
    return _copy_rows(src, index, out, scatter=False)


def scatter_rows(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> bool:
    """out[:, index[r]] = src[:, r] for every row r (distinct indices: a commit's slots); False
    (nothing done) as gather_rows, and the caller's index_copy_ serves."""
    if index.dim() != 1 or index.numel() != src.shape[1]:
        return False
    return _copy_rows(src, index, out, scatter=True)


def _copy_rows(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor, scatter: bool) -> bool:
    global _failed
    if _failed is not None or not usable(src, out):
        return False
    L, n = src.shape[0], (src if scatter else out).shape[1]
    piece = out[0, 0].numel() if out.shape[1] else 0
    if n == 0 or L == 0 or piece == 0:
        return True
    grid = (L * n, triton.cdiv(piece, BLOCK))
    try:
        _copy_rows_kernel[grid](src, out, index, n, piece, src.stride(0), src.stride(1), out.stride(0),
                                out.stride(1), SCATTER=scatter, BLOCK=BLOCK)
    except Exception as exc:  # noqa: BLE001 - a compiler or driver problem: fall back, say so once
        _failed = f"{type(exc).__name__}: {exc}"
        log.warning("the Triton row copy failed; index_select and index_copy_ serve instead",
                    extra={"error": _failed[:500]})
        return False
    return True


def _piece_contiguous(t: torch.Tensor) -> bool:
    expected = 1
    for size, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    @triton.jit
    def _copy_rows_kernel(src, dst, index, n_rows, piece, src_s0, src_s1, dst_s0, dst_s1, SCATTER: tl.constexpr,
                          BLOCK: tl.constexpr):
        # one program per (layer, row, block of the row's piece); the index names the slot the
        # row is read from (a gather) or written to (a scatter)
        lr = tl.program_id(0)
        layer = (lr // n_rows).to(tl.int64)
        row = (lr % n_rows).to(tl.int64)
        slot = tl.load(index + row).to(tl.int64)
        offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        keep = offs < piece
        if SCATTER:
            values = tl.load(src + layer * src_s0 + row * src_s1 + offs, mask=keep)
            tl.store(dst + layer * dst_s0 + slot * dst_s1 + offs, values, mask=keep)
        else:
            values = tl.load(src + layer * src_s0 + slot * src_s1 + offs, mask=keep)
            tl.store(dst + layer * dst_s0 + row * dst_s1 + offs, values, mask=keep)
