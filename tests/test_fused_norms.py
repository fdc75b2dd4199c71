"""engines/fused_norms.py: the fast step's residual-add-and-norm and its conv module's depthwise
conv, norm and Swish as single Triton kernels, against PyTorch's operations, and one fast step
with every layer's parts fused against the step with PyTorch's, under Triton's interpreter on
the CPU (where Triton is installed: the test extra installs it; PyTorch's CPU wheels do not).
Whole streams through the fused parts are decoded against NeMo in tests/test_step_attention.py
(the engine with the cache read in the pool runs them); the GPU suite runs both on the device."""

from __future__ import annotations

import pytest

from engines.fast_conformer import StepParts
from tests.test_step_attention import _interpret

KERNELS_AGAINST_TORCH = """
    import torch
    import torch.nn.functional as F
    from engines.fused_norms import add_layer_norm, conv_norm_silu, glu_into

    torch.manual_seed(0)
    for dtype, tol in [(torch.float32, 1e-5), (torch.float16, 2e-2)]:
        for rows, d in [(7, 64), (3, 100), (1, 1024)]:
            big = torch.randn(rows, d + 8).to(dtype)
            x = big[:, :d]                                    # strided rows, as the step's views
            r = torch.randn(rows, d).to(dtype)
            w, b = torch.randn(d).to(dtype), torch.randn(d).to(dtype)
            total, normed = add_layer_norm(x, r, w, b, 1e-5)
            want_total = x + r
            want = F.layer_norm(want_total.float(), (d,), w.float(), b.float(), 1e-5)
            assert torch.equal(total, want_total), (dtype, rows, d)
            err = (normed.float() - want).abs().max().item()
            assert err <= tol, ("add_layer_norm", dtype, rows, d, err)
            unkept, normed_only = add_layer_norm(x, r, w, b, 1e-5, keep_sum=False)   # a layer's last norm
            assert unkept is None and torch.equal(normed_only, normed)
        for B, T, d, K in [(3, 2, 64, 9), (2, 7, 48, 9), (1, 13, 32, 5)]:
            big = torch.randn(B, K - 1 + T, d + 16).to(dtype)
            conv = big[..., :d]                               # a workspace's rows: strided
            w_rows = torch.randn(d, K).to(dtype)
            bias, ln_w, ln_b = torch.randn(d).to(dtype), torch.randn(d).to(dtype), torch.randn(d).to(dtype)
            got = conv_norm_silu(conv, w_rows, bias, ln_w, ln_b, 1e-5)
            w = w_rows.t().contiguous().t()                   # tap-major, as the step stores it: the same values
            assert torch.equal(conv_norm_silu(conv, w, bias, ln_w, ln_b, 1e-5), got)
            y = (conv.float().unfold(1, K, 1) * w.float()).sum(-1) + bias.float()
            want = F.silu(F.layer_norm(y, (d,), ln_w.float(), ln_b.float(), 1e-5)).reshape(B * T, d)
            err = (got.float() - want).abs().max().item()
            assert got.shape == (B * T, d) and err <= tol, ("conv_norm_silu", dtype, B, T, d, err)
        for B, T, d in [(3, 2, 64), (2, 7, 48)]:
            pre = torch.randn(B * T, 2 * d).to(dtype)
            enc_len = torch.tensor([T, T - 1, 0][:B])
            work = torch.full((B, 8 + T, d + 4), 7.0).to(dtype)
            out = work[:, 8:, :d]                              # the conv workspace's new frames: strided
            glu_into(pre, enc_len, out)
            want = F.glu(pre.float(), -1).view(B, T, d) * (torch.arange(T)[None, :] < enc_len[:, None])[..., None]
            err = (out.float() - want).abs().max().item()
            assert err <= tol, ("glu_into", dtype, B, T, d, err)
            assert (work[:, :8] == 7).all() and (work[..., d:] == 7).all()   # nothing else written
    print("ok")
"""


def test_the_fused_kernels_equal_torchs_operations_under_the_interpreter():
    out = _interpret(KERNELS_AGAINST_TORCH)
    assert out.strip() == "ok", out


