"""CUDA-graph engine. Capture needs CUDA: those tests skip on CPU with "needs CUDA". The bucket
and padding logic (the part that could corrupt a real stream) runs here without capture
(`use_graphs=False`: same static buffers, same buckets, same padding rows)."""

from __future__ import annotations

import pytest
import torch

from engines.cudagraph_engine import CudaGraphEncoder, batch_buckets, bucket_for
from engines.encoders import EagerEncoder
from engines.export import encoder_io, example_inputs
from engines.models import speechlike_audio
from engines.streaming_engine import StreamingEngine
from tests.engine_helpers import run_streams

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module", autouse=True)
def _flush_denormals():
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def model(tiny_engine):
    return tiny_engine.model


def _nemo_layout(inputs):
    feats, length, cc, ct, ccl = inputs
    return feats, length, cc.transpose(0, 1).contiguous(), ct.transpose(0, 1).contiguous(), ccl


def test_buckets():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert batch_buckets(256) == (1, 2, 4, 8, 16, 32, 64, 80, 96, 112, 128, 160, 192, 224, 256)
    # Above 64 rows no bucket is more than a quarter larger than the one below it.
    big = batch_buckets(1024)
    assert big[-3:] == (768, 896, 1024) and all(b <= a * 1.25 for a, b in zip(big, big[1:]) if a >= 64)
    assert batch_buckets(64, [16, 1, 200, 0]) == (1, 16, 64)
    b = batch_buckets(48)
    assert [bucket_for(n, b) for n in (1, 2, 3, 5, 17, 33, 48)] == [1, 2, 4, 8, 32, 48, 48]
    with pytest.raises(ValueError):
        bucket_for(49, b)


def test_cpu_refuses_graphs(model):
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        CudaGraphEncoder(model.nemo_model.encoder, encoder_io(model), torch.device("cpu"), torch.float32, 4)


def test_padding_rows_do_not_disturb_real_rows(model):
    enc = model.nemo_model.encoder
    io = encoder_io(model)
    engine = CudaGraphEncoder(enc, io, torch.device("cpu"), torch.float32, max_batch=8, use_graphs=False)
    assert engine.buckets == (1, 2, 4, 8) and engine.captures == 0
    # leftovers of earlier steps in the padding rows: large, but finite
    g = torch.Generator().manual_seed(0)
    for buf in (engine.in_feats, engine.in_cc, engine.in_ct):
        buf.copy_(torch.randn(buf.shape, generator=g) * 50)
    engine.in_ccl.fill_(70)
    eager = EagerEncoder(enc)
    for k, n in enumerate((1, 3, 5, 8, 2)):
        inputs = _nemo_layout(example_inputs(io, n, torch.float32, torch.device("cpu"), seed=k))
        ref = [t.clone() for t in eager.step(*inputs)]
        got = engine.step(*inputs)
        assert got[0].shape == ref[0].shape and got[2].shape == ref[2].shape
        for a, b in zip(got, ref):
            if a.is_floating_point():
                assert (a - b).abs().max().item() < 1e-5
            else:
                assert torch.equal(a, b)
    assert engine.executions == 5


def test_streaming_tokens_identical_through_buckets(model, tiny_engine):
    enc = model.nemo_model.encoder
    cg = CudaGraphEncoder(enc, encoder_io(model), torch.device("cpu"), torch.float32, max_batch=4, use_graphs=False)
    engine = StreamingEngine(model, cg, 160, capacity=6, max_batch=4, device=torch.device("cpu"),
                             dtype=torch.float32)
    audios = {f"s{i}": speechlike_audio(sec, seed=40 + i) for i, sec in enumerate((0.9, 1.4, 0.6, 1.2, 1.0))}
    start = {"s2": 2, "s3": 3, "s4": 5}
    steps = []
    inner = engine.step
    engine.step = lambda plan: steps.append(len(plan.chunks)) or inner(plan)
    got = run_streams(engine, audios, seed=1, start_step=start)
    ref = run_streams(tiny_engine, audios, seed=2, start_step=start, max_batch=4)
    for sid in audios:
        assert got[sid].tokens == ref[sid].tokens, sid
        for a, b in zip(got[sid].encoded, ref[sid].encoded):
            assert (a - b).abs().max().item() < 1e-4
    assert sum(len(r.tokens) for r in ref.values()) > 0
    assert sum(steps) == sum(r.chunks for r in got.values()) and len(set(steps)) > 1
    assert engine.executions() == {"cudagraph": len(steps)}


