"""fast-cudagraph in float16, the default engine on a GPU, against NeMo's eager module in float32
(TF32 off), on speech: token agreement of at least 99.9% and the share of identical whole
transcripts, over at least 200 streams of the demo model; on the Nemotron 0.6B shape (random
weights) fast-cudagraph fp32 against eager fp32 at 99.9%, and fp16 within what float16 alone
costs there (see that test); CUDA
graphs captured once and never again while serving; the RNNT decode loop's graph against the
same loop run eagerly."""

from __future__ import annotations

import pytest
import torch

from tests.engine_helpers import run_streams
from tests.gpu.agreement import agreement, build_on
from tests.gpu.conftest import record
from tests.gpu.speech import clips

MIN_STREAMS = 200
MIN_TOKEN_AGREEMENT = 0.999


@pytest.fixture(scope="module")
def speech():
    audios = {f"{i:03d}-{name}": samples for i, (name, samples, _) in enumerate(clips(MIN_STREAMS))}
    assert len(audios) >= MIN_STREAMS
    return audios


@pytest.fixture(scope="module")
def exact_fp32():
    """The reference runs in true float32: no TF32 in matmuls or convolutions."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _compare(model_spec: str, speech, seed: int, dtype: str = "float16"):
    reference = build_on(model_spec, "eager", "float32")
    fast = build_on(model_spec, "fast-cudagraph", dtype)
    assert fast.startup_report.engine == "fast-cudagraph" and fast.startup_report.self_check.passed
    fast.warmup()
    encoder_captures = fast.encoder_engine.captures
    decode_graphs = set(fast.decoder._graphs)
    ref = run_streams(reference, speech, seed=None)
    got = run_streams(fast, speech, seed=seed)  # random mixed batches of 1..64 streams
    # Serving 200+ streams in batches of every size captured nothing new.
    assert fast.encoder_engine.captures == encoder_captures == len(fast.encoder_engine.buckets)
    assert set(fast.decoder._graphs) == decode_graphs, "a decode graph was captured while serving"
    assert fast.executions()["fast-cudagraph"] > 0
    a = agreement(ref, got)
    return a, got, ref


def test_demo_model_fast_cudagraph_fp16_agrees_with_eager_fp32(speech, exact_fp32):
    a, _, _ = _compare("builtin:demo", speech, seed=3)
    record("demo_fast_cudagraph_fp16_vs_eager_fp32", a.as_dict())
    assert a.streams >= MIN_STREAMS and a.empty_reference == 0 and a.reference_tokens > 5 * a.streams
    assert a.token_agreement >= MIN_TOKEN_AGREEMENT, a.as_dict()
    assert a.transcript_match >= 0.98, a.as_dict()


# The most the fast step in float16 may lose to eager fp32 beyond what NeMo's own eager module
# loses in float16 on the same random weights (token agreement, absolute).
FP16_EXTRA_LOSS = 0.015


def test_nemotron_shape_fast_cudagraph_agrees_with_eager(speech, exact_fp32):
    """Random weights (joint calibrated so labels follow the audio): the same arithmetic as the
    real 0.6B model, with logit margins no training has widened. On the GPU host (run 3,
    tests/gpu/RESULTS.md) NeMo's own eager module in float16 agreed with itself in float32 on
    only 92% of tokens: an argmax between near-equal random logits flips under any float16
    rounding, and one flip changes the decoder's later labels. So 99.9% cannot be asked of
    float16 here, by any engine. What is asked instead:
    - the fast step with its graphs, in float32, gives eager fp32's tokens (>= 99.9%): its
      arithmetic and its captured graphs are right on the full shape;
    - in float16 (the default) it loses no more than float16 itself does: its agreement with
      eager fp32 is within FP16_EXTRA_LOSS of NeMo's eager fp16 module's."""
    a32, _, ref = _compare("builtin:nemotron-0.6b", speech, seed=4, dtype="float32")
    a16, got16, _ = _compare("builtin:nemotron-0.6b", speech, seed=4, dtype="float16")
    eager16 = build_on("builtin:nemotron-0.6b", "eager", "float16")
    e16 = run_streams(eager16, speech, seed=None)
    b = agreement(ref, e16)
    record("nemotron_0.6b_fast_cudagraph_vs_eager", {
        "fast_cudagraph_fp32_vs_eager_fp32": a32.as_dict(), "fast_cudagraph_fp16_vs_eager_fp32": a16.as_dict(),
        "eager_fp16_vs_eager_fp32": b.as_dict(), "fast_cudagraph_fp16_vs_eager_fp16": agreement(e16, got16).as_dict()})
    assert a32.streams >= MIN_STREAMS and a32.reference_tokens > 5 * a32.streams and a32.empty_reference == 0
    assert a32.token_agreement >= MIN_TOKEN_AGREEMENT, a32.as_dict()
    assert a16.token_agreement >= b.token_agreement - FP16_EXTRA_LOSS, (a16.as_dict(), b.as_dict())


def test_decode_graph_equals_the_eager_decode_loop(speech):
    """The RNNT decode loop captured per batch bucket gives the tokens of the same loop run
    eagerly, over every speech stream in mixed batches (demo model, fp16, fast-cudagraph)."""
    engine = build_on("builtin:demo", "fast-cudagraph", "float16")
    engine.warmup()
    graphed = run_streams(engine, speech, seed=5)
    assert engine.decoder.use_graphs and engine.decoder._graphs, "the decode loop was not captured"
    engine.decoder.use_graphs = False
    try:
        eager = run_streams(engine, speech, seed=5)
    finally:
        engine.decoder.use_graphs = True
    assert sum(len(r.tokens) for r in eager.values()) > 5 * len(speech)
    differ = [s for s in speech if graphed[s].tokens != eager[s].tokens]
    record("decode_graph_vs_eager_loop", {"streams": len(speech), "differ": len(differ)})
    assert differ == []


def test_a_step_queues_its_work_up_to_the_decode_without_waiting_for_the_device():
    """Everything a step does before its decode loop (validation, the windows, host arrays to the
    device, features, the slot pool's gather straight into the encoder's buffer in ring order, the
    encoder's graph) is queued without a stream synchronization (engines/device_io.py), so the
    host can prepare a step while the device still runs the previous one. With torch's sync debug
    mode at "error" any synchronizing call raises; it is switched off where the decode loop starts
    (its termination test and the labels' copy wait for the device by design)."""
    import numpy as np

    from engines.api import ChunkWork, StepPlan

    engine = build_on("builtin:demo", "fast-cudagraph", "float16")
    engine.warmup()
    assert engine.ring_cache and engine.gather_into_encoder
    g = engine.geometry
    audio = np.random.default_rng(0).standard_normal(g.samples_needed(3)).astype(np.float32) * 0.1
    slots = [engine.acquire_slot() for _ in range(8)]
    inner = engine.decoder.decode_projected
    reached = []

    def decode(*args, **kwargs):
        torch.cuda.set_sync_debug_mode(0)
        reached.append(True)
        return inner(*args, **kwargs)

    try:
        for k in range(3):
            start, end = g.chunk_span(k, audio.size, False)
            plan = StepPlan(tuple(ChunkWork(f"s{i}", s, audio[start:end], k == 0, False) for i, s in enumerate(slots)))
            if k == 2:  # steady rows, after a first chunk (fresh rows) and a middle one
                engine.decoder.decode_projected = decode
                torch.cuda.set_sync_debug_mode("error")
            engine.step(plan)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        engine.decoder.decode_projected = inner
        for s in slots:
            engine.release_slot(s)
    assert reached, "the step never reached its decode loop"


def _device_ms(fn, reps: int = 10) -> float:
    """Device time of one call of `fn`, ms: one call to warm up, then `reps` between CUDA events."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def test_the_slot_rows_block_copy_equals_index_select_and_is_faster():
    """engines/row_gather.py on the device, at the 0.6B model's attention-cache shape (24 layers,
    rows of 70 frames x 2048, float16) into the encoder buffer's strided layout: the same bytes
    as index_select, and its time beside index_select's (recorded, not asserted: a figure)."""
    from engines import row_gather

    assert row_gather.triton is not None, "Triton is missing from this PyTorch build"
    L, S, C, D, n, T = 24, 600, 70, 2048, 256, 2
    src = torch.randn(L, S, C, D, dtype=torch.float16, device="cuda")
    buffer = torch.zeros(L, 320, C + T, D, dtype=torch.float16, device="cuda")
    out = buffer[:, :n, :C]
    index = torch.randperm(S, device="cuda")[:n]
    assert row_gather.gather_rows(src, index, out)
    assert torch.equal(out, src.index_select(1, index))
    assert torch.count_nonzero(buffer[:, :n, C:]) == 0 and torch.count_nonzero(buffer[:, n:]) == 0

    block = _device_ms(lambda: row_gather.gather_rows(src, index, out))
    select = _device_ms(lambda: torch.index_select(src, 1, index, out=out))
    gbytes = 2 * out.numel() * out.element_size() / 1e9
    record("row_gather_256_rows", {"block_copy_ms": round(block, 3), "index_select_ms": round(select, 3),
                                   "block_copy_GBps": round(gbytes / block * 1e3, 1),
                                   "index_select_GBps": round(gbytes / select * 1e3, 1)})


def test_the_commits_block_copy_equals_index_copy_and_is_timed_beside_it():
    """engines/row_gather.scatter_rows on the device, as the slot pool's commit uses it at the 0.6B
    model's shapes (512 rows of 600 slots): the convolution cache written whole ([24, S, 1024, 8])
    and the attention ring's two new frames a row ([24, S * 70, 2048]), the same bytes as
    index_copy_, and the times of both (recorded, not asserted: a figure)."""
    from engines import row_gather

    assert row_gather.triton is not None, "Triton is missing from this PyTorch build"
    L, S, n = 24, 600, 512
    slots = torch.randperm(S, device="cuda")[:n]
    cases = {
        "conv_cache": (torch.randn(L, S, 1024, 8, dtype=torch.float16, device="cuda"),
                       torch.randn(L, n, 1024, 8, dtype=torch.float16, device="cuda"), slots),
        "ring_frames": (torch.randn(L, S * 70, 2048, dtype=torch.float16, device="cuda"),
                        torch.randn(L, 2 * n, 2048, dtype=torch.float16, device="cuda"),
                        (slots[:, None] * 70 + torch.tensor([5, 6], device="cuda")[None, :]).reshape(-1)),
    }
    figures = {}
    for name, (pool, rows, index) in cases.items():
        want = pool.clone()
        want.index_copy_(1, index, rows)
        assert row_gather.scatter_rows(rows, index, pool), name
        assert torch.equal(pool, want), name
        figures[name] = {"block_copy_ms": round(_device_ms(lambda: row_gather.scatter_rows(rows, index, pool)), 3),
                         "index_copy_ms": round(_device_ms(lambda: pool.index_copy_(1, index, rows)), 3)}
    record("commit_scatter_512_rows", figures)


def test_feature_graphs_are_captured_per_bucket_and_equal_the_eager_features():
    """engines/features.py FeatureGraphs on the device: one graph per encoder bucket, captured
    at start-up, and a batch's log-mel from its graph equals the eager computation's (float32
    on both sides), at batch sizes inside and between buckets, open and finished streams."""
    import numpy as np

    engine = build_on("builtin:demo", "fast-cudagraph", "float16")
    graphs = engine.featurizer.graphs
    assert graphs is not None and graphs.use_graphs
    assert graphs.captures == len(engine.encoder_engine.buckets)
    f = engine.featurizer
    rng = np.random.default_rng(3)
    C = engine.geometry.chunk_frames
    for n in (1, 3, 8, 37, graphs.max_batch):
        windows = (rng.standard_normal((n, f.window_len)) * 0.1).astype(np.float32)
        starts = rng.integers(-f.window_len, 10 * f.window_len, n).astype(np.int64)
        end = np.where(rng.random(n) < 0.3, starts + rng.integers(1, f.window_len, n), np.iinfo(np.int64).max)
        valid = np.where(end < np.iinfo(np.int64).max, rng.integers(0, C + 1, n), C).astype(np.int64)
        got, got_valid = graphs.run(windows, starts, end, valid)
        dev = f.device
        want = f.mel(torch.as_tensor(windows, device=dev), torch.as_tensor(starts, device=dev),
                     torch.as_tensor(end, device=dev), torch.as_tensor(valid, device=dev))
        assert torch.equal(got_valid.cpu(), torch.as_tensor(valid))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert graphs.captures == len(engine.encoder_engine.buckets)  # nothing captured while running


@pytest.mark.parametrize("engine_name", ["fast-cudagraph", "eager"])
def test_steps_begun_at_queued_beside_a_decode_on_its_stream_equal_the_steps_one_after_the_other_on_gpu(engine_name):
    """On a GPU the decode and commit run on a stream of their own, and the engine worker queues
    the next step's encoder as soon as a step's is queued (StreamingEngine.next_at): step B's
    encoder then runs while step A decodes, and A's later steps gather what A committed on the
    other stream. Every row's tokens equal those of the same steps taken one at a time on one
    stream."""
    import numpy as np

    from engines.api import QUEUED, ChunkWork, StepPlan
    from engines.config import EngineConfig
    from engines.factory import build_engine
    from engines.models import speechlike_audio

    engine = build_engine(EngineConfig(model="builtin:tiny", engine=engine_name, device="cuda", dtype="float32",
                                       lookahead_ms=160, max_streams=16, max_batch=8, decode_stream="on"))
    assert engine.encoder_engine.name == engine_name
    assert engine.decode_stream is not None and engine.next_at == QUEUED
    g = engine.geometry
    clips = [speechlike_audio(1.9 + 0.1 * i, seed=500 + i).astype(np.float32) for i in range(8)]
    n = min(len(c) for c in clips)

    def plans(slots, k):
        start, end = g.chunk_span(k, n, False)
        return [StepPlan(tuple(ChunkWork(f"s{i}", slots[i], clips[i][start:end], k == 0, False) for i in rows))
                for rows in (range(0, 4), range(4, 8))]

    def rows(result):
        return [(u.stream_id, u.tokens) for u in result.updates]

    want, got = [], []
    for interleaved in (False, True):
        # the reference: one step at a time, all on one stream (no decode stream)
        engine.set_decode_stream(interleaved)
        slots = [engine.acquire_slot() for _ in clips]
        out = got if interleaved else want
        for k in range(g.total_chunks(n) - 1):
            a, b = plans(slots, k)
            if not interleaved:
                out += [rows(engine.step(a)), rows(engine.step(b))]
                continue
            run_a = engine.start_step(a)
            assert run_a.advance() and run_a.stage == QUEUED
            run_b = engine.start_step(engine.prepare(b))
            assert run_b.advance() and run_b.stage == QUEUED  # B's encoder queued before A's decode
            while run_a.advance():
                pass
            while run_b.advance():
                pass
            out += [rows(run_a.result), rows(run_b.result)]
        for slot in slots:
            engine.release_slot(slot)
    assert got == want
    assert any(t for r in want for _, t in r), "nothing decoded: the comparison is vacuous"
    assert engine.slots_in_use() == 0


def test_the_triton_kernels_agree_with_torch_and_read_the_cache_in_the_pool(speech):
    """`--step-kernels triton` (engines/step_attention.py: each row's attention cache read in the
    slot pool, no gather; engines/fused_norms.py: each layer's element-wise chains fused) against
    the same engine with PyTorch's operations: demo model, fp16, fast-cudagraph, every speech
    stream in the same random mixed batches. The two round differently in float16, so token
    agreement >= 99.9% and whole transcripts >= 98% rather than equality (the CPU tests,
    tests/test_step_attention.py and tests/test_fused_norms.py, hold fp32 to 1e-4 against NeMo).
    The workspace has no room for the cache (it came from the pool), no graph is
    captured while serving, and one step at 1 and 64 rows is timed both ways (recorded, not
    asserted; bench/step_bench.py --kernels torch,attention,triton measures it)."""
    plain = build_on("builtin:demo", "fast-cudagraph", "float16")
    fused = build_on("builtin:demo", "fast-cudagraph", "float16", step_kernels="triton")
    assert fused.encoder_engine.attention == "kernel" and fused.encoder_engine.parts.fused and fused.cache_in_place
    assert plain.encoder_engine.attention == "sdpa" and not plain.encoder_engine.parts.fused and not plain.cache_in_place
    for engine in (plain, fused):
        engine.warmup()
    captures = fused.encoder_engine.captures
    a = agreement(run_streams(plain, speech, seed=6), run_streams(fused, speech, seed=6))
    assert fused.encoder_engine.captures == captures
    C = fused.encoder_engine.params.geo.cache
    # no room in the workspace for the cache: the kernel read every row's in the pool
    assert fused.encoder_engine.buffers.kv_work.shape[2] == fused.encoder_engine.params.geo.frames_out < C
    timing = {name: {rows: engine.measure_step_ms(rows) for rows in (1, 64)}
              for name, engine in (("torch", plain), ("triton", fused))}
    record("triton_kernels_vs_torch_demo_fp16", {**a.as_dict(), "step_ms_by_rows": timing})
    assert a.streams >= MIN_STREAMS and a.reference_tokens > 5 * a.streams and a.empty_reference == 0
    assert a.token_agreement >= MIN_TOKEN_AGREEMENT, a.as_dict()
    assert a.transcript_match >= 0.98, a.as_dict()
