"""On the GPU, through real gRPC: serving captures no CUDA graph after start-up; a real CUDA
out-of-memory in a step loses no stream; every GPU engine passes the start-up self-check (and a
wrong one is refused); `asr-server` with no engine or sizing flag starts fast-cudagraph on the
GPU, sized by `auto` (batch 256, slots from device memory, frontends from the cores), and
transcribes the examples as the CPU's eager fp32 engine does."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal

import grpc
import numpy as np
import pytest
import torch

from engines.capacity import (ENGINE_BYTES_MARGIN, GPU_MAX_BATCH, HEADROOM_FRACTION, MAX_AUTO_BATCH, MAX_AUTO_SLOTS, MAX_AUTO_STREAMS,
                              BatchSizing, realtime_cap)
from engines.config import EngineConfig
from proto import asr_stream_pb2 as pb
from proto import asr_stream_pb2_grpc as pb_grpc
from tests.engine_alone import transcribe_alone
from tests.fault_engine import FaultyEngine
from tests.gpu.agreement import build_on
from tests.gpu.conftest import record
from tests.gpu.speech import _read_wav, clips
from server.service.auto_config import engine_sizing_kwargs
from tests.server_harness import ROOT, final_transcript, requests_for, running_server, spawn_server, stub_for


def pcm16(samples: np.ndarray) -> bytes:
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2").tobytes()


def as_served(samples: np.ndarray) -> np.ndarray:
    """What the server hears of float samples sent as PCM16."""
    return np.frombuffer(pcm16(samples), "<i2").astype(np.float32) / np.float32(32768.0)


@pytest.fixture(scope="module")
def demo():
    return "builtin:demo"


async def _transcribe_all(stub, datas: list[bytes]) -> list[str]:
    async def one(i, data):
        async def gen():
            for r in requests_for(data, seed=i):
                yield r
        return final_transcript([r async for r in stub.StreamingRecognize(gen())])

    return await asyncio.gather(*(one(i, d) for i, d in enumerate(datas)))


async def test_serving_over_grpc_captures_no_graph_after_startup(demo):
    engine = build_on(demo, "fast-cudagraph", "float16", max_streams=96, max_batch=32)
    speech = [as_served(s) for _, s, _ in clips(200)[:64]]
    async with running_server(engine) as server, stub_for(server) as stub:
        captures, decode_graphs = engine.encoder_engine.captures, set(engine.decoder._graphs)
        got = await _transcribe_all(stub, [pcm16(s) for s in speech])
        models = (await stub.ListModels(pb.ListModelsRequest())).models
    assert engine.encoder_engine.captures == captures == len(engine.encoder_engine.buckets)
    assert set(engine.decoder._graphs) == decode_graphs, "a decode graph was captured while serving"
    assert models[0].engine == "fast-cudagraph" and models[0].engine_executions["fast-cudagraph"] > 0
    alone = [transcribe_alone(engine, s) for s in speech]
    assert all(t.strip() for t in alone), "empty transcripts: the comparison would be vacuous"
    equal = sum(a == b for a, b in zip(got, alone))
    record("grpc_serving_vs_alone", {"streams": len(speech), "equal": equal})
    # float16: a batch's bucket picks other kernels than a stream alone, so a rare token may differ
    assert equal >= len(speech) - 2, [(a, b) for a, b in zip(got, alone) if a != b]
    assert engine.slots_in_use() == 0


@contextlib.contextmanager
def device_memory_taken(device: torch.device):
    """Allocates every byte the device has free (in halving blocks down to 1 MiB), so that the
    next allocation of any size fails with a genuine CUDA out-of-memory; frees it on exit."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # cached free blocks would let the step run without a new cudaMalloc
    held = []
    block = torch.cuda.mem_get_info(device)[0]
    while block >= 1 << 20:
        try:
            held.append(torch.empty(block, dtype=torch.uint8, device=device))
        except torch.cuda.OutOfMemoryError:
            block //= 2
    try:
        yield
    finally:
        del held
        torch.cuda.empty_cache()


class RealOutOfMemory(FaultyEngine):
    """Steps of more than `oom_above` chunks run with the device's memory taken: the real encoder
    step fails with torch.cuda.OutOfMemoryError from the CUDA allocator (nothing is raised by
    hand). Smaller steps run normally."""

    def __init__(self, inner, oom_above: int):
        self.real_ooms = 0
        self.oom_not_raised = 0
        super().__init__(inner, oom_above=oom_above)

    def _hook_encoder(self, encoder_engine):
        original = encoder_engine.step
        device = self.inner.device

        def step(*args, **kwargs):
            fault, _ = getattr(self._pending, "fault", None) or (None, 0)
            if fault != "oom":
                return original(*args, **kwargs)
            try:
                with device_memory_taken(device):
                    out = original(*args, **kwargs)
                    torch.cuda.synchronize(device)
            except torch.cuda.OutOfMemoryError:
                self.real_ooms += 1
                raise
            self.oom_not_raised += 1
            return out

        encoder_engine.step = step

        def unhook():
            del encoder_engine.step

        return unhook


