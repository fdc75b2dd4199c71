"""Engine core on CPU with builtin:tiny (fp32): exactness of batching, NeMo parity, the slot
pool, bad input, and the TensorRT wrapper's dispatch (the seed's bug)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from engines.api import STEP_PHASES, BadChunkError, ChunkWork, PoolExhaustedError, StepPlan
from engines.models import speechlike_audio
from tests.engine_helpers import length_nemo_fully_consumes, nemo_reference_tokens, run_alone, run_streams


def _audio(seconds: float, seed: int) -> np.ndarray:
    return speechlike_audio(seconds, seed=seed)


@pytest.fixture(scope="module")
def stream_audio():
    # different lengths, none a multiple of the chunk, one shorter than a single chunk
    lengths = [0.11, 0.9, 1.37, 2.05, 2.6, 3.3]
    return {f"s{i}": _audio(sec, seed=100 + i) for i, sec in enumerate(lengths)}


@pytest.fixture(scope="module")
def alone_runs(tiny_engine, stream_audio):
    return {sid: run_alone(tiny_engine, a, sid) for sid, a in stream_audio.items()}


def test_streams_emit_tokens(alone_runs):
    # Random weights must still transcribe something, or every equality below is vacuous.
    long_runs = [r for sid, r in alone_runs.items() if sid != "s0"]
    assert all(len(r.tokens) > 0 for r in long_runs)
    assert len({tuple(r.tokens) for r in long_runs}) == len(long_runs), "different audio, same tokens"
    assert all(r.final for r in alone_runs.values())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_mixed_batches_equal_streams_alone(tiny_engine, stream_audio, alone_runs, seed):
    starts = {sid: (i * seed) % 5 for i, sid in enumerate(stream_audio)}
    mixed = run_streams(tiny_engine, stream_audio, seed=seed, start_step=starts)
    for sid, alone in alone_runs.items():
        got = mixed[sid]
        assert got.tokens == alone.tokens, sid
        assert got.text == alone.text, sid
        assert len(got.encoded) == len(alone.encoded)
        for a, b in zip(got.encoded, alone.encoded):
            assert a.shape == b.shape
            assert torch.allclose(a, b, atol=1e-4, rtol=0), (sid, (a - b).abs().max())


def test_text_matches_tokenizer(tiny_engine, alone_runs):
    tok = tiny_engine.model.nemo_model.tokenizer
    for r in alone_runs.values():
        assert r.text == tok.ids_to_text(r.tokens)


def test_vocabulary_has_devanagari_and_latin(tiny_engine):
    pieces = tiny_engine.model.pieces
    assert len(pieces) == 1024
    assert any(any("\u0900" <= ch <= "\u097f" for ch in p) for p in pieces)
    assert any(any("a" <= ch <= "z" for ch in p) for p in pieces)


@pytest.mark.parametrize("seconds,seed", [(1.6, 7), (3.1, 8)])
def test_transcript_equals_nemo_reference(tiny_engine, seconds, seed):
    """Aligned framing: NeMo's loop over the same audio after the engine's lead-in of silence."""
    g = tiny_engine.geometry
    assert g.lead_in == g.right_context > 0 and g.samples_needed(0) == g.chunk_samples
    n = length_nemo_fully_consumes(g, seconds)
    audio = _audio(n / 16000, seed)[:n]
    ours = run_alone(tiny_engine, audio)
    ref = nemo_reference_tokens(tiny_engine.model.nemo_model, np.concatenate([np.zeros(g.lead_in, np.float32), audio]))
    assert len(ref) > 0
    assert ours.tokens == ref


@pytest.fixture(scope="module")
def nemo_framed_engine(tiny_engine):
    """The same model with NeMo's framing of the raw audio (no lead-in)."""
    from engines.encoders import EagerEncoder
    from engines.streaming_engine import StreamingEngine

    return StreamingEngine(tiny_engine.model, EagerEncoder(tiny_engine.model.nemo_model.encoder), 160,
                           capacity=4, max_batch=4, device=torch.device("cpu"), dtype=torch.float32,
                           align_chunks=False)


def test_nemo_framing_equals_nemo_reference_on_raw_audio(nemo_framed_engine):
    g = nemo_framed_engine.geometry
    assert g.lead_in == 0 and g.samples_needed(0) == g.chunk_samples + g.right_context
    n = length_nemo_fully_consumes(g, 2.2)
    audio = _audio(n / 16000, 12)[:n]
    ours = run_alone(nemo_framed_engine, audio)
    ref = nemo_reference_tokens(nemo_framed_engine.model.nemo_model, audio)
    assert len(ref) > 0 and ours.tokens == ref


