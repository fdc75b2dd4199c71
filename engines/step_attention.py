"""The fast step's attention as one Triton kernel that reads each row's cached K/V where it lies.

`fast_step` attends each row's T' new frames (2 at 160 ms) over its 70 cached frames and the new
ones. With PyTorch's SDPA the cached K/V must first sit in the step's workspace (`kv_work`), so
a step copies every row's 7 MB cache out of the slot pool into that buffer (the gather,
engines/row_gather.py) and SDPA reads it back: the cache crosses the memory three times, and on
an H100 at 428 rows the copy alone took 2.6 ms of a 20.8 ms step (bench/RESULTS.md, run 38).
Here one program per (row, head) loads the row's cached keys and values straight from wherever
they are (the slot pool's ring, or the workspace), the new frames' from the workspace, and the
additive bias (relative positions and masks, already in the cache's order); scores, softmax and
the weighted sum stay in registers. So the pool is read once, and not copied at all.

Where the cache lies is data, not code: a small device table (`CacheTable`) holds each layer's
base address and the stride between slots, read by the kernel at run time. A CUDA graph
captured over this kernel therefore reads whichever pool the table names when it replays:
binding a slot pool (or going back to the workspace) rewrites the table, not the graph.

Exact up to rounding against SDPA (fp32 scores, probabilities in the values' dtype for the
second product, as SDPA's fused kernels do); tests/test_step_attention.py compares the two
under Triton's interpreter on the CPU, and the GPU suite on the device.

Triton ships with PyTorch's CUDA wheels; without it (PyTorch's CPU wheels) `usable` is False
and the step keeps SDPA over the gathered workspace.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

try:  # present with PyTorch's CUDA wheels; on the CPU only where installed for the interpreter
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

MIN_DOT = 16  # Triton's tl.dot wants every dimension at least this


def available(device: torch.device) -> bool:
    """Whether the kernel can run for tensors on `device`: Triton is installed, and the device
    is CUDA or Triton's interpreter is on (TRITON_INTERPRET=1, the CPU tests)."""
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def supports(d_k: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """None where the kernel serves heads of `d_k` in `dtype` on `device`, else why not."""
    if not available(device):
        return "Triton is not available here (not installed, or no CUDA device and no interpreter)"
    if d_k < MIN_DOT or d_k & (d_k - 1):
        return f"head size {d_k} is not a power of two of at least {MIN_DOT}"
    if device.type == "cuda" and dtype not in (torch.float16, torch.bfloat16):
        return f"{dtype} on CUDA (the kernel's products are half-precision tensor-core products)"
    return None


@dataclass
class CacheTable:
    """Where each layer's cached K/V rows lie, as the kernel reads it: `table[l]` the address of
    layer l's first slot, `table[L]` the stride between slots in elements (each slot's C frames
    of K|V, 2d elements a frame, frames contiguous). A device tensor, so that a captured graph
    follows a rebinding."""

    table: torch.Tensor       # int64 [L + 1] on the step's device
    # what the table holds now: (address, layer stride, slot stride) of the tensor it names. Not
    # the tensor itself, which would keep a discarded pool's memory alive (a freed pool's address
    # reused by a new one of the same strides is the same table, rightly).
    bound: tuple[int, int, int] | None = None

    @classmethod
    def empty(cls, n_layers: int, device: torch.device) -> "CacheTable":
        return cls(torch.zeros(n_layers + 1, dtype=torch.int64, device=device))

    def point_at(self, cache: torch.Tensor) -> None:
        """Names `cache [L, S, >=C, 2d]` (a slot pool's attention cache, or the workspace whose
        first C frames of each row hold the cache): layer and slot strides from the tensor.
        A no-op when it already names this tensor."""
        key = (cache.data_ptr(), cache.stride(0), cache.stride(1))
        if self.bound == key:
            return
        L = self.table.numel() - 1
        if cache.dim() != 4 or cache.shape[0] != L or cache.stride(3) != 1 or cache.stride(2) != cache.shape[3]:
            raise ValueError(f"an attention cache of shape {tuple(cache.shape)} and strides {cache.stride()} "
                             f"is not [L={L}, slots, frames, 2d] with contiguous frames")
        values = [cache[layer].data_ptr() for layer in range(L)] + [cache.stride(1)]
        self.table.copy_(torch.tensor(values, dtype=torch.int64))
        self.bound = key


def step_attention(q: torch.Tensor, new_kv: torch.Tensor, bias: torch.Tensor, table: CacheTable, layer: int,
                   slots: torch.Tensor, cache_frames: int, n_heads: int, out: torch.Tensor | None = None,
                   cache_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Attention of one layer of the fast step.

    q `[B, T', d]` (any row and frame strides, features contiguous), new_kv `[B, T', 2d]` (the
    new frames' K|V), bias `[B, H, T', C + T']` (the additive term over the cached frames, in
    the order they are stored, then the new ones; last dim contiguous), `slots [B]` int64: the
    slot of each row in the table's cache (for the workspace: the row itself). Returns `[B, T',
    d]` (into `out` if given, same layout rules as q)."""
    B, T, d = q.shape
    H = n_heads
    dk = d // H
    if out is None:
        out = torch.empty(B, T, d, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    for name, t in (("q", q), ("new_kv", new_kv), ("bias", bias), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}'s last dimension must be contiguous")
    if new_kv.shape != (B, T, 2 * d) or bias.shape != (B, H, T, cache_frames + T) or slots.shape != (B,):
        raise ValueError(f"shapes do not agree: q {tuple(q.shape)}, new_kv {tuple(new_kv.shape)}, "
                         f"bias {tuple(bias.shape)}, slots {tuple(slots.shape)}, {cache_frames} cached frames")
    block_t = max(MIN_DOT, triton.next_power_of_2(T))
    block_c = max(MIN_DOT, triton.next_power_of_2(cache_frames))
    _attention_kernel[(B, H)](
        q, q.stride(0), q.stride(1),
        table.table, layer, table.table.numel() - 1, slots,
        new_kv, new_kv.stride(0), new_kv.stride(1),
        bias, bias.stride(0), bias.stride(1), bias.stride(2),
        out, out.stride(0), out.stride(1),
        T, cache_frames, d, 1.0 / math.sqrt(dk),
        CACHE_DTYPE=_tl_dtype(cache_dtype or new_kv.dtype), DK=dk, BLOCK_T=block_t, BLOCK_C=block_c,
        num_warps=4 if dk <= 64 else 8)
    return out


def _tl_dtype(dtype: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


if triton is not None:
    # `layer` is not specialized: Triton would otherwise compile a variant for layer 1 (and for
    # multiples of 16), all of which must exist before the graphs are captured.
    @triton.jit(do_not_specialize=["layer"])
    def _attention_kernel(q_ptr, q_sb, q_st,
                          table_ptr, layer, n_layers, slots_ptr,
                          new_ptr, n_sb, n_st,
                          bias_ptr, b_sb, b_sh, b_st,
                          out_ptr, o_sb, o_st,
                          T, C, D, scale,
                          CACHE_DTYPE: tl.constexpr, DK: tl.constexpr, BLOCK_T: tl.constexpr,
                          BLOCK_C: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        t = tl.arange(0, BLOCK_T)
        c = tl.arange(0, BLOCK_C)
        k = tl.arange(0, DK)
        t_ok = t < T
        c_ok = c < C
        # Where this row's cache lies: the layer's base address and the slot stride, from the table.
        base = tl.load(table_ptr + layer).to(tl.pointer_type(CACHE_DTYPE))
        slot_stride = tl.load(table_ptr + n_layers)
        slot = tl.load(slots_ptr + b).to(tl.int64)
        row = base + slot * slot_stride + h * DK
        q = tl.load(q_ptr + b * q_sb + t[:, None] * q_st + h * DK + k[None, :], mask=t_ok[:, None], other=0.0)
        kc = tl.load(row + c[:, None] * (2 * D) + k[None, :], mask=c_ok[:, None], other=0.0)
        vc = tl.load(row + D + c[:, None] * (2 * D) + k[None, :], mask=c_ok[:, None], other=0.0)
        new = new_ptr + b * n_sb + h * DK
        kn = tl.load(new + t[:, None] * n_st + k[None, :], mask=t_ok[:, None], other=0.0)
        vn = tl.load(new + D + t[:, None] * n_st + k[None, :], mask=t_ok[:, None], other=0.0)
        bias_row = bias_ptr + b * b_sb + h * b_sh + t[:, None] * b_st
        # Scores over the cached frames, then over the new ones (fp32). A padding column (past C,
        # or past T') gets -inf; a padding query row gets zero bias and is never stored.
        s_c = tl.dot(q, tl.trans(kc.to(q.dtype))) * scale
        s_c += tl.load(bias_row + c[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        s_c = tl.where(c_ok[None, :], s_c, float("-inf"))
        s_n = tl.dot(q, tl.trans(kn)) * scale
        s_n += tl.load(bias_row + C + t[None, :], mask=t_ok[:, None] & t_ok[None, :], other=0.0).to(tl.float32)
        s_n = tl.where(t_ok[None, :], s_n, float("-inf"))
        m = tl.maximum(tl.max(s_c, 1), tl.max(s_n, 1))
        p_c = tl.exp(s_c - m[:, None])
        p_n = tl.exp(s_n - m[:, None])
        total = tl.sum(p_c, 1) + tl.sum(p_n, 1)
        o = tl.dot(p_c.to(q.dtype), vc.to(q.dtype)) + tl.dot(p_n.to(q.dtype), vn)
        o = o / total[:, None]
        tl.store(out_ptr + b * o_sb + t[:, None] * o_st + h * DK + k[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=t_ok[:, None])
