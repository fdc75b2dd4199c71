"""Three Triton kernels that fold the fast step's chains of small element-wise operations into one
pass each, so a layer launches fewer kernels and moves its activations fewer times.

* `add_layer_norm(x, r, w, b, eps)`: the residual sum `x + r` and its layer norm, both written,
  in one kernel where PyTorch runs an add and a norm. The fast step has four per layer (after
  feed-forward 1 before the attention's norm, after the attention before the conv's, after the
  conv before feed-forward 2's, after feed-forward 2 before the output norm).
* `glu_into(pre_glu, enc_len, out)`: the conv module's GLU, its padded frames zeroed, written
  into the conv workspace, in one kernel where PyTorch runs the GLU and a multiply.
* `conv_norm_silu(conv, w, bias, ln_w, ln_b, eps)`: the conv module's causal depthwise
  convolution over `[conv cache; GLU outputs]`, its bias, its layer norm and Swish, in one
  kernel where PyTorch materializes an unfold product of K times the activations, then sums,
  adds, normalizes and activates (five kernels).

The subsampling's kernels are engines/subsampling_kernels.py.

Why: at batch 1 the step is bound by launches (bench/RESULTS.md: 24 layers of about 30 kernels
inside one CUDA graph; the encoder step took 2.97 ms there, 2.27 ms with torch.compile fusing the
same chains), and a server's chunk latency at one stream (11.3 ms on an H100, run 40) is mostly
that step. The kernels compute in float32 and round once, where PyTorch rounds the sum and the
conv's products in the model's dtype: equal to the PyTorch path within rounding
(tests/test_fused_norms.py, under Triton's interpreter on the CPU).

Triton ships with PyTorch's CUDA wheels; where it cannot run (`engines.step_attention.available`)
the step keeps PyTorch's operations.
"""

from __future__ import annotations

import torch

try:  # present with PyTorch's CUDA wheels; on the CPU only where installed for the interpreter
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

__all__ = ["add_layer_norm", "conv_norm_silu", "glu_into"]