async def test_a_real_cuda_out_of_memory_loses_no_stream(demo):
    from tests.server_harness import as_float
    from tests.test_faults import _oom_run

    # eager allocates in every step (a graph replay would not); float32, so that a stream's
    # tokens do not depend on the batch it ran in
    engine = build_on(demo, "eager", "float32", max_streams=32, max_batch=16)
    speech = [as_served(s) for _, s, _ in clips(200)[:6]]
    expected = [transcribe_alone(engine, s) for s in speech]
    assert all(t.strip() for t in expected)
    wrapped = RealOutOfMemory(engine, oom_above=2)
    pcm = [np.frombuffer(pcm16(s), "<i2").copy() for s in speech]
    assert all(np.array_equal(as_float(p), s) for p, s in zip(pcm, speech))
    try:
        await _oom_run(wrapped, pcm, expected, limit=2)
    finally:
        wrapped.restore()
    record("real_cuda_oom", {"real_ooms": wrapped.real_ooms, "attempts": wrapped.attempts})
    assert wrapped.real_ooms >= 1 and wrapped.oom_not_raised == 0
    assert wrapped.real_ooms == sum(1 for _, f in wrapped.attempts if f == "oom")
    assert engine.slots_in_use() == 0


@pytest.mark.parametrize("name", ["fast", "fast-cudagraph", "cudagraph"])
def test_startup_self_check_on_gpu(demo, name):
    engine = build_on(demo, name, "float16", max_streams=16, max_batch=8)
    report = engine.startup_report
    assert report.engine == report.configured_engine == name and not report.fell_back
    check = report.self_check
    assert check.passed and check.max_rel_error <= check.tolerance, check.detail
    assert engine.executions() == {name: check.steps}
    steps_before = engine.executions()[name]
    assert engine.warmup() == name
    g = engine.geometry
    n = g.samples_needed(1) + g.chunk_samples // 2
    from engines.cudagraph_engine import batch_buckets
    # warm-up: one step on silence, then every batch bucket's first, middle and short last chunk
    assert engine.executions()[name] == steps_before + 1 + g.total_chunks(n) * len(batch_buckets(8))
    record(f"self_check_{name}", check.as_dict())


def test_wrong_engine_is_refused_on_gpu(demo, monkeypatch):
    import engines.factory as factory
    from engines.encoders import EagerEncoder
    from engines.factory import EngineStartError

    class Wrong(EagerEncoder):
        name = "fast"

        def _run(self, *args):
            enc, enc_len, cc, ct, ccl = super()._run(*args)
            return enc * 1.1, enc_len, cc, ct, ccl

    real = factory.make_encoder_engine
    monkeypatch.setattr(factory, "make_encoder_engine",
                        lambda n, model, *a: Wrong(model.nemo_model.encoder) if n == "fast" else real(n, model, *a))
    with pytest.raises(EngineStartError, match="differ from the eager reference"):
        build_on(demo, "fast", "float16", max_streams=4, max_batch=4)


def test_auto_slots_keep_what_the_probe_engine_held_and_a_served_step_fits_in_it(demo):
    # `--max-streams auto` after `--max-batch auto` (engines/capacity.py): the headroom is what a
    # probe engine of the chosen batch held beyond its slots while stepping, twice; the serving
    # engine's own step at that batch, two in flight at most, must fit in it.
    from engines.factory import build_engine

    engine = build_engine(EngineConfig(model=demo, engine="fast-cudagraph", device="cuda", dtype="float16",
                                       **engine_sizing_kwargs(None, None)))
    sizing = engine.startup_report.sizing
    held = sizing["engine_bytes"]
    assert held is not None and held > 0, sizing
    # the batch was chosen with each measured batch's slots beside it (choose_max_batch's slots_at)
    batch = BatchSizing.from_dict(engine.startup_report.batch_sizing)
    assert batch.slots and {b for b, _ in batch.slots} <= {b for b, ms in batch.measured if ms is not None}, batch
    assert all(n > 0 for _, n in batch.slots), batch
    assert sizing["headroom_bytes"] == int(HEADROOM_FRACTION * sizing["total_bytes"]) + int(ENGINE_BYTES_MARGIN * held)
    rows = min(engine.max_batch, engine.capacity)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    engine.measure_step_ms(rows)
    step = torch.cuda.max_memory_allocated() - before
    record("auto_slots_engine_bytes", {"rows": rows, "probe_held": held, "served_step": step,
                                       "slots": engine.capacity, "slot_bytes": sizing["per_stream_bytes"],
                                       "slots_by_batch": dict(batch.slots), "step_ms_by_batch": dict(batch.measured)})
    assert 2 * step <= ENGINE_BYTES_MARGIN * held, (step, held)
    del engine
    torch.cuda.empty_cache()


