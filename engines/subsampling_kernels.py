"""The fast step's subsampling convs as Triton kernels that read their input masked and padded
where it lies, so the subsampling's largest tensors are not copied between its convs.

NeMo's subsampling (dw_striding: a 3x3 conv of stride 2 from the one mel channel, ReLU, then
twice a depthwise 3x3 of stride 2, a pointwise conv and a ReLU) zeroes every frame at or past a
row's length before each conv and pads the conv's input with zeros. The PyTorch path writes that
input as a new padded tensor, then cuDNN reads it back. On the 0.6B model the first conv's output
is 256 channels x 33 frames x 65 mels a row at 560 ms: 562 MB at 512 rows in fp16, written by the
conv, read and written again padded (`relu_mask_pad`, the one pass this module keeps for convs of
another shape), read once more by the depthwise conv. In run 45's profile (bench/RESULTS.md, 560
ms, 512 rows, H100) cuDNN's kernel for the first conv (one input channel, fp16: its generic
implicit-GEMM kernel) took 1.20 ms and the first depthwise conv 0.50 ms of 31.2 ms of kernels.

* `masked_conv(x, lens, pad, relu, weight, bias, stride)`: a conv whose every output channel reads
  one input channel (weight `[C, 1, K, K]`): the first conv (one input channel, read by all) and
  the depthwise convs. Each program loads its input positions with the ReLU held from before the
  conv, the row's time mask and the zero padding applied on load, and writes the conv's output
  once. Memory moved: the input once, the output once.
* `relu_mask_pad(x, lens, pad, relu)`: the padded, masked input as a tensor, for a conv that
  mixes channels with a spatial kernel (the plain "striding" subsampling), which then runs in
  cuDNN.

The products are exact in float32 (two half-precision values), and the K*K of them and the bias are
summed in float32 and rounded once, as cuDNN's half-precision convs accumulate: equal to the
PyTorch path up to the order of that sum (tests/test_subsampling_kernels.py, under Triton's
interpreter on the CPU; the GPU suite's token agreement on the device).
"""

from __future__ import annotations

import torch

try:  # present with PyTorch's CUDA wheels; on the CPU only where installed for the interpreter
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

__all__ = ["masked_conv", "relu_mask_pad", "reads_one_channel"]

_PAD_TILE = 8192   # relu_mask_pad: elements a program writes (whole padded rows, as many as fit)
_CONV_CHANNELS = 16  # masked_conv: output channels a program computes ...
_CONV_POSITIONS = 128  # ... at this many output positions (time x mels, mels fastest)
# Under Triton's interpreter (the CPU tests) each program runs in turn as numpy operations, so
# masked_conv takes a row's whole output in as few programs as fit (at most 64 channels x 4,096
# positions): the GPU's tiles made a test of streams through the fast step three times slower.
# The kernel's tests set this False to run the GPU's tiles (several blocks a row) too.
WHOLE_ROWS_ON_CPU = True


def reads_one_channel(weight: torch.Tensor, groups: int, in_channels: int) -> bool:
    """Whether a conv of `weight [C_out, C_in / groups, K, K]` is one `masked_conv` computes: each
    output channel reads a single input channel, and that channel is the only one (the first conv)
    or the output channel's own (depthwise)."""
    return weight.shape[1] == 1 and groups == in_channels and (in_channels == 1 or in_channels == weight.shape[0])


def masked_conv(x: torch.Tensor, lens: torch.Tensor, pad: tuple[int, int], relu: bool, weight: torch.Tensor,
                bias: torch.Tensor | None, stride: int) -> torch.Tensor:
    """conv2d(relu_mask_pad(x, lens, pad, relu), weight, bias, stride) for a conv that reads one
    input channel per output channel (`reads_one_channel`), without the padded copy: `x [B, Cin,
    T, F]` (any strides; Cin 1 or C), `weight [C, 1, K, K]`, `bias [C]` or None, `lens [B]` the
    frames of each row inside its length (a frame at or past it reads as zero), pad = (lo, hi) on
    time and mels alike. Returns a new contiguous `[B, C, To, Fo]`, To = (lo + T + hi - K) //
    stride + 1 (and Fo alike), in x's dtype."""
    B, Cin, T, F = x.shape
    C, _, K, K2 = weight.shape
    lo, hi = pad
    if not reads_one_channel(weight, Cin, Cin) or K != K2 or lens.shape != (B,) or min(pad) < 0 or stride < 1:
        raise ValueError(f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, lens {tuple(lens.shape)}, pad {pad}, "
                         f"stride {stride}: not a conv that reads one input channel per output channel")
    if bias is not None and bias.shape != (C,):
        raise ValueError(f"bias {tuple(bias.shape)} for {C} channels")
    To, Fo = (lo + T + hi - K) // stride + 1, (lo + F + hi - K) // stride + 1
    out = torch.empty(B, C, max(To, 0), max(Fo, 0), dtype=x.dtype, device=x.device)
    if out.numel():
        w = weight.reshape(C, K * K).contiguous()
        block_c, block_p = _conv_tiles(C, To * Fo, x.device)
        grid = (triton.cdiv(To * Fo, block_p), triton.cdiv(C, block_c), B)
        _masked_conv_kernel[grid](
            x, x.stride(0), 0 if Cin == 1 else x.stride(1), x.stride(2), x.stride(3), lens, w,
            w if bias is None else bias, out, C, T, F, To, Fo, lo,
            K=K, STRIDE=stride, RELU=relu, HAS_BIAS=bias is not None, SHARED_INPUT=Cin == 1,
            BLOCK_C=block_c, BLOCK_P=block_p, num_warps=4)
    return out


