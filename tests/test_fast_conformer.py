"""The fast encoder step (engines/fast_conformer.py) against NeMo's own module, on CPU with
builtin:tiny in fp32: one step at a time (every output, padded frames and next caches included,
within 1e-4), and whole streams through StreamingEngine (identical tokens, encoder outputs within
1e-4) alone and in mixed batches of streams at different positions, at every lookahead, with
short last chunks and streams shorter than one chunk."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from engines.fast_conformer import FastConformerParams, FastStepBuffers, UnsupportedEncoder, fast_step
from engines.fast_engines import FastConformerEncoder, FastCudaGraphEncoder
from engines.models import speechlike_audio
from engines.streaming_engine import StreamingEngine
from tests.engine_helpers import run_alone, run_streams

LOOKAHEADS = [80, 160, 560, 1120]
ATOL = 1e-4
# Lengths in seconds: two shorter than one chunk at 1120 ms (one shorter than a chunk at every
# lookahead), none a multiple of any chunk, so every stream ends on a short last chunk.
SECONDS = [0.05, 0.11, 0.9, 1.37, 2.05]


@pytest.fixture(scope="module", params=LOOKAHEADS, ids=[f"{la}ms" for la in LOOKAHEADS])
def engines(request):
    """(eager StreamingEngine, fast StreamingEngine) over one shared NeMo model."""
    from engines.config import EngineConfig
    from engines.factory import build_engine
    from tests.conftest import _quiet_nemo

    _quiet_nemo()
    la = request.param
    eager = build_engine(EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32",
                                      lookahead_ms=la, max_streams=16, max_batch=8))
    enc = eager.model.nemo_model.encoder
    fast = StreamingEngine(eager.model, FastConformerEncoder(enc), la, capacity=16, max_batch=8,
                           device=torch.device("cpu"), dtype=torch.float32)
    yield eager, fast
    assert eager.slots_in_use() == 0 and fast.slots_in_use() == 0, "a test leaked a cache slot"


@pytest.fixture(scope="module")
def audios():
    return {f"s{i}": speechlike_audio(sec, seed=300 + i) for i, sec in enumerate(SECONDS)}


@pytest.fixture(scope="module")
def eager_alone(engines, audios):
    eager, _ = engines
    return {sid: run_alone(eager, a, sid) for sid, a in audios.items()}


def _project(encoder, cache_channel):
    """NeMo's attention cache (normalised layer inputs) -> the fast step's projected K|V."""
    return torch.stack([torch.cat([layer.self_attn.linear_k(cache_channel[i]), layer.self_attn.linear_v(cache_channel[i])],
                                  dim=-1) for i, layer in enumerate(encoder.layers)])


def _random_state(p, batch, seed):
    g = p.geo
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, g.n_mels, g.frames_in, generator=gen)
    pre = g.pre_encode
    lengths = torch.randint(pre, g.frames_in + 1, (batch,), generator=gen)
    lengths[0], lengths[-1] = g.frames_in, pre          # a full chunk and one with no new frames
    cache_len = torch.randint(0, g.cache + 1, (batch,), generator=gen)
    cache_len[0], cache_len[1 % batch] = g.cache, 0
    cc = torch.randn(g.n_layers, batch, g.cache, g.d_model, generator=gen)
    for b in range(batch):
        cc[:, b, : g.cache - int(cache_len[b])] = 0
    ct = torch.randn(g.n_layers, batch, g.d_model, g.conv_cache, generator=gen)
    return feats, lengths, cc, ct, cache_len


def _assert_close(a, b, what):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= ATOL, (what, err)


@pytest.mark.parametrize("seed", [0, 1])
def test_one_step_equals_nemo(engines, seed):
    eager, fast = engines
    enc = eager.model.nemo_model.encoder
    eng = fast.encoder_engine
    feats, lengths, cc, ct, cache_len = _random_state(eng.params, 7, seed)
    with torch.inference_mode():
        ref = enc.cache_aware_stream_step(processed_signal=feats, processed_signal_length=lengths,
                                          cache_last_channel=cc, cache_last_time=ct, cache_last_channel_len=cache_len,
                                          keep_all_outputs=True)
        kv = _project(enc, cc)
        got = eng.step(feats, lengths, kv, ct, cache_len)
        kv_ref = _project(enc, ref[2])
    assert torch.equal(got[1], ref[1]), "encoded lengths"
    assert torch.equal(got[4], ref[4]), "next cache lengths"
    # every frame, the padded ones too, and the next caches
    _assert_close(got[0], ref[0], "encoded")
    _assert_close(got[3], ref[3], "cache_last_time_next")
    _assert_close(got[2], kv_ref, "projected cache_last_channel_next")
    assert ref[1].min() == 0 and ref[1].max() == eng.params.geo.frames_out


def test_streams_alone_equal_eager(engines, audios, eager_alone):
    _, fast = engines
    for sid, audio in audios.items():
        got, ref = run_alone(fast, audio, sid), eager_alone[sid]
        assert got.tokens == ref.tokens, sid
        assert got.text == ref.text, sid
        assert got.final and got.chunks == ref.chunks
        for a, b in zip(got.encoded, ref.encoded):
            _assert_close(a, b, sid)
    assert any(len(r.tokens) > 0 for r in eager_alone.values()), "nothing transcribed: the comparison is vacuous"


@pytest.mark.parametrize("seed", [1, 2])
def test_mixed_batches_equal_eager_alone(engines, audios, eager_alone, seed):
    _, fast = engines
    starts = {sid: (i * seed) % 4 for i, sid in enumerate(audios)}
    mixed = run_streams(fast, audios, seed=seed, start_step=starts)
    for sid, ref in eager_alone.items():
        got = mixed[sid]
        assert got.tokens == ref.tokens, sid
        assert len(got.encoded) == len(ref.encoded), sid
        for a, b in zip(got.encoded, ref.encoded):
            _assert_close(a, b, sid)


def test_cache_shape_counter_and_warmup(engines):
    eager, fast = engines
    eng = fast.encoder_engine
    g = eng.params.geo
    enc = eager.model.nemo_model.encoder
    assert eng.name == "fast"
    assert eng.cache_channel_shape == (len(enc.layers), 70, 2 * enc.d_model)
    assert tuple(fast.pool.tensors["cache_channel"].shape) == (len(enc.layers), fast.capacity, 70, 2 * enc.d_model)
    before = eng.executions
    assert fast.warmup() == "fast"
    assert eng.executions == before + 1
    assert g.frames_out == enc.streaming_cfg.valid_out_len


def test_graph_engine_buckets_without_graphs(engines, audios, eager_alone):
    """The static-buffer, bucket and padding-row path of the fast-cudagraph engine (no capture on
    CPU): batches run in buckets larger than themselves and still equal streams alone."""
    eager, _ = engines
    enc = eager.model.nemo_model.encoder
    graph_eng = FastCudaGraphEncoder(enc, max_batch=8, use_graphs=False, buckets=(2, 4))
    assert graph_eng.buckets == (2, 4, 8)
    engine = StreamingEngine(eager.model, graph_eng, eager.geometry.lookahead_ms, capacity=16, max_batch=8,
                             device=torch.device("cpu"), dtype=torch.float32)
    mixed = run_streams(engine, audios, seed=5, start_step={sid: i % 3 for i, sid in enumerate(audios)})
    for sid, ref in eager_alone.items():
        assert mixed[sid].tokens == ref.tokens, sid
        for a, b in zip(mixed[sid].encoded, ref.encoded):
            _assert_close(a, b, sid)
    assert graph_eng.executions > 0 and graph_eng.describe()["graphs"] is False


def test_static_buffers_alias_the_workspaces(engines):
    """Copying a batch into FastStepBuffers.inputs(b) is all a step needs: the cache views alias
    the workspaces that fast_step reads."""
    eager, fast = engines
    enc = eager.model.nemo_model.encoder
    p = fast.encoder_engine.params
    feats, lengths, cc, ct, cache_len = _random_state(p, 3, seed=9)
    with torch.inference_mode():
        kv = _project(enc, cc)
        ref = fast.encoder_engine.step(feats, lengths, kv, ct, cache_len)
        ref = [t.clone() for t in ref]
        bufs = FastStepBuffers(p, max_batch=4)
        for dst, src in zip(bufs.inputs(3), (feats, lengths, kv, ct, cache_len)):
            dst.copy_(src)
        got = fast_step(p, *bufs.step_args(3), bias_buffer=bufs.bias_buffer(3))
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_lookahead_change_is_refused(engines):
    eager, fast = engines
    enc = eager.model.nemo_model.encoder
    eng = fast.encoder_engine
    saved = list(enc.att_context_size)
    other = next(c for c in enc.att_context_size_all if list(c) != saved)
    p = eng.params
    feats, lengths, cc, ct, cache_len = _random_state(p, 1, seed=3)
    enc.att_context_size = list(other)
    try:
        with pytest.raises(RuntimeError, match="att_context_size"):
            eng.step(feats, lengths, torch.zeros(p.geo.n_layers, 1, 70, 2 * p.geo.d_model), ct, cache_len)
    finally:
        enc.att_context_size = saved


def test_unsupported_encoder_is_refused(engines):
    eager, _ = engines
    enc = copy.deepcopy(eager.model.nemo_model.encoder)
    enc.layers[1].conv.norm_type = "batch_norm"
    with pytest.raises(UnsupportedEncoder, match="conv norm"):
        FastConformerParams.from_encoder(enc)


def test_flop_counts(engines):
    _, fast = engines
    p = fast.encoder_engine.params
    # The fast step skips re-projecting K/V over the cached frames: strictly less arithmetic.
    assert 0 < p.flops_per_stream() < p.nemo_flops(1)
    assert 0 < 64 * p.flops_per_stream() < p.nemo_flops(64)


@pytest.mark.slow
def test_compiled_parts_equal_eager(engines):
    """torch.compile of the three per-layer pieces (inductor on CPU) gives the same step."""
    eager, fast = engines
    if eager.geometry.lookahead_ms != 160:
        pytest.skip("compiled once, at one lookahead")
    enc = eager.model.nemo_model.encoder
    p = fast.encoder_engine.params
    feats, lengths, cc, ct, cache_len = _random_state(p, 4, seed=11)
    with torch.inference_mode():
        kv = _project(enc, cc)
        ref = fast.encoder_engine.step(feats, lengths, kv, ct, cache_len)
        ref = [t.clone() for t in ref]
        compiled = FastConformerEncoder(enc, compile=True)
        got = compiled.step(feats, lengths, kv, ct, cache_len)
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        assert torch.allclose(a.float(), b.float(), atol=ATOL, rtol=0)
    np.testing.assert_array_equal(got[1].numpy(), ref[1].numpy())


def test_startup_self_check_passes(engines):
    """The factory's start-up self-check (engines.selfcheck) accepts both fast engines: their own
    cache layout, counters that move, outputs equal to eager."""
    from types import SimpleNamespace

    from engines.fast_engines import build_fast_encoder
    from engines.selfcheck import check_encoder_engine

    eager, _ = engines
    cfg = SimpleNamespace(max_batch=4)
    for graphs, opts in ((False, {}), (True, {"use_graphs": False})):
        eng = build_fast_encoder(eager.model, cfg, torch.device("cpu"), torch.float32, graphs=graphs, **opts)
        check = check_encoder_engine(eng, eager.model, torch.device("cpu"), torch.float32, 4)
        assert check.passed, check.detail
        assert check.executions_after - check.executions_before >= check.steps


@pytest.mark.parametrize("seed", [3])
def test_ring_cache_equals_whole_windows(engines, audios, seed):
    """The fast engine's attention cache is a ring in the slot pool (the commit writes only the
    step's new frames): the same mixed batches through a pool of whole windows give bit-identical
    encoder outputs and tokens, and a second round on the reused slots (rings holding the previous
    streams' frames) gives the same again."""
    _, fast = engines
    assert fast.ring_cache and "cache_channel" in fast.pool.heads
    whole = StreamingEngine(fast.model, fast.encoder_engine, fast.geometry.lookahead_ms, capacity=16, max_batch=8,
                            device=torch.device("cpu"), dtype=torch.float32, ring_cache=False)
    assert not whole.ring_cache and not whole.pool.heads
    starts = {sid: i % 3 for i, sid in enumerate(audios)}
    ref = run_streams(whole, audios, seed=seed, start_step=starts)
    for round_ in range(2):
        got = run_streams(fast, audios, seed=seed, start_step=starts)
        for sid in audios:
            assert got[sid].tokens == ref[sid].tokens, (round_, sid)
            assert len(got[sid].encoded) == len(ref[sid].encoded), (round_, sid)
            for a, b in zip(got[sid].encoded, ref[sid].encoded):
                assert torch.equal(a, b), (round_, sid)
    assert any(r.tokens for r in ref.values()), "nothing transcribed: the comparison is vacuous"
    if fast.geometry.encoder_frames < 70:  # heads advance unless a step shifts the whole window
        assert int(fast.pool.heads["cache_channel"].max()) > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_step_takes_its_cache_in_ring_order(engines, seed):
    """fast_step with `cache_head`: each row's cache frames rotated as the slot pool's ring
    stores them (oldest at the head) give the step's outputs of the time-ordered cache: encoded
    frames, lengths, the conv cache and the new K|V frames (what a ring's commit writes)."""
    _, fast = engines
    p = fast.encoder_engine.params
    g = p.geo
    feats, lengths, cc, ct, cache_len = _random_state(p, 5, seed)
    kv_time = torch.randn(g.n_layers, 5, g.cache, 2 * g.d_model, generator=torch.Generator().manual_seed(seed))
    head = torch.tensor([0, 1, g.cache - 1, 17 % g.cache, 40 % g.cache])
    # ring position q holds the frame of time (q - head) mod C
    pos = (torch.arange(g.cache)[None, :] + head[:, None]) % g.cache          # time j sits at pos[b, j]
    kv_ring = torch.empty_like(kv_time)
    for b in range(5):
        kv_ring[:, b, pos[b]] = kv_time[:, b]
    with torch.inference_mode():
        outs = []
        for kv, h in ((kv_time, None), (kv_ring, head)):
            bufs = FastStepBuffers(p, max_batch=5)
            for dst, src in zip(bufs.inputs(5), (feats, lengths, kv, ct, cache_len)):
                dst.copy_(src)
            # with the aligned bias buffer the GPU path uses: the permuted bias lands in a sliced view
            out = fast_step(p, *bufs.step_args(5), bias_buffer=bufs.bias_buffer(5), cache_head=h)
            outs.append([t.clone() for t in out])
    ref, got = outs
    assert torch.equal(got[1], ref[1]) and torch.equal(got[4], ref[4])
    _assert_close(got[0], ref[0], "encoded")
    _assert_close(got[3], ref[3], "cache_last_time_next")
    T = g.frames_out
    _assert_close(got[2][:, :, -T:], ref[2][:, :, -T:], "new K|V frames")
    assert (ref[0] - fast_step(p, *_buffers_with(p, feats, lengths, kv_ring, ct, cache_len))[0]).abs().max() > ATOL, \
        "a rotated cache read in time order should differ: the test would not see a wrong order"


def _buffers_with(p, *inputs):
    bufs = FastStepBuffers(p, max_batch=inputs[0].shape[0])
    for dst, src in zip(bufs.inputs(inputs[0].shape[0]), inputs):
        dst.copy_(src)
    return bufs.step_args(inputs[0].shape[0])


def test_graph_engine_gathers_the_ring_straight_into_its_buffer(engines, audios, eager_alone):
    """With the fast-cudagraph engine (static buffers; no capture on CPU) the slot pool gathers
    the attention cache straight into the engine's buffer in ring order: mixed batches, reused
    slots, still the tokens of streams alone and encoder outputs within 1e-4."""
    eager, _ = engines
    enc = eager.model.nemo_model.encoder
    graph_eng = FastCudaGraphEncoder(enc, max_batch=8, use_graphs=False, buckets=(2, 4))
    engine = StreamingEngine(eager.model, graph_eng, eager.geometry.lookahead_ms, capacity=16, max_batch=8,
                             device=torch.device("cpu"), dtype=torch.float32)
    assert engine.ring_cache and engine.gather_into_encoder
    for round_ in range(2):  # the second round on slots whose rings hold the first round's frames
        mixed = run_streams(engine, audios, seed=7 + round_, start_step={sid: i % 3 for i, sid in enumerate(audios)})
        for sid, ref in eager_alone.items():
            assert mixed[sid].tokens == ref.tokens, (round_, sid)
            for a, b in zip(mixed[sid].encoded, ref.encoded):
                _assert_close(a, b, sid)
    if engine.geometry.encoder_frames < 70:  # heads advance unless a step shifts the whole window
        assert int(engine.pool.heads["cache_channel"].max()) > 0


@pytest.mark.parametrize("b_from", ["device_done", "queued"])
def test_two_steps_interleaved_in_stages_equal_the_steps_one_after_the_other(engines, audios, b_from):
    """StreamingEngine.start_step: step B's device work queued behind step A's (the engine
    worker's overlap), on the graph engine's static buffers, which B's encoder overwrites.
    b_from="device_done": once A's decode and commit are queued, before A's host part (one
    stream). b_from="queued": as soon as A's encoder is queued, before A's decode (a GPU with a
    decode stream, StreamingEngine.next_at): A's decode and commit must read their own copies
    (SlotPool.stage, the decoder's projection), not the buffers B has overwritten. Either way
    both give what they give one after the other."""
    from engines.api import DEVICE_DONE, QUEUED, ChunkWork, StepPlan

    eager, _ = engines
    enc = eager.model.nemo_model.encoder

    class StaticFrames(FastCudaGraphEncoder):
        """Uncaptured, its caches are already per-bucket workspaces; its encoder frames come
        back in one buffer per shape too, as a captured graph's output does."""

        frames: dict = {}

        def _run(self, *args, **kwargs):
            encoded, *rest = super()._run(*args, **kwargs)
            out = self.frames.setdefault(tuple(encoded.shape), torch.empty_like(encoded))
            out.copy_(encoded)
            return (out, *rest)

    def build():
        from engines.features import FeatureGraphs
        graph_eng = StaticFrames(enc, max_batch=8, use_graphs=False, buckets=(2, 4))
        graph_eng.frames = {}
        engine = StreamingEngine(eager.model, graph_eng, eager.geometry.lookahead_ms, capacity=16, max_batch=8,
                                 device=torch.device("cpu"), dtype=torch.float32)
        # the features' per-bucket output buffers too, as on a GPU
        engine.featurizer.graphs = FeatureGraphs(engine.featurizer, graph_eng.buckets, use_graphs=False)
        return engine

    g = eager.geometry
    clips = [speechlike_audio(1.6 + 0.2 * i, seed=70 + i) for i in range(6)]
    n = min(len(c) for c in clips)
    steps = g.total_chunks(n) - 1

    def plans(engine, slots, k):
        start, end = g.chunk_span(k, n, False)
        return [StepPlan(tuple(ChunkWork(f"s{i}", slots[i], clips[i][start:end], k == 0, False) for i in rows))
                for rows in (range(0, 3), range(3, 6))]

    def rows(result):
        return [(u.stream_id, u.tokens, u.text_delta) for u in result.updates]

    one, two = build(), build()
    slots_one = [one.acquire_slot() for _ in clips]
    slots_two = [two.acquire_slot() for _ in clips]
    want, got = [], []
    for k in range(steps):
        a, b = plans(one, slots_one, k)
        want += [rows(one.step(a)), rows(one.step(b))]
        a, b = plans(two, slots_two, k)
        run_a = two.start_step(a)
        assert run_a.advance() and run_a.stage == QUEUED
        if b_from == "device_done":
            assert run_a.advance() and run_a.stage == DEVICE_DONE
        run_b = two.start_step(two.prepare(b))
        assert run_b.advance() and run_b.stage == QUEUED
        if b_from == "queued":
            assert run_a.advance() and run_a.stage == DEVICE_DONE  # A's decode and commit, after B's encoder
        assert not run_a.advance()  # A's host part, while B's work is queued
        while run_b.advance():
            pass
        got += [rows(run_a.result), rows(run_b.result)]
        assert run_b.result.timings.prepared_ahead and not run_a.result.timings.prepared_ahead
    assert got == want
    assert any(t for r in want for _, t, _ in r), "nothing transcribed: the comparison is vacuous"
    for engine, slots in ((one, slots_one), (two, slots_two)):
        for slot in slots:
            engine.release_slot(slot)
        assert engine.slots_in_use() == 0


def test_an_empty_step_returns_an_empty_result_through_its_stages(engines):
    from engines.api import StepPlan

    _, fast = engines
    assert fast.step(StepPlan(())).updates == ()
    run = fast.start_step(StepPlan(()))
    assert not run.advance() and not run.advance()  # finished, and stays so
    assert run.result is not None and run.result.updates == ()


def test_feature_graphs_path_gives_the_streams_their_own_tokens(engines, audios, eager_alone):
    """engines/features.py FeatureGraphs on CPU (its static buffers and per-bucket outputs, no
    capture), beside the graph engine's buffers: mixed batches of 1..8 rows in buckets 2, 4, 8,
    reused slots, and two steps interleaved as the worker's overlap runs them, still each
    stream's tokens alone and encoder outputs within 1e-4."""
    from engines.features import FeatureGraphs

    eager, _ = engines
    enc = eager.model.nemo_model.encoder
    graph_eng = FastCudaGraphEncoder(enc, max_batch=8, use_graphs=False, buckets=(2, 4))
    engine = StreamingEngine(eager.model, graph_eng, eager.geometry.lookahead_ms, capacity=16, max_batch=8,
                             device=torch.device("cpu"), dtype=torch.float32)
    assert engine.featurizer.graphs is None  # captured only on a GPU
    engine.featurizer.graphs = FeatureGraphs(engine.featurizer, graph_eng.buckets, use_graphs=False)
    for round_ in range(2):
        mixed = run_streams(engine, audios, seed=11 + round_, start_step={sid: i % 3 for i, sid in enumerate(audios)})
        for sid, ref in eager_alone.items():
            assert mixed[sid].tokens == ref.tokens, (round_, sid)
            for a, b in zip(mixed[sid].encoded, ref.encoded):
                _assert_close(a, b, sid)
    assert engine.featurizer.graphs.runs > 0