def add_layer_norm(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float,
                   keep_sum: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(x + r, layer_norm(x + r) * w + b) over the last dimension of `[rows, d]` tensors;
    keep_sum=False: (None, the norm), the sum not written (a layer's last norm: only it is read)."""
    rows, d = x.shape
    if r.shape != x.shape or x.stride(1) != 1 or r.stride(1) != 1:
        raise ValueError(f"x {tuple(x.shape)} and r {tuple(r.shape)} must be [rows, d] with contiguous rows")
    total = torch.empty(rows, d, dtype=x.dtype, device=x.device) if keep_sum else None
    normed = torch.empty(rows, d, dtype=x.dtype, device=x.device)
    if rows:
        _add_layer_norm_kernel[(rows,)](x, x.stride(0), r, r.stride(0), w, b, normed if total is None else total,
                                        normed, d, eps, STORE_SUM=keep_sum, BLOCK=triton.next_power_of_2(d),
                                        num_warps=_warps(d))
    return total, normed


def conv_norm_silu(conv: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """`conv [B, K-1+T', d]` (time-major, features contiguous), depthwise weight `w [d, K]` (any
    strides; tap-major, strides (1, d), reads each tap's weights in one coalesced pass):
    silu(layer_norm(sum_k conv[:, t+k] * w[:, k] + bias)) as `[B*T', d]`."""
    B, frames, d = conv.shape
    K = w.shape[1]
    T = frames - (K - 1)
    if conv.stride(2) != 1 or w.shape[0] != d or T < 1:
        raise ValueError(f"conv {tuple(conv.shape)} (features contiguous) does not fit a depthwise weight "
                         f"{tuple(w.shape)}")
    out = torch.empty(B * T, d, dtype=conv.dtype, device=conv.device)
    if B:
        _conv_norm_silu_kernel[(B * T,)](conv, conv.stride(0), conv.stride(1), w, w.stride(0), w.stride(1), bias,
                                         ln_w, ln_b, out, T, d, eps, K=K, BLOCK=triton.next_power_of_2(d),
                                         num_warps=_warps(d))
    return out


def glu_into(pre_glu: torch.Tensor, enc_len: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The conv module's GLU of `pre_glu [B*T', 2d]` (a * sigmoid(gate)), zero for a row's padded
    frames (t >= enc_len[b], as NeMo's conv sees them), written into `out [B, T', d]` (the
    conv workspace's new frames: any row and frame strides, features contiguous)."""
    B, T, d = out.shape
    if pre_glu.shape != (B * T, 2 * d) or pre_glu.stride(1) != 1 or out.stride(2) != 1 or enc_len.shape != (B,):
        raise ValueError(f"pre_glu {tuple(pre_glu.shape)} does not fit out {tuple(out.shape)}")
    if B * T:
        _glu_kernel[(B * T,)](pre_glu, pre_glu.stride(0), enc_len, out, out.stride(0), out.stride(1), T, d,
                              BLOCK=triton.next_power_of_2(d), num_warps=_warps(d))
    return out


def _warps(d: int) -> int:
    return 4 if d <= 1024 else 8


if triton is not None:
    @triton.jit
    def _add_layer_norm_kernel(x_ptr, x_s, r_ptr, r_s, w_ptr, b_ptr, total_ptr, normed_ptr, d, eps,
                               STORE_SUM: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        col = tl.arange(0, BLOCK)
        ok = col < d
        x = tl.load(x_ptr + row * x_s + col, mask=ok, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + row * r_s + col, mask=ok, other=0.0).to(tl.float32)
        # The residual is rounded to the model's dtype as PyTorch's add leaves it, and normalized
        # from that rounded value, so the next layer sees exactly what it normalizes.
        s = (x + r).to(total_ptr.dtype.element_ty)
        if STORE_SUM:
            tl.store(total_ptr + row * d + col, s, mask=ok)
        s = s.to(tl.float32)
        mean = tl.sum(s, 0) / d
        diff = tl.where(ok, s - mean, 0.0)
        var = tl.sum(diff * diff, 0) / d
        w = tl.load(w_ptr + col, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + col, mask=ok, other=0.0).to(tl.float32)
        y = diff / tl.sqrt(var + eps) * w + b
        tl.store(normed_ptr + row * d + col, y.to(normed_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _conv_norm_silu_kernel(conv_ptr, c_sb, c_st, w_ptr, w_sd, w_sk, bias_ptr, ln_w_ptr, ln_b_ptr, out_ptr, T, d,
                               eps, K: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        b = pid // T
        t = pid % T
        col = tl.arange(0, BLOCK)
        ok = col < d
        acc = tl.load(bias_ptr + col, mask=ok, other=0.0).to(tl.float32)
        for k in tl.static_range(K):
            v = tl.load(conv_ptr + b * c_sb + (t + k) * c_st + col, mask=ok, other=0.0).to(tl.float32)
            acc += v * tl.load(w_ptr + col * w_sd + k * w_sk, mask=ok, other=0.0).to(tl.float32)
        mean = tl.sum(tl.where(ok, acc, 0.0), 0) / d
        diff = tl.where(ok, acc - mean, 0.0)
        var = tl.sum(diff * diff, 0) / d
        w = tl.load(ln_w_ptr + col, mask=ok, other=0.0).to(tl.float32)
        bb = tl.load(ln_b_ptr + col, mask=ok, other=0.0).to(tl.float32)
        y = diff / tl.sqrt(var + eps) * w + bb
        y = y / (1.0 + tl.exp(-y))  # Swish
        tl.store(out_ptr + pid * d + col, y.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _glu_kernel(pre_ptr, p_s, enc_len_ptr, out_ptr, o_sb, o_st, T, d, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        b = pid // T
        t = pid % T
        col = tl.arange(0, BLOCK)
        ok = col < d
        a = tl.load(pre_ptr + pid * p_s + col, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(pre_ptr + pid * p_s + d + col, mask=ok, other=0.0).to(tl.float32)
        keep = (t < tl.load(enc_len_ptr + b)).to(tl.float32)
        y = a / (1.0 + tl.exp(-g)) * keep
        tl.store(out_ptr + b * o_sb + t * o_st + col, y.to(out_ptr.dtype.element_ty), mask=ok)