# -- on a GPU ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_model():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from engines.models import load_model

    m = load_model("builtin:tiny", 160)
    m.nemo_model.to(device="cuda", dtype=torch.float16)
    m.nemo_model.preprocessor.to(dtype=torch.float32)
    return m


@needs_cuda
def test_graphs_match_eager_and_never_recapture(gpu_model):
    enc = gpu_model.nemo_model.encoder
    io = encoder_io(gpu_model)
    dev = torch.device("cuda")
    engine = CudaGraphEncoder(enc, io, dev, torch.float16, max_batch=16)
    assert engine.captures == len(engine.buckets) == 5
    eager = EagerEncoder(enc)
    sizes = [1, 3, 16, 7, 2, 9, 1, 16, 5]
    for k, n in enumerate(sizes):
        inputs = _nemo_layout(example_inputs(io, n, torch.float16, dev, seed=k))
        ref = [t.clone() for t in eager.step(*inputs)]
        got = [t.clone() for t in engine.step(*inputs)]
        scale = ref[0].abs().max().item()
        assert (got[0] - ref[0]).abs().max().item() <= 2e-2 * scale
        assert (got[2] - ref[2]).abs().max().item() <= 2e-2 * ref[2].abs().max().item()
        assert torch.equal(got[1], ref[1]) and torch.equal(got[4], ref[4])
    assert engine.executions == len(sizes)
    assert engine.captures == len(engine.buckets), "a steady-state step recaptured a graph"


@needs_cuda
def test_build_engine_cudagraph_passes_self_check(gpu_model, monkeypatch):
    import engines.factory as factory
    from engines.config import EngineConfig

    monkeypatch.setattr(factory, "load_model", lambda *a, **k: gpu_model)
    engine = factory.build_engine(EngineConfig(model="builtin:tiny", engine="cudagraph", device="cuda",
                                               dtype="float16", lookahead_ms=160, max_streams=8, max_batch=8))
    report = engine.startup_report
    assert report.engine == "cudagraph" and report.self_check.passed, report.self_check
    n = report.self_check.steps
    assert engine.executions() == {"cudagraph": n}
    assert engine.warmup() == "cudagraph"
    # On CUDA the warm-up is one step on silence, then every batch bucket's first, middle and
    # short last chunk (StreamingEngine.warm_batch_buckets), so no graph is captured while serving.
    g = engine.geometry
    per_bucket = g.total_chunks(g.samples_needed(1) + g.chunk_samples // 2)
    assert engine.executions() == {"cudagraph": n + 1 + per_bucket * len(batch_buckets(8))}
    assert engine.encoder_engine.captures == len(engine.encoder_engine.buckets)


@needs_cuda
@pytest.mark.slow
def test_compiled_graphs_match_eager(gpu_model):
    enc = gpu_model.nemo_model.encoder
    io = encoder_io(gpu_model)
    dev = torch.device("cuda")
    engine = CudaGraphEncoder(enc, io, dev, torch.float16, max_batch=4, compile=True)
    eager = EagerEncoder(enc)
    for k, n in enumerate((1, 3, 4)):
        inputs = _nemo_layout(example_inputs(io, n, torch.float16, dev, seed=k))
        ref = [t.clone() for t in eager.step(*inputs)]
        got = engine.step(*inputs)
        assert (got[0] - ref[0]).abs().max().item() <= 2e-2 * ref[0].abs().max().item()
    assert engine.captures == len(engine.buckets)