def test_features_equal_nemo_preprocessor(tiny_engine):
    from engines.features import StreamingFeaturizer

    g = tiny_engine.geometry
    model = tiny_engine.model.nemo_model
    audio = _audio(1.93, seed=11)
    framed = np.concatenate([np.zeros(g.lead_in, np.float32), audio])
    feat = StreamingFeaturizer(model.preprocessor.featurizer, g, capacity=2, device=torch.device("cpu"))
    frames, k = [], 0
    while (span := g.chunk_span(k, len(audio), True)) is not None:
        a, b = span
        new = audio[a:b]
        windows, end, starts = feat.assemble([1], [k], [new], [b == len(audio)], [k == 0])
        out = feat.compute(windows, end, starts, [k])
        feat.commit([1], [new], windows, starts, [k == 0])
        frames.append(out.new_frames[0, :, : int(out.valid_frames_host[0])])
        k += 1
    ours = torch.cat(frames, dim=-1)
    with torch.inference_mode():
        ref, ref_len = model.preprocessor(input_signal=torch.from_numpy(framed)[None],
                                          length=torch.tensor([len(framed)]))
    assert ours.shape[-1] == int(ref_len) == g.n_frames(len(audio))
    assert torch.allclose(ours, ref[0, :, : int(ref_len)], atol=2e-4), (ours - ref[0]).abs().max()


