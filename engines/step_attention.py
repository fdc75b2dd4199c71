"""The fast step's attention as one Triton kernel that reads each row's cached K/V where it lies.

`fast_step` attends each row's T' new frames (2 at 160 ms) over its 70 cached frames and the new
ones. With PyTorch's SDPA the cached K/V must first sit in the step's workspace (`kv_work`), so
a step copies every row's 7 MB cache out of the slot pool into that buffer (the gather,
engines/row_gather.py) and SDPA reads it back: the cache crosses the memory three times, and on
an H100 at 428 rows the copy alone took 2.6 ms of a 20.8 ms step (bench/RESULTS.md, run 38).
Here one program per (row, head) loads the row's cached keys and values straight from wherever
they are (the slot pool's ring, or the workspace) and the new frames' from the workspace, and
makes the additive bias itself: the relative-position term from the fused GEMM's columns, the
masks from the row's cache and chunk lengths, in the ring's order (the PyTorch path makes that
bias with two kernels a layer and zeroes padded query frames with a third). Scores, softmax and
the weighted sum stay in registers. So the pool is read once, and not copied at all.

Where the cache lies is data, not code: a small device table (`CacheTable`) holds each layer's
base address and the stride between slots, read by the kernel at run time. A CUDA graph
captured over this kernel therefore reads whichever pool the table names when it replays:
binding a slot pool (or going back to the workspace) rewrites the table, not the graph.

Exact up to rounding against SDPA (fp32 scores, probabilities in the values' dtype for the
second product, as SDPA's fused kernels do); tests/test_step_attention.py compares the two
under Triton's interpreter on the CPU, and the GPU suite on the device.

Triton ships with PyTorch's CUDA wheels; without it (PyTorch's CPU wheels) `supports` says why
not, and the step keeps SDPA over the gathered workspace.
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
MASK_VALUE = -10000.0  # a masked key's score, as engines.fast_conformer's (finite, as NeMo's)
PRODUCTS = ("dot", "fma")  # Tuning.products
ORDERS = ("rows", "heads")  # Tuning.order


@dataclass(frozen=True)
class Tuning:
    """How the kernel is launched: keys per block of the loop over the cache (0: the whole cache
    in one block), warps per program, pipelining stages of that loop, and how the two products
    run: "dot" on the tensor cores (tl.dot: every dimension padded to 16, so 2 query frames use
    2 of 16 rows) or "fma", broadcast multiplies and sums on the CUDA cores (no padding of the
    query frames, no shared-memory staging; the registers hold frames x keys x head of a block,
    so it suits few new frames), and the order the programs are launched in: "rows" (a head's
    programs for every row, then the next head: programs running together read one head's 256
    bytes of each cached frame from many slots) or "heads" (a row's heads side by side: together
    they read each cached frame's K|V whole, 4 KB at the 0.6B model's width, for fewer rows).
    Chosen by bench/attention_bench.py on the device; the figures are in bench/RESULTS.md."""

    block_n: int = 0
    num_warps: int = 4
    num_stages: int = 1
    products: str = "dot"
    order: str = "rows"

    def __post_init__(self) -> None:
        if self.products not in PRODUCTS:
            raise ValueError(f"products {self.products!r}: one of {PRODUCTS}")
        if self.order not in ORDERS:
            raise ValueError(f"order {self.order!r}: one of {ORDERS}")
        if self.block_n < 0 or self.block_n & (self.block_n - 1) or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"{self}: keys a block 0 or a power of two, warps and stages at least 1")


# The launch by the step's new frames: few (160 ms: 2 query rows) and many (560 ms: 7) load
# the same cache. Chosen by bench/attention_bench.py on an H100, the 0.6B model's shape (8 heads
# of 128, 70 cached frames):
# - few: run 42 (256 to 1,024 rows), blocks of 32 keys, 4 warps, tensor-core products: 0.385 ms
#   at 1,024 rows against 1.48 ms for PyTorch's gather + bias + SDPA. Stages 1 and 2 timed the
#   same; CUDA-core products (fma) were 1.4x slower than tensor-core ones even for 2 frames.
# - many: run 51 (512 and 1,024 rows, blocks of 16 and 32, 2 and 4 warps, both orders), blocks of
#   16 keys, 2 warps, a row's heads launched together: 0.127 ms at 512 rows and 0.227 at 1,024,
#   against 0.211 and 0.397 for run 42's 32/4 (rows first) and 0.907 and 1.763 for PyTorch's path;
#   the order alone moved it by 1-3%. At 560 ms and 512 rows the step's 24 layers save about 2 ms.
# - few again: run 52 (512 and 1,024 rows, the same sweep as run 51) chose the same launch:
#   0.121 ms at 512 rows and 0.219 at 1,024, against 0.203 and 0.382 for run 42's 32/4, 0.752 and
#   1.476 for PyTorch's path (floor 0.052 and 0.104): about 3.9 ms a step at 1,024 rows.
TUNING = {"few": Tuning(block_n=16, num_warps=2, num_stages=2, order="heads"),
          "many": Tuning(block_n=16, num_warps=2, num_stages=2, order="heads")}
# A launch measured on another card can be tried without a release: NEMOSTREAM_ATTENTION_TUNING
# (parse_tuning's form) overrides TUNING in every process that imports this module, engine
# workers included (they inherit the environment).
TUNING_ENV = "NEMOSTREAM_ATTENTION_TUNING"


def tuning_for(frames: int) -> Tuning:
    return TUNING["few" if frames <= 4 else "many"]


def parse_tuning(text: str) -> dict[str, Tuning]:
    """`few=32/4/2/fma,many=64/4/1/dot/heads` (keys per block / warps / stages [/ products [/
    order]], by TUNING's keys) as Tunings: how a benchmark hands a measured choice to another run
    (bench/attention_bench.py writes it; bench/step_bench.py --attention-tuning and
    NEMOSTREAM_ATTENTION_TUNING read it)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, spec = part.partition("=")
        fields = spec.split("/")
        numbers, rest = fields[:3], fields[3:]
        products = rest[0] if rest else "dot"
        order = rest[1] if len(rest) > 1 else "rows"
        if (key not in TUNING or len(numbers) != 3 or len(rest) > 2 or not all(f.isdigit() for f in numbers)
                or products not in PRODUCTS or order not in ORDERS):
            raise ValueError(f"attention tuning {part!r} is not few|many=BLOCK_N/WARPS/STAGES[/dot|fma[/rows|heads]]")
        out[key] = Tuning(*map(int, numbers), products=products, order=order)
    return out


def format_tuning(tune: Tuning) -> str:
    """The launch as parse_tuning reads it (its spec, after `few=` or `many=`)."""
    return f"{tune.block_n}/{tune.num_warps}/{tune.num_stages}/{tune.products}/{tune.order}"


TUNING.update(parse_tuning(os.environ.get(TUNING_ENV, "")))


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
    if d_k < 1:
        return f"head size {d_k}"
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


@dataclass(frozen=True)
class StepShape:
    """What the kernel needs of the step's geometry (engines.fast_conformer.Geometry)."""

    frames: int        # T': the step's new frames
    cache: int         # C: cached frames a row attends over
    d_model: int
    n_heads: int
    rel_pad: int       # positional columns per head in the fused GEMM's output (>= C + 2T' - 1)


def step_attention(qkv: torch.Tensor, new_kv: torch.Tensor, table: CacheTable, layer: int, slots: torch.Tensor,
                   heads: torch.Tensor, cache_len: torch.Tensor, enc_len: torch.Tensor, chunk_ok: torch.Tensor,
                   shape: StepShape, out: torch.Tensor | None = None, tuning: Tuning | None = None) -> torch.Tensor:
    """Attention of one layer of the fast step, its additive bias made in the kernel.

    `qkv [B*T', cols]`: the fused GEMM's output, rows contiguous: Q in columns [0, d), and from
    column 3d, per head, `rel_pad` columns of the relative-position term (query i, key of time
    j reads column T'-1-i+j). `new_kv [B, T', 2d]`: the new frames' K|V. `slots [B]`: each
    row's slot in the table's cache; `heads [B]`: the stored position of its oldest cached
    frame (the pool's ring head; 0 for a cache in time order). `cache_len`, `enc_len [B]`:
    cached frames the row has, new frames it has. `chunk_ok [T', C + T']` (int8): which key
    times each query sees (chunked_limited). A key is masked (MASK_VALUE, as the PyTorch path)
    where the row lacks it or its chunk is out of sight; padded query frames (past enc_len) come
    back zero. `tuning`: the launch (default: `tuning_for(T')`). Returns `[B*T', d]`."""
    T, C, d, H = shape.frames, shape.cache, shape.d_model, shape.n_heads
    dk = d // H
    B = qkv.shape[0] // T if T else 0
    if out is None:
        out = torch.empty(B * T, d, dtype=qkv.dtype, device=qkv.device)
    if B == 0:
        return out
    for name, t in (("qkv", qkv), ("new_kv", new_kv), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}'s last dimension must be contiguous")
    if (qkv.shape[0] != B * T or qkv.shape[1] < 3 * d + H * shape.rel_pad or new_kv.shape != (B, T, 2 * d)
            or slots.shape != (B,) or heads.shape != (B,) or cache_len.shape != (B,) or enc_len.shape != (B,)
            or chunk_ok.shape != (T, C + T) or not chunk_ok.is_contiguous() or out.shape != (B * T, d)):
        raise ValueError(f"shapes do not agree: qkv {tuple(qkv.shape)}, new_kv {tuple(new_kv.shape)}, slots "
                         f"{tuple(slots.shape)}, heads {tuple(heads.shape)}, chunk_ok {tuple(chunk_ok.shape)}, {shape}")
    tune = tuning or tuning_for(T)
    fma = tune.products == "fma"
    least = 1 if fma else MIN_DOT  # tl.dot wants 16 rows at least; the broadcast products take any
    block_t = max(least, triton.next_power_of_2(T))
    block_n = tune.block_n or max(least, triton.next_power_of_2(C))
    heads_first = tune.order == "heads"
    _attention_kernel[(B * H,) if heads_first else (B, H)](
        qkv, qkv.stride(0),
        table.table, layer, table.table.numel() - 1, slots, heads, cache_len, enc_len, chunk_ok,
        new_kv, new_kv.stride(0), new_kv.stride(1),
        out, out.stride(0),
        T, C, d, shape.rel_pad, 1.0 / math.sqrt(dk), MASK_VALUE,
        CACHE_DTYPE=_tl_dtype(new_kv.dtype), DK=dk, BLOCK_K=max(MIN_DOT, triton.next_power_of_2(dk)),
        BLOCK_T=block_t, BLOCK_N=block_n, FMA=fma, HEADS_FIRST=heads_first, N_HEADS=H,
        num_warps=tune.num_warps, num_stages=tune.num_stages)
    return out


def _tl_dtype(dtype: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


if triton is not None:
    @triton.jit
    def _scores(q, keys, FMA: tl.constexpr):
        """q [T, K] against keys [N, K]: [T, N] in fp32."""
        if FMA:
            return tl.sum(q[:, None, :] * keys.to(tl.float32)[None, :, :], 2)
        else:
            return tl.dot(q, tl.trans(keys.to(q.dtype)))

    @triton.jit
    def _weighted(p, values, FMA: tl.constexpr):
        """p [T, N] (fp32) over values [N, K]: [T, K] in fp32 (probabilities in the values'
        dtype for the tensor cores, as SDPA's fused kernels)."""
        if FMA:
            return tl.sum(p[:, :, None] * values.to(tl.float32)[None, :, :], 1)
        else:
            return tl.dot(p.to(values.dtype), values)

    # `layer` is not specialized: Triton would otherwise compile a variant for layer 1 (and for
    # multiples of 16), all of which must exist before the graphs are captured.
    @triton.jit(do_not_specialize=["layer"])
    def _attention_kernel(qkv_ptr, qkv_s,
                          table_ptr, layer, n_layers, slots_ptr, heads_ptr, cache_len_ptr, enc_len_ptr, chunk_ok_ptr,
                          new_ptr, n_sb, n_st,
                          out_ptr, o_s,
                          T, C, D, RP, scale, mask_value,
                          CACHE_DTYPE: tl.constexpr, DK: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, FMA: tl.constexpr,
                          HEADS_FIRST: tl.constexpr, N_HEADS: tl.constexpr):
        if HEADS_FIRST:   # one axis, a row's heads adjacent
            pid = tl.program_id(0).to(tl.int64)
            b = pid // N_HEADS
            h = pid % N_HEADS
        else:             # (row, head), rows fastest
            b = tl.program_id(0).to(tl.int64)
            h = tl.program_id(1).to(tl.int64)
        t = tl.arange(0, BLOCK_T)
        k = tl.arange(0, BLOCK_K)   # a head's dimensions, padded to a power of two (masked past DK)
        t_ok = t < T
        k_ok = k < DK
        # Where this row's cache lies: the layer's base address and the slot stride, from the table.
        base = tl.load(table_ptr + layer).to(tl.pointer_type(CACHE_DTYPE))
        slot_stride = tl.load(table_ptr + n_layers)
        slot = tl.load(slots_ptr + b).to(tl.int64)
        head = tl.load(heads_ptr + b).to(tl.int32)
        have = tl.load(cache_len_ptr + b).to(tl.int32)   # cached frames the row has
        new_frames = tl.load(enc_len_ptr + b).to(tl.int32)
        row = base + slot * slot_stride + h * DK
        q_rows = qkv_ptr + (b * T + t) * qkv_s           # each query frame's row of the fused GEMM
        pos_rows = q_rows + 3 * D + h * RP                # its relative-position columns for this head
        q = tl.load(q_rows[:, None] + h * DK + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        if FMA:
            q = q.to(tl.float32)
        # The new frames first: each query row sees key time C+0 or is masked with a finite score,
        # so the running maximum is finite before the loop over the cache (whose padding columns
        # are -inf).
        new = new_ptr + b * n_sb + h * DK
        new_at = new + t[:, None] * n_st + k[None, :]
        kn = tl.load(new_at, mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        vn = tl.load(new_at + D, mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        seen_n = t_ok[:, None] & t_ok[None, :]
        s_n = _scores(q, kn, FMA) * scale
        s_n += tl.load(pos_rows[:, None] + (T - 1 - t[:, None] + C + t[None, :]), mask=seen_n, other=0.0).to(tl.float32)
        ok_n = (t[None, :] < new_frames) & (tl.load(chunk_ok_ptr + t[:, None] * (C + T) + C + t[None, :],
                                                     mask=seen_n, other=0) != 0)
        s_n = tl.where(ok_n, s_n, s_n + mask_value)
        s_n = tl.where(t_ok[None, :], s_n, float("-inf"))
        m = tl.max(s_n, 1)
        p_n = tl.exp(s_n - m[:, None])
        total = tl.sum(p_n, 1)
        o = _weighted(p_n, vn, FMA)
        # Then the cache, BLOCK_N stored positions at a time (an online softmax): position c holds
        # the frame of time (c - head) mod C. The bias: the positional term (query i, key time j:
        # column T-1-i+j), and MASK_VALUE where the row lacks the key or its chunk is out of sight.
        for start in range(0, C, BLOCK_N):
            c = start + tl.arange(0, BLOCK_N)
            c_ok = c < C
            when = (c - head + C) % C
            at = row + c[:, None] * (2 * D) + k[None, :]
            kv_ok = c_ok[:, None] & k_ok[None, :]
            kc = tl.load(at, mask=kv_ok, other=0.0)
            vc = tl.load(at + D, mask=kv_ok, other=0.0)
            seen_c = t_ok[:, None] & c_ok[None, :]
            s_c = _scores(q, kc, FMA) * scale
            s_c += tl.load(pos_rows[:, None] + (T - 1 - t[:, None] + when[None, :]), mask=seen_c,
                           other=0.0).to(tl.float32)
            ok_c = (when[None, :] >= C - have) & (tl.load(chunk_ok_ptr + t[:, None] * (C + T) + when[None, :],
                                                           mask=seen_c, other=0) != 0)
            s_c = tl.where(ok_c, s_c, s_c + mask_value)
            s_c = tl.where(c_ok[None, :], s_c, float("-inf"))
            m_next = tl.maximum(m, tl.max(s_c, 1))
            shrink = tl.exp(m - m_next)
            p_c = tl.exp(s_c - m_next[:, None])
            total = total * shrink + tl.sum(p_c, 1)
            o = o * shrink[:, None] + _weighted(p_c, vc.to(vn.dtype), FMA)
            m = m_next
        # A padded query frame's output is zero (NeMo multiplies it away after the attention).
        o = tl.where((t < new_frames)[:, None], o / total[:, None], 0.0)
        tl.store(out_ptr + (b * T + t[:, None]) * o_s + h * DK + k[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & k_ok[None, :])