FUSED_STEP = """
    import torch
    from engines.config import EngineConfig
    from engines.factory import build_engine
    from engines.fast_conformer import FastConformerParams, FastStepBuffers, StepParts, _subsample, fast_step
    from tests.conftest import _quiet_nemo

    _quiet_nemo()
    for la in (160, 560):
        eager = build_engine(EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32",
                                          lookahead_ms=la, max_streams=4, max_batch=4))
        p = FastConformerParams.from_encoder(eager.model.nemo_model.encoder)
        g = p.geo
        gen = torch.Generator().manual_seed(la)
        outs = []
        for parts in (StepParts(), StepParts(fused=True)):
            bufs = FastStepBuffers(p, max_batch=4)
            bufs.feats.copy_(torch.randn(bufs.feats.shape, generator=torch.Generator().manual_seed(1)))
            bufs.kv_work.copy_(torch.randn(bufs.kv_work.shape, generator=torch.Generator().manual_seed(2)))
            bufs.conv_work.copy_(torch.randn(bufs.conv_work.shape, generator=torch.Generator().manual_seed(3)))
            bufs.cache_len.copy_(torch.tensor([g.cache, 0, 5, g.cache]))
            bufs.lengths.copy_(torch.tensor([g.frames_in, g.frames_in, g.pre_encode + 3, g.pre_encode]))
            outs.append([t.clone() for t in fast_step(p, *bufs.step_args(4), parts=parts)])
        for name, a, b in zip(("encoded", "enc_len", "cache_channel", "cache_time", "cache_len"), *outs):
            err = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
            assert err <= 1e-4, (la, name, err)
        assert outs[0][0].abs().max().item() > 0.1  # not an all-zero comparison
        # The subsampling alone: full, partial and almost empty rows, fp32 and fp16. With the
        # padded copies and cuDNN's convs, bit for bit; with masked_conv (its own order of each
        # conv's float32 sum), within rounding.
        for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 4e-3)):
            q = FastConformerParams.from_encoder(eager.model.nemo_model.encoder, dtype=dtype)
            feats = torch.randn(5, g.n_mels, g.frames_in, generator=torch.Generator().manual_seed(la)).to(dtype)
            lengths = torch.tensor([g.frames_in, g.frames_in - 1, g.pre_encode + 3, g.pre_encode, 1])
            x0, len0 = _subsample(q, feats, lengths)
            x1, len1 = _subsample(q, feats, lengths, fused=True, masked_convs=False)
            assert torch.equal(len0, len1) and torch.equal(x0, x1), (la, dtype, (x0 - x1).abs().max().item())
            x2, len2 = _subsample(q, feats, lengths, fused=True)
            err = ((x2.float() - x0.float()) / (x0.float().abs() + 1)).abs().max().item()
            assert torch.equal(len0, len2) and err <= tol, (la, dtype, err)
            assert x0.abs().max().item() > 0.1
            print(la, dtype, "masked_conv subsampling error", err)
    print("ok")
"""


def test_a_fast_step_with_fused_parts_equals_the_step_with_torchs_under_the_interpreter():
    """Every output of one fast step (encoded frames, lengths, next caches), 160 and 560 ms,
    rows with full, empty and partial caches and short chunks: fused parts within 1e-4 of
    PyTorch's in fp32. And the subsampling alone, full, partial and almost empty rows, fp32 and
    fp16: with padded copies for cuDNN (one pass for each strided conv's ReLU, mask and padding;
    no mask before a pointwise conv), the very values of PyTorch's operations; with masked_conv
    (engines/subsampling_kernels.py), those values up to rounding."""
    out = _interpret(FUSED_STEP)
    assert out.strip().endswith("ok"), out


def test_compile_and_fusion_are_one_choice():
    with pytest.raises(ValueError, match="choose one"):
        StepParts(compile=True, fused=True)
    parts = StepParts(fused=True)
    assert parts.fused and not parts.compiled


def test_the_fast_graph_engine_refuses_fused_kernels_where_triton_cannot_run(monkeypatch):
    from engines.config import EngineConfig
    from engines.factory import build_engine
    from engines.fast_conformer import UnsupportedEncoder
    from engines.fast_engines import FastCudaGraphEncoder

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    eager = build_engine(EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32",
                                      lookahead_ms=160, max_streams=4, max_batch=2))
    with pytest.raises(UnsupportedEncoder, match="fused kernels"):
        FastCudaGraphEncoder(eager.model.nemo_model.encoder, max_batch=2, use_graphs=False, fused_norms=True)
    with pytest.raises(ValueError, match="choose one"):
        FastCudaGraphEncoder(eager.model.nemo_model.encoder, max_batch=2, use_graphs=False, fused_norms=True,
                             compile=True)