def test_windows_assembled_into_a_given_buffer_equal_new_ones(tiny_engine):
    """StreamingEngine.prepare assembles a step's windows straight into the host buffer the copy
    to the device reads (pinned on a GPU: engines.device_io.host_buffer), which holds whatever
    an earlier step left there: in a batch of a steady row, a stream's first chunk and a short
    last chunk, every sample the windows do not fill (silence before a stream, past its end) is
    zero there too."""
    from engines.features import StreamingFeaturizer

    g = tiny_engine.geometry
    feat = StreamingFeaturizer(tiny_engine.model.nemo_model.preprocessor.featurizer, g, capacity=3,
                               device=torch.device("cpu"))
    a = _audio(3.0, seed=21)
    for k in range(2):  # stream A (slot 0) two chunks in: its third is steady
        lo, hi = g.chunk_span(k, len(a), False)
        w, end, starts = feat.assemble([0], [k], [a[lo:hi]], [False], [k == 0])
        feat.commit([0], [a[lo:hi]], w, starts, [k == 0])
    lo, hi = g.chunk_span(2, len(a), False)
    b = _audio(2.0, seed=22)
    b_lo, b_hi = g.chunk_span(0, len(b), False)
    short = _audio(0.05, seed=23)  # a whole stream shorter than a chunk: first and last at once
    rows = ([0, 1, 2], [2, 0, 0], [a[lo:hi], b[b_lo:b_hi], short], [False, False, True], [False, True, True])
    want, want_end, want_starts = feat.assemble(*rows)
    buffer = np.full((3, feat.window_len), np.nan, dtype=np.float32)
    got, end, starts = feat.assemble(*rows, out=buffer)
    assert got is buffer and np.array_equal(got, want) and np.isfinite(got).all()
    assert np.array_equal(end, want_end) and np.array_equal(starts, want_starts)
    assert np.count_nonzero(got[2]) and not np.count_nonzero(got[2, -g.chunk_samples // 2:])  # zero past its end
    with pytest.raises(ValueError, match="do not fit"):
        feat.assemble(*rows, out=buffer[:2])


def test_reused_slot_equals_fresh_slot(tiny_engine, stream_audio, alone_runs):
    # dirty a slot with one stream, release it mid-stream, reuse it for another
    slot = tiny_engine.acquire_slot()
    audio = stream_audio["s4"]
    g = tiny_engine.geometry
    for k in range(3):
        a, b = g.chunk_span(k, len(audio), True)
        tiny_engine.step(StepPlan((ChunkWork("dirty", slot, audio[a:b], k == 0, False),)))
    tiny_engine.release_slot(slot)
    again = tiny_engine.acquire_slot()
    assert again == slot  # the free list hands back the slot just released
    try:
        reused = run_streams(tiny_engine, {"s3": stream_audio["s3"]}, slots={"s3": again}, seed=None)["s3"]
    finally:
        tiny_engine.release_slot(again)
    assert reused.tokens == alone_runs["s3"].tokens


def test_pool_capacity_and_churn(tiny_engine):
    cap = tiny_engine.capacity
    for _ in range(5):
        slots = [tiny_engine.acquire_slot() for _ in range(cap)]
        assert len(set(slots)) == cap
        with pytest.raises(PoolExhaustedError, match="slots are in use"):
            tiny_engine.acquire_slot()
        for s in slots:
            tiny_engine.release_slot(s)
    assert tiny_engine.slots_in_use() == 0
    with pytest.raises(KeyError):
        tiny_engine.release_slot(0)


def test_pool_memory_is_preallocated(tiny_engine):
    pool = tiny_engine.pool
    before = {k: v.data_ptr() for k, v in pool.tensors.items()}
    run_alone(tiny_engine, _audio(0.7, 3))
    assert {k: v.data_ptr() for k, v in pool.tensors.items()} == before
    assert pool.bytes_per_slot() > 0


@pytest.mark.parametrize("bad,reason", [
    (lambda s: ChunkWork("bad", s, np.zeros(0, np.float32), False, False), "empty chunk"),
    (lambda s: ChunkWork("bad", s, np.zeros(2560, np.float64), False, False), "float32"),
    (lambda s: ChunkWork("bad", s, np.full(2560, np.nan, np.float32), False, False), "NaN"),
    (lambda s: ChunkWork("bad", -1, np.zeros(2560, np.float32), False, False), "not allocated"),
    (lambda s: ChunkWork("bad", s, np.zeros(100, np.float32), False, False), "needed while audio continues"),
])
def test_bad_input_is_refused_and_harms_no_one(tiny_engine, stream_audio, alone_runs, bad, reason):
    g = tiny_engine.geometry
    good_audio = stream_audio["s2"]
    good = tiny_engine.acquire_slot()
    victim = tiny_engine.acquire_slot()
    try:
        runs_tokens, k = [], 0
        a, b = g.chunk_span(0, len(good_audio), True)
        r = tiny_engine.step(StepPlan((ChunkWork("good", good, good_audio[a:b], True, False),)))
        runs_tokens += [t.token_id for t in r.updates[0].tokens]
        # the victim slot has state from its own first chunk
        tiny_engine.step(StepPlan((ChunkWork("victim", victim, np.zeros(g.samples_needed(0), np.float32), True, False),)))
        bad_chunk = bad(victim)
        a, b = g.chunk_span(1, len(good_audio), True)
        with pytest.raises(BadChunkError, match=reason) as info:
            tiny_engine.step(StepPlan((ChunkWork("good", good, good_audio[a:b], False, False), bad_chunk)))
        if reason != "needed while audio continues":
            assert info.value.stream_ids == ("bad",)
        # the good stream continues as if the bad step never happened
        k = 1
        while True:
            a, b = g.chunk_span(k, len(good_audio), True)
            r = tiny_engine.step(StepPlan((ChunkWork("good", good, good_audio[a:b], False, b == len(good_audio)),)))
            runs_tokens += [t.token_id for t in r.updates[0].tokens]
            k += 1
            if r.updates[0].is_final:
                break
        assert runs_tokens == alone_runs["s2"].tokens
    finally:
        tiny_engine.release_slot(good)
        tiny_engine.release_slot(victim)


def test_duplicate_stream_in_one_step_is_refused(tiny_engine):
    s = tiny_engine.acquire_slot()
    try:
        n = tiny_engine.geometry.samples_needed(0)
        c = ChunkWork("dup", s, np.zeros(n, np.float32), True, False)
        with pytest.raises(BadChunkError, match="twice"):
            tiny_engine.step(StepPlan((c, c)))
    finally:
        tiny_engine.release_slot(s)


def test_execution_counter_moves_per_step(tiny_engine):
    before = tiny_engine.executions()["eager"]
    assert tiny_engine.warmup() == "eager"
    run_alone(tiny_engine, _audio(0.5, 4))
    after = tiny_engine.executions()["eager"]
    assert after >= before + 2
    assert tiny_engine.slots_in_use() == 0


def test_every_nth_step_is_timed_phase_by_phase(tiny_engine, monkeypatch):
    """profile_every: one step in N synchronizes at each phase and says so (StepTimings.synced)."""
    monkeypatch.setattr(tiny_engine, "profile_every", 3)
    audio = _audio(1.5, 5)
    g = tiny_engine.geometry
    slot = tiny_engine.acquire_slot()
    timings = []
    try:
        for k in range(g.total_chunks(len(audio))):
            start, end = g.chunk_span(k, len(audio), True)
            plan = StepPlan((ChunkWork("p", slot, audio[start:end], k == 0, end == len(audio)),))
            timings.append(tiny_engine.step(plan).timings)
    finally:
        tiny_engine.release_slot(slot)
    synced = [i for i, t in enumerate(timings) if t.synced]
    assert len(timings) >= 6 and synced and all(b - a == 3 for a, b in zip(synced, synced[1:]))
    assert len(synced) in (len(timings) // 3, len(timings) // 3 + 1)
    for t in (timings[i] for i in synced):
        parts = t.features_ms + t.encoder_ms + t.decode_ms + t.commit_ms + t.results_ms
        assert t.encoder_ms > 0 and t.assemble_ms + t.gather_ms <= t.features_ms and parts <= t.total_ms + 1e-6
        # the phases one by one: each once, none negative, together the step's parts above
        phases = t.phases()
        assert tuple(phases) == STEP_PHASES and min(phases.values()) >= 0
        assert abs(sum(phases.values()) - parts) < 1e-6 and phases["features"] < t.features_ms


# -- the seed's bug: the TensorRT wrapper must run its engine, never the original forward ------

class _ExportedGraphSpy:
    """Stands in for the TensorRT execution: runs a private copy of the encoder through the
    exported-graph signature (batch-first caches) and counts its calls."""

    def __init__(self, encoder):
        self.copy = copy.deepcopy(encoder)
        self.calls = 0

    def __call__(self, audio_signal, length, cache_last_channel, cache_last_time, cache_last_channel_len):
        self.calls += 1
        with torch.inference_mode():
            return self.copy.forward_for_export(audio_signal, length, cache_last_channel, cache_last_time,
                                                cache_last_channel_len)


def _step_inputs(encoder, batch=2):
    cfg = encoder.streaming_cfg
    T = cfg.chunk_size[1] + cfg.pre_encode_cache_size[1]
    torch.manual_seed(0)
    x = torch.randn(batch, encoder._feat_in, T)
    lengths = torch.full((batch,), T, dtype=torch.long)
    cc, ct, ccl = encoder.get_initial_cache_state(batch_size=batch)
    return dict(processed_signal=x, processed_signal_length=lengths, cache_last_channel=cc,
                cache_last_time=ct, cache_last_channel_len=ccl)


@pytest.fixture
def counted_original_forward(tiny_engine, monkeypatch):
    encoder = tiny_engine.model.nemo_model.encoder
    calls = {"n": 0}
    original = encoder.forward

    def counting_forward(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(encoder, "forward", counting_forward)
    return encoder, calls


def test_trt_wrapper_runs_its_engine_not_the_original(tiny_engine, counted_original_forward):
    from engines.encoders import TRTEncoderWrapper

    encoder, original_calls = counted_original_forward
    spy = _ExportedGraphSpy(encoder)
    wrapper = TRTEncoderWrapper(encoder, spy)
    inputs = _step_inputs(encoder)
    with torch.inference_mode():
        got = wrapper.cache_aware_stream_step(**inputs, keep_all_outputs=False)
    assert spy.calls == 1
    assert original_calls["n"] == 0, "the original PyTorch encoder ran"
    # and the result is the real step's result
    with torch.inference_mode():
        ref = encoder.cache_aware_stream_step(**inputs, keep_all_outputs=False)
    for a, b in zip(got, ref):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    assert wrapper.streaming_cfg is encoder.streaming_cfg  # attributes still come through


def test_wrapper_without_the_method_would_bypass_the_engine(tiny_engine, counted_original_forward):
    """The seed's wrapper: only `forward` overridden, everything else through __getattr__."""
    encoder, original_calls = counted_original_forward
    spy = _ExportedGraphSpy(encoder)

    class SeedWrapper(torch.nn.Module):
        def __init__(self, original, runner):
            super().__init__()
            object.__setattr__(self, "_original", original)
            self.runner = runner

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(object.__getattribute__(self, "_original"), name)

        def forward(self, *args, **kwargs):
            return self.runner(*args, **kwargs)

    with torch.inference_mode():
        SeedWrapper(encoder, spy).cache_aware_stream_step(**_step_inputs(encoder))
    assert spy.calls == 0 and original_calls["n"] == 1


def test_engine_through_wrapper_counts_the_graph_and_matches_eager(tiny_engine, stream_audio):
    from engines.encoders import CountingRunner, WrappedGraphEncoder

    encoder = tiny_engine.model.nemo_model.encoder
    spy = _ExportedGraphSpy(encoder)

    class SpyRunner(CountingRunner):
        def execute(self, *args):
            return spy(*args)

    # The reference runs here, next to the wrapped run, not in a module fixture computed earlier:
    # a process-wide numeric setting that another test module changes in between (denormal
    # flushing is one) must not decide this comparison.
    reference = run_alone(tiny_engine, stream_audio["s3"])
    assert len(reference.tokens) > 0
    eager = tiny_engine.encoder_engine
    tiny_engine.encoder_engine = WrappedGraphEncoder(encoder, SpyRunner(), name="tensorrt-spy")
    try:
        run = run_alone(tiny_engine, stream_audio["s3"])
        assert tiny_engine.executions() == {"tensorrt-spy": run.chunks}
    finally:
        tiny_engine.encoder_engine = eager
    assert run.tokens == reference.tokens


def test_audio_seconds_reports_consumed_audio(tiny_engine):
    """A client knows its message is answered once audio_seconds reaches the message's end:
    with chunk-aligned framing, chunk k covers exactly (k+1) chunks of the stream's audio."""
    g = tiny_engine.geometry
    audio = _audio(1.05, seed=21)
    slot = tiny_engine.acquire_slot()
    try:
        seen = []
        for k in range(g.total_chunks(len(audio))):
            a, b = g.chunk_span(k, len(audio), True)
            last = k == g.total_chunks(len(audio)) - 1
            (u,) = tiny_engine.step(StepPlan((ChunkWork("t", slot, audio[a:b], k == 0, last),))).updates
            seen.append(u.audio_seconds)
    finally:
        tiny_engine.release_slot(slot)
    full = [(k + 1) * g.chunk_samples / g.sample_rate for k in range(len(seen) - 1)]
    assert seen[:-1] == pytest.approx(full)
    assert seen[-1] == pytest.approx(len(audio) / g.sample_rate)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the decode loop's CUDA graph)")
def test_decode_graph_equals_eager_loop_on_gpu():
    from engines.config import EngineConfig
    from engines.factory import build_engine

    engine = build_engine(EngineConfig(model="builtin:tiny", engine="eager", device="cuda", dtype="float32",
                                       lookahead_ms=560, max_streams=16, max_batch=16))
    audios = {f"g{i}": _audio(0.5 + 0.37 * i, seed=300 + i) for i in range(6)}
    graphed = run_streams(engine, audios, seed=5)
    assert engine.decoder.use_graphs and engine.decoder._graphs, "the decode loop was not captured"
    engine.decoder.use_graphs = False
    eager = run_streams(engine, audios, seed=5)
    for sid in audios:
        assert graphed[sid].tokens == eager[sid].tokens and len(eager[sid].tokens) > 0


def test_warm_batch_buckets_runs_every_bucket_and_frees_its_slots(tiny_engine):
    """The GPU warm-up steps every batch bucket (so no CUDA graph is captured while serving);
    on the CPU it is callable directly: every bucket size reaches the encoder, no slot leaks."""
    seen: list[int] = []
    inner = tiny_engine.encoder_engine.step

    def recording(x, *args):
        seen.append(x.shape[0])
        return inner(x, *args)

    tiny_engine.encoder_engine.step = recording
    try:
        steps = tiny_engine.warm_batch_buckets()
    finally:
        tiny_engine.encoder_engine.step = inner
    sizes = sorted(set(seen))
    expected = sorted({min(2 ** i, tiny_engine.max_batch) for i in range(12) if 2 ** (i - 1) < tiny_engine.max_batch})
    assert sizes == expected and steps == len(seen) and steps >= 3 * len(expected)
    assert tiny_engine.slots_in_use() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graph capture happens only there)")
def test_no_graph_capture_while_serving_after_warmup():
    from engines.config import EngineConfig
    from engines.factory import build_engine
    engine = build_engine(EngineConfig(model="builtin:tiny", engine="eager", device="cuda", dtype="float16",
                                       max_streams=16, max_batch=8))
    engine.warmup()
    captured = len(engine.decoder._graphs)
    audio = {f"s{i}": _audio(1.0 + 0.3 * i, seed=200 + i) for i in range(8)}
    run_streams(engine, audio, seed=5)
    assert len(engine.decoder._graphs) == captured


def test_result_columns_lay_the_decoded_labels_out_per_row_without_the_end_of_utterance_token():
    """StreamingEngine._result_columns over the decode's label columns: each row's tokens in
    order at its offsets, frames counted from the stream's start, the end-of-utterance token
    dropped (a signal for the endpointer, not text), a row with no labels (or only that token)
    empty, each row's text its pieces with word-start markers as spaces, and a stream's text
    not starting with a space."""
    from engines.config import EngineConfig
    from engines.factory import build_engine
    from engines.rnnt_decoder import DecodeOutput

    engine = build_engine(EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32",
                                       max_streams=8, max_batch=8))
    pieces = engine.model.pieces
    word = [i for i, p in enumerate(pieces) if p.startswith("\u2581") and len(p) > 1][:3]
    inner = [i for i, p in enumerate(pieces) if not p.startswith("\u2581") and not p.startswith("<")][:2]
    eou = inner[1]
    engine.eou_id = eou  # as for a model with an end-of-utterance token
    g = engine.geometry
    slots = [engine.acquire_slot() for _ in range(4)]
    audio = np.zeros(g.samples_needed(3), np.float32)
    try:
        def plan(k):
            a, b = g.chunk_span(k, len(audio), False)
            return StepPlan(tuple(ChunkWork(f"s{i}", s, audio[a:b], k == 0, False) for i, s in enumerate(slots)))

        def columns(k, rows):
            counts = np.array([len(r) for r in rows], dtype=np.int64)
            flat = [x for r in rows for x in r]
            decoded = DecodeOutput(label_ids=np.array([x for x, _ in flat], dtype=np.int64),
                                   label_frames=np.array([f for _, f in flat], dtype=np.int64),
                                   label_counts=counts, state={})
            return engine._result_columns(plan(k), np.full(4, k, dtype=np.int64), np.full(4, -1, dtype=np.int64),
                                          np.full(4, g.encoder_frames, dtype=np.int64), decoded)

        # first chunk: row 0 two word pieces, row 1 nothing, row 2 only the end-of-utterance
        # token, row 3 a word piece, the end-of-utterance token and an inner piece
        c = columns(0, [[(word[0], 0), (word[1], 1)], [], [(eou, 1)], [(word[2], 0), (eou, 0), (inner[0], 1)]])
        assert c.token_offsets.tolist() == [0, 2, 2, 2, 4]
        assert c.token_ids.tolist() == [word[0], word[1], word[2], inner[0]]
        assert c.token_pieces == [pieces[i] for i in c.token_ids.tolist()]
        assert c.token_frames.tolist() == [0, 1, 0, 1]
        text = lambda ids: "".join(pieces[i] for i in ids).replace("\u2581", " ")  # noqa: E731
        assert c.text_delta == [text([word[0], word[1]]).lstrip(), "", "", text([word[2], inner[0]]).lstrip()]
        # the next chunk: frames from the stream's start, text with its word-start space kept
        # where the stream has text, stripped where it has none yet (row 1)
        c = columns(1, [[(word[2], 1)], [(word[0], 0)], [], []])
        f = g.encoder_frames
        assert c.token_frames.tolist() == [f + 1, f] and c.token_offsets.tolist() == [0, 1, 2, 2, 2]
        assert c.text_delta == [text([word[2]]), text([word[0]]).lstrip(), "", ""]
    finally:
        for s in slots:
            engine.release_slot(s)


def test_a_decode_stream_is_made_only_on_a_gpu():
    """EngineConfig.decode_stream asks for the decode's CUDA stream; on the CPU there is none,
    so the next step waits for the decode (next_at DEVICE_DONE) and steps run as without it."""
    from engines.api import DEVICE_DONE
    from engines.config import EngineConfig
    from engines.factory import build_engine

    engine = build_engine(EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32",
                                       max_streams=2, max_batch=2, decode_stream="on"))
    assert engine.decode_stream is None and engine.next_at == DEVICE_DONE
    audio = _audio(1.2, seed=900)
    got = run_streams(engine, {"a": audio}, seed=1)
    assert got["a"].tokens, "nothing decoded"
