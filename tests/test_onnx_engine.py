"""ONNX Runtime engine vs the eager reference, on CPU with builtin:tiny in float32.

The exported graph is the one the TensorRT engine consumes too, so these tests also check
the graph TensorRT would build from.
"""

from __future__ import annotations

import pytest
import torch

from engines.api import ChunkWork, StepPlan
from engines.config import EngineConfig
from engines.encoders import EagerEncoder, TRTEncoderWrapper
from engines.models import speechlike_audio
from engines.streaming_engine import StreamingEngine

pytest.importorskip("onnxruntime")

LOOKAHEAD = 160
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _flush_denormals():
    # Random-weight caches decay into denormal floats, which slow CPU kernels several-fold.
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def model(tiny_engine):
    """builtin:tiny, fp32, CPU, 160 ms: the session's model (loading one takes seconds)."""
    assert tiny_engine.geometry.lookahead_ms == LOOKAHEAD
    return tiny_engine.model


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("nemo-stream-cache"))


@pytest.fixture(scope="module")
def onnx_encoder(model, cache_dir):
    from engines.onnx_engine import build_onnx_encoder

    cfg = EngineConfig(model="builtin:tiny", engine="onnx", device="cpu", dtype="float32",
                       lookahead_ms=LOOKAHEAD, cache_dir=cache_dir)
    return build_onnx_encoder(model, cfg, torch.device("cpu"), torch.float32)


def test_export_is_cached_on_disk(model, cache_dir, onnx_encoder):
    from engines.onnx_engine import build_onnx_encoder

    cfg = EngineConfig(model="builtin:tiny", engine="onnx", device="cpu", dtype="float32",
                       lookahead_ms=LOOKAHEAD, cache_dir=cache_dir)
    again = build_onnx_encoder(model, cfg, torch.device("cpu"), torch.float32)
    assert again.export_cache_hit
    assert again.runner.path == onnx_encoder.runner.path
    assert again.runner.path.startswith(cache_dir)
    assert model.checksum in again.export_key and f"la{LOOKAHEAD}" in again.export_key
    # nothing half-written is left behind
    import os
    assert not [d for d in os.listdir(os.path.dirname(os.path.dirname(again.runner.path))) if d.startswith(".tmp")]


def test_onnx_engine_is_wrapped_and_counts(onnx_encoder):
    assert onnx_encoder.name == "onnx"
    assert isinstance(onnx_encoder.wrapper, TRTEncoderWrapper)
    assert onnx_encoder.runner.providers[0] == "CPUExecutionProvider"


def _mixed_inputs(model, rows: int, steps: int, seed: int = 0):
    """Per step, encoder inputs for `rows` streams that started at different steps (so their
    caches are at different fill levels), made by running the eager reference."""
    enc = model.nemo_model.encoder
    cfg = enc.streaming_cfg
    T = cfg.chunk_size[1] + cfg.pre_encode_cache_size[1]
    g = torch.Generator().manual_seed(seed)
    cc, ct, ccl = enc.get_initial_cache_state(batch_size=rows)
    eager = EagerEncoder(enc)
    out = []
    for s in range(steps):
        feats = torch.randn(rows, enc._feat_in, T, generator=g)
        lengths = torch.full((rows,), T, dtype=torch.int64)
        lengths[-1] = T - 5 if s == steps - 1 else T  # a short last chunk in the final step
        # row r starts at step r: until then its cache is fresh
        for r in range(rows):
            if s <= r:
                cc[:, r].zero_()
                ct[:, r].zero_()
                ccl[r] = 0
        out.append((feats, lengths, cc.clone(), ct.clone(), ccl.clone()))
        cc, ct, ccl = (t.clone() for t in eager.step(feats, lengths, cc, ct, ccl)[2:])
    return out


def test_encoder_outputs_match_eager(model, onnx_encoder):
    eager = EagerEncoder(model.nemo_model.encoder)
    before = onnx_encoder.executions
    steps = _mixed_inputs(model, rows=4, steps=5)
    for inputs in steps:
        ref = eager.step(*inputs)
        got = onnx_encoder.step(*inputs)
        assert got[0].shape == ref[0].shape
        assert torch.equal(got[1], ref[1])
        n = int(ref[1].max())
        assert (got[0][..., :n] - ref[0][..., :n]).abs().max().item() < TOL
        assert (got[2] - ref[2]).abs().max().item() < TOL
        assert (got[3] - ref[3]).abs().max().item() < TOL
        assert torch.equal(got[4], ref[4])
    assert onnx_encoder.executions == before + len(steps)


def _engine(model, encoder):
    return StreamingEngine(model, encoder, LOOKAHEAD, capacity=8, max_batch=8, device=torch.device("cpu"),
                           dtype=torch.float32)


def test_streaming_tokens_identical(model, onnx_encoder):
    """Two streaming engines side by side, same plans: mixed batches of streams at different
    positions (first chunks, steady chunks, short last chunks) give identical tokens and
    caches within tolerance."""
    eager = _engine(model, EagerEncoder(model.nemo_model.encoder))
    onnx = _engine(model, onnx_encoder)
    g = eager.geometry
    lengths_s = [1.1, 1.7, 0.5, 2.0, 1.3]
    audio = [speechlike_audio(sec, seed=10 + i) for i, sec in enumerate(lengths_s)]
    start = [0, 0, 1, 2, 4]
    slots = {name: [e.acquire_slot() for _ in audio] for name, e in (("eager", eager), ("onnx", onnx))}
    assert slots["eager"] == slots["onnx"]
    k = [0] * len(audio)
    done = [False] * len(audio)
    texts = {"eager": [""] * len(audio), "onnx": [""] * len(audio)}
    onnx_before = onnx_encoder.executions
    steps = 0
    step = 0
    while not all(done):
        chunks = []
        for i, a in enumerate(audio):
            if done[i] or step < start[i] or (step + i) % 4 == 3:  # some streams skip some steps
                continue
            span = g.chunk_span(k[i], a.size, True)
            assert span is not None
            lo, hi = span
            chunks.append(ChunkWork(f"s{i}", slots["eager"][i], a[lo:hi], first=k[i] == 0,
                                    audio_ended=hi == a.size))
        step += 1
        if not chunks:
            continue
        r_eager = eager.step(StepPlan(tuple(chunks)))
        r_onnx = onnx.step(StepPlan(tuple(chunks)))
        steps += 1
        assert r_onnx.engine == "onnx" and r_eager.engine == "eager"
        for ue, uo in zip(r_eager.updates, r_onnx.updates):
            assert ue.stream_id == uo.stream_id
            assert [t.token_id for t in ue.tokens] == [t.token_id for t in uo.tokens], ue.stream_id
            assert [t.frame for t in ue.tokens] == [t.frame for t in uo.tokens]
            assert ue.is_final == uo.is_final and ue.frames_decoded == uo.frames_decoded
            i = int(ue.stream_id[1:])
            texts["eager"][i] += ue.text_delta
            texts["onnx"][i] += uo.text_delta
            k[i] += 1
            done[i] = ue.is_final
        for name in ("cache_channel", "cache_time"):
            diff = (eager.pool.tensors[name] - onnx.pool.tensors[name]).abs().max().item()
            assert diff < TOL, name
        assert torch.equal(eager.pool.tensors["cache_len"], onnx.pool.tensors["cache_len"])
    assert texts["eager"] == texts["onnx"]
    assert sum(len(t) for t in texts["eager"]) > 0, "random-weight model produced no text: test is vacuous"
    assert onnx.executions() == {"onnx": onnx_before + steps}
