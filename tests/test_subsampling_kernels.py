"""engines/subsampling_kernels.py: the subsampling's one-channel convs read their input masked
and padded where it lies (`masked_conv`), and the padded, masked copy for the other convs
(`relu_mask_pad`), against PyTorch's operations under Triton's interpreter on the CPU (where
Triton is installed: the test extra installs it). The whole subsampling and the fast step through
them are compared with PyTorch's in tests/test_fused_norms.py; the GPU suite decodes through them
on the device (token agreement)."""

from __future__ import annotations

import pytest
import torch

from engines.subsampling_kernels import reads_one_channel
from tests.test_step_attention import _interpret

MASKED_CONV = """
    import torch
    import torch.nn.functional as F
    from engines import subsampling_kernels
    from engines.subsampling_kernels import masked_conv

    def reference(x, lens, pad, relu, w, b, stride):
        # NeMo's order: the ReLU, the 0/1 time mask, the zero padding, then the conv, in float32
        # from the very input values (so the products are exact, as on the device).
        B, Cin, T, F_ = x.shape
        lo, hi = pad
        v = torch.relu(x.float()) if relu else x.float()
        v = v * (torch.arange(T)[None, :] < lens[:, None]).float().view(B, 1, T, 1)
        v = F.pad(v, (lo, hi, lo, hi))
        return F.conv2d(v.double(), w.double(), None if b is None else b.double(), stride, 0, 1,
                        1 if Cin == 1 else Cin)

    torch.manual_seed(0)
    checked = 0
    for dtype in (torch.float32, torch.float16):
        # (Cin, C, T, F, K, stride, pad): the first conv (one input channel, the 0.6B model's mels
        # and 160/560 ms frames but few channels), depthwise convs, more channels than a
        # program's block, positions past a block, a symmetric pad, no pad, another kernel.
        for n, (Cin, C, T, F_, K, stride, pad) in enumerate([
                (1, 8, 25, 128, 3, 2, (2, 1)), (1, 20, 65, 40, 3, 2, (2, 1)), (6, 6, 13, 65, 3, 2, (2, 1)),
                (40, 40, 9, 33, 3, 2, (2, 1)), (5, 5, 7, 9, 3, 2, (1, 1)), (3, 3, 6, 8, 3, 1, (0, 0)),
                (4, 4, 11, 12, 5, 3, (2, 2))]):
            # rows: full, shorter, empty, longer than the input
            lens = torch.tensor([T, T - 2, 0, T + 5])
            base = torch.randn(4, Cin, F_, T).to(dtype)
            x = base.transpose(2, 3) if n % 2 == 0 else base.transpose(2, 3).contiguous()  # a view, as feats come
            w = torch.randn(C, 1, K, K).to(dtype)
            for relu, b in ((True, torch.randn(C).to(dtype)), (False, None)):
                # the GPU's tiles (several blocks of channels and positions a row) and the CPU's
                subsampling_kernels.WHOLE_ROWS_ON_CPU = relu
                got = masked_conv(x, lens, pad, relu, w, b, stride)
                want = reference(x, lens, pad, relu, w, b, stride)
                assert got.dtype == dtype and got.is_contiguous() and got.shape == want.shape, (got.shape, want.shape)
                # float32: the sum's order; float16: one rounding of the float32 sum
                tol = 1e-5 if dtype == torch.float32 else 2 ** -10
                err = ((got.double() - want) / (want.abs() + 1)).abs().max().item()
                assert err <= tol, (dtype, Cin, C, T, F_, K, stride, pad, relu, b is None, err)
                # the empty row reads only zeros: the bias alone
                bias = 0 if b is None else b.double()[:, None, None]
                assert torch.allclose(got[2].double(), torch.zeros_like(want[2]) + bias, atol=1e-3), "empty row"
                assert want.abs().max().item() > 0.5   # not an all-zero comparison
                checked += 1
    print("ok", checked)
"""


def test_masked_conv_equals_relu_mask_pad_then_conv_under_the_interpreter():
    """First conv (one input channel) and depthwise convs, strided views and contiguous input,
    rows full, shorter, empty and longer than the input, ReLU held or not, bias or none, several
    strides, kernels and pads: within float32 rounding of NeMo's order of operations, and a row of
    length 0 gives the bias alone."""
    out = _interpret(MASKED_CONV)
    assert out.strip().startswith("ok") and int(out.split()[-1]) == 2 * 7 * 2, out


def test_masked_conv_refuses_a_conv_that_mixes_channels():
    """A conv reading several input channels per output channel is not masked_conv's: refused
    before any kernel runs (the subsampling then pads a copy for cuDNN)."""
    from engines.subsampling_kernels import masked_conv

    x, lens = torch.zeros(2, 4, 5, 6), torch.tensor([5, 5])
    with pytest.raises(ValueError, match="one input channel"):
        masked_conv(x, lens, (1, 1), False, torch.zeros(4, 4, 3, 3), None, 2)
    with pytest.raises(ValueError, match="one input channel"):   # 4 input channels, 8 outputs: grouped by 2
        masked_conv(x, lens, (1, 1), False, torch.zeros(8, 1, 3, 3), None, 2)
    assert reads_one_channel(torch.zeros(8, 1, 3, 3), 1, 1) and reads_one_channel(torch.zeros(8, 1, 3, 3), 8, 8)
    assert not reads_one_channel(torch.zeros(8, 4, 3, 3), 1, 4) and not reads_one_channel(torch.zeros(8, 1, 3, 3), 4, 4)


RELU_MASK_PAD = """
    import torch
    from engines.subsampling_kernels import relu_mask_pad

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        for B, C, T, F, pad in [(3, 1, 25, 128, (2, 1)), (4, 6, 13, 64, (2, 1)), (2, 5, 7, 9, (1, 1)), (2, 3, 5, 4, (0, 0))]:
            base = torch.randn(B, C, F, T).to(dtype)
            for x in (base.transpose(2, 3), base.transpose(2, 3).contiguous()):   # a transposed view, as feats come
                lens = torch.tensor([T, T - 2, 0, 1][:B])
                lo, hi = pad
                mask = (torch.arange(T)[None, :] < lens[:, None]).to(dtype).view(B, 1, T, 1)
                for relu in (False, True):
                    want = x.new_zeros(B, C, lo + T + hi, lo + F + hi)
                    torch.mul(torch.relu(x) if relu else x, mask, out=want[:, :, lo:lo + T, lo:lo + F])
                    got = relu_mask_pad(x, lens, pad, relu)
                    assert got.is_contiguous() and torch.equal(got, want), (dtype, B, C, T, F, pad, relu)
                    assert (got != 0).any()   # not an all-zero comparison
    print("ok")
"""


def test_relu_mask_pad_equals_relu_mask_and_zero_padding_bit_for_bit_under_the_interpreter():
    out = _interpret(RELU_MASK_PAD)
    assert out.strip() == "ok", out