def _conv_tiles(channels: int, positions: int, device: torch.device) -> tuple[int, int]:
    """masked_conv's tile: output channels x output positions a program computes."""
    if device.type == "cpu" and WHOLE_ROWS_ON_CPU:
        return min(triton.next_power_of_2(channels), 64), min(triton.next_power_of_2(positions), 4096)
    return _CONV_CHANNELS, _CONV_POSITIONS


def relu_mask_pad(x: torch.Tensor, lens: torch.Tensor, pad: tuple[int, int], relu: bool) -> torch.Tensor:
    """`x [B, C, T, F]` (any strides) -> a new contiguous `[B, C, lo + T + hi, lo + F + hi]` (pad
    = (lo, hi) on time and frequency alike): relu(x) where `relu`, else x, with every frame t >=
    lens[b] zero, inside zeros. Equal, bit for bit, to PyTorch's relu, multiply by the 0/1 mask
    and copy into a zeroed tensor: each value is stored as it is, or as zero."""
    B, C, T, F = x.shape
    lo, hi = pad
    Tp, Fp = lo + T + hi, lo + F + hi
    if lens.shape != (B,) or min(pad) < 0:
        raise ValueError(f"x {tuple(x.shape)}, lens {tuple(lens.shape)}, pad {pad}")
    out = torch.empty(B, C, Tp, Fp, dtype=x.dtype, device=x.device)
    rows = B * C * Tp
    if rows:
        block_f = triton.next_power_of_2(Fp)
        block_r = max(1, _PAD_TILE // block_f)
        _relu_mask_pad_kernel[(triton.cdiv(rows, block_r),)](
            x, x.stride(0), x.stride(1), x.stride(2), x.stride(3), lens, out, rows, C, T, F, Tp, Fp, lo,
            RELU=relu, BLOCK_R=block_r, BLOCK_F=block_f, num_warps=8)
    return out


if triton is not None:
    @triton.jit
    def _masked_conv_kernel(x_ptr, s_b, s_c, s_t, s_f, lens_ptr, w_ptr, bias_ptr, out_ptr, C, T, F, To, Fo, lo,
                            K: tl.constexpr, STRIDE: tl.constexpr, RELU: tl.constexpr, HAS_BIAS: tl.constexpr,
                            SHARED_INPUT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        # A tile of BLOCK_C output channels x BLOCK_P output positions (frame-major, mels fastest)
        # of one row. An input position is read as zero where it lies in the padding, past the
        # input's frames or mels, or at or past the row's length; else as it is, or its ReLU.
        b = tl.program_id(2).to(tl.int64)
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        p_ok = p < To * Fo
        c_ok = c < C
        t_out = p // Fo
        f_out = p % Fo
        frames = tl.minimum(tl.load(lens_ptr + b), T)   # frames inside the row (and the input)
        row = x_ptr + b * s_b
        if HAS_BIAS:
            acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32) + \
                tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
        else:
            acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
        for i in tl.static_range(K):
            t = t_out * STRIDE + i - lo
            t_in = p_ok & (t >= 0) & (t < frames)
            for j in tl.static_range(K):
                f = f_out * STRIDE + j - lo
                inside = t_in & (f >= 0) & (f < F)
                w = tl.load(w_ptr + c * (K * K) + (i * K + j), mask=c_ok, other=0.0).to(tl.float32)
                if SHARED_INPUT:   # one input channel: every output channel reads the same values
                    v = tl.load(row + t * s_t + f * s_f, mask=inside, other=0.0).to(tl.float32)[None, :]
                else:              # depthwise: each output channel reads its own
                    v = tl.load(row + (c * s_c)[:, None] + (t * s_t + f * s_f)[None, :],
                                mask=c_ok[:, None] & inside[None, :], other=0.0).to(tl.float32)
                if RELU:
                    v = tl.maximum(v, 0.0)
                acc += w[:, None] * v
        dst = out_ptr + ((b * C + c) * (To * Fo))[:, None] + p[None, :]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=c_ok[:, None] & p_ok[None, :])

    @triton.jit
    def _relu_mask_pad_kernel(x_ptr, s_b, s_c, s_t, s_f, lens_ptr, out_ptr, rows, C, T, F, Tp, Fp, lo,
                              RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
        # A tile of whole padded rows (b, c, padded frame) x padded mels of the output.
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        fp = tl.arange(0, BLOCK_F)
        bc = r // Tp
        t = r % Tp - lo
        b = bc // C
        c = bc % C
        live = (r < rows) & (t >= 0) & (t < T)
        live = live & (t < tl.load(lens_ptr + b, mask=r < rows, other=0))
        f = fp - lo
        inside = live[:, None] & ((f >= 0) & (f < F))[None, :]
        src = x_ptr + (b * s_b + c * s_c + t * s_t)[:, None] + (f * s_f)[None, :]
        v = tl.load(src, mask=inside, other=0.0)
        if RELU:
            v = tl.where(v > 0, v, 0.0).to(v.dtype)
        dst = out_ptr + (r * Fp)[:, None] + fp[None, :]
        tl.store(dst, v, mask=(r < rows)[:, None] & (fp < Fp)[None, :])