def test_auto_slots_beside_a_named_batch_measure_its_step(demo):
    # `--max-batch 64 --max-streams auto` (the tuned flags' shape): the batch stays as named, and
    # the slots are sized from its own measured step (cap and headroom), not by the fixed cap.
    from engines.factory import build_engine

    engine = build_engine(EngineConfig(model=demo, engine="fast-cudagraph", device="cuda", dtype="float16",
                                       **engine_sizing_kwargs(None, 64)))
    report = engine.startup_report
    batch, sizing = report.batch_sizing, report.sizing
    assert engine.max_batch == 64 and batch["named"] and batch["max_batch"] == 64, batch
    ((rows, ms),) = batch["measured"]
    assert rows == 64 and ms > 0 and sizing["engine_bytes"] == dict(map(tuple, batch["engine_bytes"]))[64] > 0
    assert sizing["cap"] == realtime_cap(BatchSizing.from_dict(batch))[0] != MAX_AUTO_STREAMS, sizing
    record("auto_slots_named_batch", {"step_ms": ms, "engine_bytes": sizing["engine_bytes"], "slots": engine.capacity,
                                      "cap": sizing["cap"]})
    del engine
    torch.cuda.empty_cache()


async def test_asr_server_defaults_to_fast_cudagraph_on_gpu_and_transcribes_like_cpu():
    examples = sorted((ROOT / "examples").glob("*.wav"))
    cpu = build_on("builtin:demo", "eager", "float32", max_streams=4, max_batch=4, device="cpu")
    expected = [transcribe_alone(cpu, _read_wav(f)) for f in examples]
    assert all(t.strip() for t in expected)
    proc, match, lines = await spawn_server("--host", "127.0.0.1", "--port", "0", "--metrics-host", "127.0.0.1",
                                            "--metrics-port", "0")
    try:
        # --decode-stream auto: both modes timed at start-up, at the measured batch; the
        # transcripts below are served in whichever mode was kept
        decode = re.search(r"decode stream: (on|off) \(measured: [^)]*\): a pipelined step of (\d+) rows took "
                           r"([\d.]+) ms with it and ([\d.]+) ms without", "".join(lines))
        assert decode, "".join(lines)[-3000:]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{match.group(1)}") as channel:
            stub = pb_grpc.SpeechRecognitionStub(channel)
            got = await _transcribe_all(stub, [pcm16(_read_wav(f)) for f in examples])
            (model,) = (await stub.ListModels(pb.ListModelsRequest())).models
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 120)
    assert model.engine == "fast-cudagraph" and model.engine_executions["fast-cudagraph"] > 0
    # --max-batch and --max-streams auto (engines/capacity.py): the batch measured from the step
    # time (the demo model's step is mostly fixed cost, so on an H200 it measured 1,024 on
    # 2026-12-04, where the 0.6B model keeps 256), never below the default, and slots from the
    # device memory, at most twice what the measured step carries (the demo model's slots are
    # small: the cap, on any large GPU).
    assert GPU_MAX_BATCH <= model.max_batch <= min(MAX_AUTO_BATCH, model.max_streams), (model.max_batch, model.max_streams)
    assert 256 <= model.max_streams <= MAX_AUTO_SLOTS, model.max_streams
    assert int(decode.group(2)) == min(model.max_batch, model.max_streams // 2)  # two steps in flight, other streams
    record("asr_server_default_on_gpu", {"engine": model.engine, "executions": dict(model.engine_executions),
                                         "max_streams": model.max_streams, "max_batch": model.max_batch,
                                         "decode_stream": decode.group(1),
                                         "decode_stream_ms": float(decode.group(3)), "one_stream_ms": float(decode.group(4)),
                                         "equal_to_cpu_eager_fp32": sum(a == b for a, b in zip(got, expected)),
                                         "files": len(examples)})
    assert got == expected
    assert code == 0
