"""`auto` sizing: slots from device memory and the batch cap (engines/capacity.py, decided in the
engine process), the frontend count and the flags (server/service/auto_config.py). The decisions are
pure functions, checked with given memory and CPU figures; the factory's measuring is checked
on the CPU with the real tiny model (its CUDA memory queries replaced by given figures: no GPU
here); the CLI's parsing and its explicit values as overrides."""

from __future__ import annotations

import argparse
import dataclasses
import time
from types import SimpleNamespace

import pytest

from engines.capacity import (ENGINE_BYTES_MARGIN, GPU_MAX_BATCH, HEADROOM_FRACTION, MAX_AUTO_BATCH, MAX_AUTO_SLOTS, MAX_AUTO_STREAMS,
                              SERVED_RATE_SHARE, SLOTS_PER_STEP_CAPACITY, STEP_BUDGET_FRACTION, STEP_STATE_COPIES, BatchSizing, StreamSizing, auto_max_batch, batch_candidates,
                              batch_limit, batch_memory_limit, choose_max_batch, gains_enough, realtime_cap,
                              streams_for_memory)
from engines.config import EngineConfig
from server.service.auto_config import (CORES_PER_FRONTEND, ENGINE_CORES, MAX_AUTO_FRONTENDS, auto_frontends,
                                cgroup_cpu_limit, engine_sizing_kwargs, int_or_auto, resolve_frontends, usable_cpus)
from server.scheduling.scheduler import SchedulerConfig
from server.service.cli import parse_args

GIB = 1 << 30
MIB = 1 << 20
NEMOTRON_FAST_SLOT = int(6.95 * MIB)   # bench/RESULTS.md: one slot of the 0.6B shape, fast engines, fp16


# -- slots from device memory -------------------------------------------------------------------

def test_a_large_gpu_is_capped():
    # An H200 after loading the 0.6B model: memory would hold far more slots than the cap.
    s = streams_for_memory(free_bytes=130 * GIB, total_bytes=140 * GIB, per_stream_bytes=NEMOTRON_FAST_SLOT,
                           max_batch=256)
    assert s.fits_in_memory > MAX_AUTO_STREAMS and s.max_streams == MAX_AUTO_STREAMS == s.cap
    assert "limited by the cap" in s.describe()


def test_the_cap_is_what_the_measured_step_carries_twice_over():
    """With the step measured, the slots stop at SLOTS_PER_STEP_CAPACITY x the real-time streams
    it carries (batch x chunk / step): an H200's whole step at 160 ms (256 rows in 13.6 ms, runs
    28 and 31) gives about 6,000; at 560 ms with 1,024 rows in 80 ms, memory decides."""
    at_160 = choose_max_batch(256, 256, 160.0, _timer({256: 13.6}))
    cap, why = realtime_cap(at_160)
    assert cap == int(SLOTS_PER_STEP_CAPACITY * 256 * 160.0 / 13.6) == 6023
    assert "3012 real-time streams a step of 256 rows in 13.6 ms" in why
    s = streams_for_memory(130 * GIB, 140 * GIB, NEMOTRON_FAST_SLOT, 256, cap=cap, cap_reason=why)
    assert s.max_streams == 6023 and "limited by the cap" in s.describe() and why in s.describe()
    at_560 = choose_max_batch(1024, 1024, 560.0, _timer({1024: 80.0}))
    cap, why = realtime_cap(at_560)
    assert cap == 14336
    s = streams_for_memory(130 * GIB, 140 * GIB, NEMOTRON_FAST_SLOT, 1024, cap=cap, cap_reason=why)
    assert s.max_streams == s.fits_in_memory < cap and "limited by device memory" in s.describe()
    assert s.max_streams >= 8000  # issue 17's 560 ms target fits an H200
    # unmeasured (an explicit --max-batch): the fixed cap; a slow step never caps below its batch
    assert realtime_cap(None) == (MAX_AUTO_STREAMS, f"the fixed cap for an unmeasured step ({MAX_AUTO_STREAMS})")
    assert realtime_cap(choose_max_batch(256, 256, 160.0, _timer({256: 79.0})))[0] == 2 * int(256 * 160 / 79.0)
    small_model = realtime_cap(choose_max_batch(1024, 1024, 160.0, _timer({1024: 8.0})))
    assert small_model[0] == MAX_AUTO_SLOTS and "20480 real-time streams" in small_model[1]
    assert realtime_cap(BatchSizing(max_batch=64, default=256, limit=256, chunk_ms=160.0, budget_ms=80.0,
                                    measured=((256, None), (128, 500.0), (64, 9000.0))))[0] == 64


def test_a_small_gpu_is_limited_by_its_memory_after_the_headroom():
    free, total, per, batch = 20 * GIB, 24 * GIB, NEMOTRON_FAST_SLOT, 256
    s = streams_for_memory(free, total, per, batch)
    headroom = int(HEADROOM_FRACTION * total) + STEP_STATE_COPIES * per * batch
    assert s.headroom_bytes == headroom
    assert s.max_streams == s.fits_in_memory == (free - headroom) // per
    # 2.4 GiB (10%) and 6.9 GiB for four copies of 256 rows kept: about 1,570 slots of 6.95 MiB
    assert 1500 < s.max_streams < 1600
    assert s.max_streams * per + headroom <= free < (s.max_streams + 1) * per + headroom
    assert "limited by device memory" in s.describe() and "6.95 MiB per stream" in s.describe()


def test_the_headroom_grows_with_the_batch():
    small = streams_for_memory(10 * GIB, 16 * GIB, 4 * MIB, max_batch=16)
    large = streams_for_memory(10 * GIB, 16 * GIB, 4 * MIB, max_batch=256)
    assert large.max_streams == small.max_streams - STEP_STATE_COPIES * (256 - 16)


def test_a_measured_engine_keeps_what_it_held_not_four_copies_of_its_rows():
    # Run 48 (bench/RESULTS.md, one H100, 560 ms, the Triton kernels): the copies rule gave the
    # 5,775 slots that server reported, 35.7 GiB kept; the kernels read the attention cache where
    # it lies, so the engine holds far less beside its slots than four copies of 1,024 rows.
    free, total, per, batch = int(74.9 * GIB), int(79.2 * GIB), NEMOTRON_FAST_SLOT, 1024
    rule = streams_for_memory(free, total, per, batch, cap=15557)
    assert 5765 <= rule.max_streams <= 5780 and rule.engine_bytes is None
    assert "4 copies of a slot per row" in rule.describe()
    held = int(1.5 * GIB)
    s = streams_for_memory(free, total, per, batch, engine_bytes=held, cap=15557)
    assert s.headroom_bytes == int(HEADROOM_FRACTION * total) + int(ENGINE_BYTES_MARGIN * held)
    assert s.max_streams == (free - s.headroom_bytes) // per
    assert s.max_streams > 8000 > rule.max_streams  # issue 17's 8,000 at 560 ms now fit in memory
    assert "1.50 GiB a probe engine of 1024 rows held" in s.describe()
    assert StreamSizing(**s.as_dict()) == s
    # the more the engine held, the fewer slots; a held figure below zero is refused
    assert streams_for_memory(free, total, per, batch, engine_bytes=4 * held).max_streams < s.max_streams
    with pytest.raises(ValueError):
        streams_for_memory(free, total, per, batch, engine_bytes=-1)


def test_no_room_gives_zero_streams_and_bad_figures_are_refused():
    assert streams_for_memory(1 * GIB, 16 * GIB, 4 * MIB, 256).max_streams == 0   # under the headroom
    with pytest.raises(ValueError):
        streams_for_memory(10 * GIB, 16 * GIB, 0, 256)
    with pytest.raises(ValueError):
        streams_for_memory(10 * GIB, 16 * GIB, 4 * MIB, 0)


def test_sizing_round_trips_through_its_dict():
    s = streams_for_memory(20 * GIB, 24 * GIB, NEMOTRON_FAST_SLOT, 256)
    assert StreamSizing(**s.as_dict()) == s


def test_batch_cap():
    assert auto_max_batch(on_gpu=False, cpu_default=32) == 32
    assert auto_max_batch(on_gpu=True, cpu_default=32) == GPU_MAX_BATCH == 256
    assert auto_max_batch(on_gpu=True, cpu_default=32, max_streams=100) == 100    # never more rows than slots
    assert auto_max_batch(on_gpu=True, cpu_default=32, max_streams=4608) == 256


# -- the factory's measuring (CPU, the real tiny model) --------------------------------------------

def test_the_factory_measures_a_slot_as_the_pool_lays_it_out(tiny_engine, monkeypatch):
    import torch

    from engines import factory

    cfg = EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32", max_batch=8)
    per = factory.per_stream_state_bytes(tiny_engine.model, tiny_engine.encoder_engine, cfg, tiny_engine.device,
                                         tiny_engine.dtype)
    assert per == tiny_engine.pool.bytes_per_slot() > 0
    # The memory figures as CUDA would give them: free outside torch, plus torch's unused cache.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * GIB, 16 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * GIB)
    s = factory.size_slots_for_device(tiny_engine.model, tiny_engine.encoder_engine, cfg, tiny_engine.device,
                                      tiny_engine.dtype)
    assert s.free_bytes == 4 * GIB and s.per_stream_bytes == per and s.max_batch == 8
    assert s == streams_for_memory(4 * GIB, 16 * GIB, per, 8)


def test_the_slots_are_sized_with_what_the_probe_engine_held_at_the_chosen_batch(tiny_engine, monkeypatch):
    import torch

    from engines import factory

    cfg = EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32", max_batch=8)
    per = tiny_engine.pool.bytes_per_slot()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * GIB, 16 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * GIB)
    sizing = BatchSizing(max_batch=8, default=4, limit=16, chunk_ms=160.0, budget_ms=80.0,
                         measured=((4, 2.0), (8, 3.0), (16, 9000.0)), engine_bytes=((4, 50 * MIB), (8, 90 * MIB)))
    s = factory.size_slots_for_device(tiny_engine.model, tiny_engine.encoder_engine, cfg, tiny_engine.device,
                                      tiny_engine.dtype, sizing)
    cap, why = realtime_cap(sizing)
    assert s == streams_for_memory(4 * GIB, 16 * GIB, per, 8, cap=cap, cap_reason=why, engine_bytes=90 * MIB)
    assert s.engine_bytes == 90 * MIB
    # without the batch measured (an explicit --max-batch), the copies rule
    s = factory.size_slots_for_device(tiny_engine.model, tiny_engine.encoder_engine, cfg, tiny_engine.device,
                                      tiny_engine.dtype)
    assert s.engine_bytes is None


def test_the_batch_measurement_records_what_each_probe_held_beyond_its_slots(monkeypatch):
    # The GPU's peak counters replaced by given figures (no GPU here): before each probe 1 GiB,
    # at its peak 1 GiB more; the probe's own slots are not counted in what it held.
    import torch

    from engines import factory
    from engines.models import load_model

    model = load_model("builtin:tiny", 160)
    cfg = EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32", max_batch=8)
    encoder, _ = factory.start_encoder_engine("eager", model, cfg, torch.device("cpu"), torch.float32)
    monkeypatch.setattr(factory, "_reset_peak", lambda device: 1 * GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2 * GIB)
    sizing = factory.measure_max_batch(model, encoder, cfg, torch.device("cpu"), torch.float32, 4)
    per = factory.per_stream_state_bytes(model, encoder, cfg, torch.device("cpu"), torch.float32)
    measured = [b for b, ms in sizing.measured if ms is not None]
    assert measured and dict(sizing.engine_bytes) == {b: GIB - b * per for b in measured}
    assert sizing.engine_bytes_at(sizing.max_batch) == GIB - sizing.max_batch * per
    assert BatchSizing.from_dict(sizing.as_dict()) == sizing
    # on the CPU itself nothing is counted: the copies rule stays
    monkeypatch.undo()
    assert factory.measure_max_batch(model, encoder, cfg, torch.device("cpu"), torch.float32, 4).engine_bytes == ()


def test_a_named_batch_is_kept_and_its_step_measured_for_the_slots(monkeypatch):
    # `--max-batch N --max-streams auto` on a GPU (the tuned flags): N stays, and one probe engine
    # of N rows gives the slot sizing its cap and headroom, as for a chosen batch; run 47's tuned
    # server got the fixed cap (4,608 slots) instead. The GPU's peak counters are given figures.
    import torch

    from engines import factory
    from engines.models import load_model

    model = load_model("builtin:tiny", 160)
    cfg = EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32", max_batch=8)
    encoder, _ = factory.start_encoder_engine("eager", model, cfg, torch.device("cpu"), torch.float32)
    per = factory.per_stream_state_bytes(model, encoder, cfg, torch.device("cpu"), torch.float32)
    monkeypatch.setattr(factory, "_reset_peak", lambda device: 1 * GIB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2 * GIB)
    s = factory.measure_named_batch(model, encoder, cfg, torch.device("cpu"), torch.float32)
    ((rows, ms),) = s.measured
    assert s.named and s.max_batch == rows == 8 and ms > 0
    assert s.engine_bytes_at(8) == GIB - 8 * per
    assert BatchSizing.from_dict(s.as_dict()) == s
    cap, why = realtime_cap(s)
    assert cap == min(MAX_AUTO_SLOTS, max(8, int(SLOTS_PER_STEP_CAPACITY * 8 * s.chunk_ms / ms))), why
    sized = streams_for_memory(40 * GIB, 80 * GIB, NEMOTRON_FAST_SLOT, 8, cap=cap, cap_reason=why,
                               engine_bytes=s.engine_bytes_at(8))
    assert sized.engine_bytes == GIB - 8 * per and sized.headroom_bytes == int(0.1 * 80 * GIB) + int(2 * (GIB - 8 * per))
    # its lines say the batch was named and what its step took
    gpu = SimpleNamespace(capacity=sized.max_streams, max_batch=8, startup_report={
        "device": "cuda:0", "sizing": sized.as_dict(), "batch_sizing": s.as_dict()})
    _, lines = resolve_frontends(1, gpu, True, False)
    assert "max batch 8, frontends 1" in lines[0] and "(auto" not in lines[0].split("max batch")[1]
    assert lines[-1].startswith("the named batch's step: max batch 8 (named)") and f"8: {ms:.1f} ms" in lines[-1]
    # a probe the device memory cannot take: the unmeasured rules (fixed cap, copies of a slot)

    def out_of_memory(self, rows, timed_steps=3, give_up_ms=None):
        raise torch.cuda.OutOfMemoryError("probe")

    monkeypatch.setattr(factory.StreamingEngine, "measure_step_ms", out_of_memory)
    s = factory.measure_named_batch(model, encoder, cfg, torch.device("cpu"), torch.float32)
    assert s.measured == ((8, None),) and s.engine_bytes == () and s.engine_bytes_at(8) is None
    assert realtime_cap(s)[0] == MAX_AUTO_STREAMS


def test_auto_on_the_cpu_keeps_the_fixed_defaults():
    from engines.factory import MEASURE_BATCH_ON_CPU, build_engine

    assert not MEASURE_BATCH_ON_CPU

    cfg = EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32",
                       **engine_sizing_kwargs(None, None))
    assert cfg.auto_max_streams and cfg.auto_max_batch
    engine = build_engine(cfg)
    assert (engine.capacity, engine.max_batch) == (EngineConfig.max_streams, EngineConfig.max_batch) == (64, 32)
    report = engine.startup_report.as_dict()
    assert report["device"] == "cpu" and report["sizing"] is None and report["batch_sizing"] is None


# -- frontends ------------------------------------------------------------------------------------

def test_frontends_from_the_cpu_count():
    assert [auto_frontends(c, on_gpu=False) for c in (1, 2, 16, 64)] == [1, 1, 1, 1]
    assert auto_frontends(2, on_gpu=True) == 1
    assert auto_frontends(4, on_gpu=True) == 1
    assert auto_frontends(ENGINE_CORES + 2 * CORES_PER_FRONTEND, on_gpu=True) == 2     # 6 cores
    assert auto_frontends(8, on_gpu=True) == 3
    assert auto_frontends(16, on_gpu=True) == 7                                          # the H100/H200 host
    assert auto_frontends(128, on_gpu=True) == MAX_AUTO_FRONTENDS
    # several engine cores: one more reserved core per extra engine worker, and a cap per core
    assert auto_frontends(16, on_gpu=True, engine_cores=2) == 6                          # (16 - 3) // 2
    assert auto_frontends(32, on_gpu=True, engine_cores=2) == 14                         # (32 - 3) // 2, under 2 x 8
    assert auto_frontends(64, on_gpu=True, engine_cores=2) == 2 * MAX_AUTO_FRONTENDS     # 30 capped to 16
    assert auto_frontends(4, on_gpu=True, engine_cores=4) == 1
    assert auto_frontends(64, on_gpu=False, engine_cores=4) == 1


def test_usable_cpus_take_a_cgroup_quota():
    assert cgroup_cpu_limit("max 100000") is None and cgroup_cpu_limit(None) is None
    assert cgroup_cpu_limit("250000 100000") == 2.5 and cgroup_cpu_limit("garbage") is None
    assert usable_cpus(16) == 16
    assert usable_cpus(16, "max 100000\n") == 16
    assert usable_cpus(16, "400000 100000\n") == 4
    assert usable_cpus(16, "250000 100000") == 3
    assert usable_cpus(2, "800000 100000") == 2
    assert usable_cpus(0) == 1


def _engine(device: str | None, capacity: int = 64, max_batch: int = 32, sizing: dict | None = None):
    report = None if device is None else {"device": device, "sizing": sizing}
    return SimpleNamespace(capacity=capacity, max_batch=max_batch, startup_report=report)


def test_resolve_frontends_and_the_lines_it_prints():
    sizing = streams_for_memory(130 * GIB, 140 * GIB, NEMOTRON_FAST_SLOT, 256)
    gpu = _engine("cuda:0", capacity=sizing.max_streams, max_batch=256, sizing=sizing.as_dict())
    frontends, lines = resolve_frontends(None, gpu, True, True, cpus=16)
    assert frontends == 7
    assert ("device cuda:0, max streams 4608 (auto: from device memory), max batch 256 (auto: the fixed default), "
            "frontends 7") in lines[0]
    assert "16 usable cores" in lines[0] and "limited by the cap" in lines[1]
    assert not any(line.startswith("step kernels") for line in lines)  # an engine that does not say
    gpu.startup_report["details"] = {"engine": "fast-cudagraph", "attention": "kernel", "fused_norms": True}
    assert resolve_frontends(None, gpu, True, True, cpus=16)[1][-1] == (
        "step kernels: triton (attention: a Triton kernel reading each row's cache in the slot pool; element-wise "
        "chains fused)")
    gpu.startup_report["details"] = {"engine": "fast-cudagraph", "attention": "kernel", "fused_norms": True,
                                     "masked_convs": True, "attention_launch": {
                                         "block_n": 32, "num_warps": 4, "num_stages": 2, "products": "dot",
                                         "order": "heads"}}
    assert resolve_frontends(None, gpu, True, True, cpus=16)[1][-1] == (
        "step kernels: triton (attention: a Triton kernel reading each row's cache in the slot pool, 32 keys a block, "
        "4 warps, 2 stages, dot products, a row's heads launched together; element-wise chains fused; the "
        "subsampling's convs reading their input masked in place)")
    gpu.startup_report["details"] = {"engine": "fast-cudagraph", "attention": "sdpa", "fused_norms": False}
    assert resolve_frontends(None, gpu, True, True, cpus=16)[1][-1] == (
        "step kernels: torch (attention: SDPA over the gathered cache; element-wise chains as PyTorch runs them)")
    # an explicit count wins; an engine that reports no device (the test engines) counts as the CPU
    assert resolve_frontends(3, gpu, True, True, cpus=16)[0] == 3
    frontends, lines = resolve_frontends(None, _engine(None), False, False, cpus=16)
    assert frontends == 1 and len(lines) == 1 and "max streams 64," in lines[0]
    assert resolve_frontends(None, _engine("cpu"), True, True, cpus=16)[0] == 1


# -- the flags ------------------------------------------------------------------------------------

def test_flags_default_to_auto_and_explicit_values_override():
    args = parse_args([])
    assert (args.max_streams, args.max_batch, args.frontends) == (None, None, None)
    assert engine_sizing_kwargs(args.max_streams, args.max_batch) == {
        "max_streams": 64, "auto_max_streams": True, "max_batch": 32, "auto_max_batch": True}
    args = parse_args(["--max-streams", "4608", "--max-batch", "256", "--frontends", "4"])
    assert (args.max_streams, args.max_batch, args.frontends) == (4608, 256, 4)
    cfg = EngineConfig(**engine_sizing_kwargs(args.max_streams, args.max_batch))
    assert (cfg.max_streams, cfg.auto_max_streams, cfg.max_batch, cfg.auto_max_batch) == (4608, False, 256, False)
    assert parse_args(["--max-streams", "AUTO", "--frontends", "auto"]).max_streams is None
    assert dataclasses.replace(cfg, max_batch=8).max_batch == 8
    # the decode's own CUDA stream: asr-server times it at start-up (auto); the flag alone is on;
    # EngineConfig's other callers (tests, benchmarks) get one stream unless they ask
    assert parse_args([]).decode_stream == "auto" and EngineConfig().decode_stream == "off"
    assert parse_args(["--decode-stream"]).decode_stream == "on"
    assert parse_args(["--decode-stream", "off"]).decode_stream == "off"


def test_a_bad_value_is_refused():
    with pytest.raises(argparse.ArgumentTypeError):
        int_or_auto("many")
    with pytest.raises(SystemExit):
        parse_args(["--max-streams", "many"])


# -- the batch cap from the step's measured time ----------------------------------------------------

# Issue 17's H200 figures (fast-cudagraph, 0.6B, step ms by batch) and a linear model between them.
H200_160 = {256: 6.77, 512: 11.05, 1024: 19.81}
H200_560 = {256: 12.78, 512: 23.32, 1024: 44.93}


def _timer(table: dict[int, float] | None = None, per_row_ms: float | None = None, fixed_ms: float = 0.0):
    """step_ms for choose_max_batch from given figures (or fixed_ms + per_row_ms a row); records
    the batches it was asked for."""
    asked: list[int] = []

    def step_ms(batch: int):
        asked.append(batch)
        if table is not None:
            return table.get(batch)
        return fixed_ms + per_row_ms * batch

    step_ms.asked = asked
    return step_ms


def test_a_step_with_a_fixed_cost_takes_the_largest_batch_that_fits_the_budget():
    # 5 ms a step plus 0.01 ms a row: each doubling nearly doubles the rows per ms.
    for chunk_ms in (160.0, 560.0):
        step = _timer({b: 5.0 + 0.01 * b for b in (256, 512, 1024)})
        s = choose_max_batch(GPU_MAX_BATCH, MAX_AUTO_BATCH, chunk_ms, step)
        assert s.max_batch == MAX_AUTO_BATCH == 1024 and step.asked == [256, 512, 1024]
        assert s.budget_ms == STEP_BUDGET_FRACTION * chunk_ms
        assert "max batch 1024 (the limit 1024 fits)" in s.describe()


def test_a_doubling_that_buys_too_little_throughput_is_not_taken():
    # The H200's encoder (issue 17): at 160 ms every doubling gains (1.23x, then 1.12x) and 1,024
    # is taken; at 560 ms 512 gains 1.10x over 256 and 1,024 only 1.04x over 512, under
    # MIN_DOUBLING_GAIN (1.05): 512.
    step = _timer(H200_160)
    s = choose_max_batch(GPU_MAX_BATCH, MAX_AUTO_BATCH, 160.0, step)
    assert s.max_batch == 1024 and step.asked == [256, 512, 1024]
    step = _timer(H200_560)
    s = choose_max_batch(GPU_MAX_BATCH, MAX_AUTO_BATCH, 560.0, step)
    assert s.max_batch == 512 and step.asked == [256, 512, 1024]
    assert s.measured == tuple(H200_560.items())
    assert "gains too little throughput" in s.describe() and "1.05x" in s.describe()
    assert "11.1 ms" in BatchSizing.from_dict(choose_max_batch(256, 1024, 160.0, _timer(H200_160)).as_dict()).describe()
    # a gain just above the rule is taken, just below is not (512 rows at 2 x 256 / 1.05 ms)
    assert choose_max_batch(256, 1024, 160.0, _timer({256: 10.0, 512: 19.0, 1024: 100.0})).max_batch == 512
    assert choose_max_batch(256, 1024, 160.0, _timer({256: 10.0, 512: 19.1})).max_batch == 256
    # a candidate that is not a doubling (the limit 700) is judged per doubling (1.05 ** 0.45 = 1.022)
    assert gains_enough(512, 10.0, 700, 13.3) and not gains_enough(512, 10.0, 700, 13.5)


def test_the_batch_stops_below_the_first_that_does_not_fit():
    # 40 ms + 0.04 ms a row: 60.5 ms at 512 fits half of 160 ms (and gains 1.66x), 81 ms at 1024 does not.
    step = _timer(per_row_ms=0.04, fixed_ms=40.0)
    s = choose_max_batch(256, 1024, 160.0, step)
    assert s.max_batch == 512 and step.asked == [256, 512, 1024]
    assert "the next batch is too slow" in s.describe()
    # a batch that could not run (out of memory) does not fit either, and nothing above it is tried
    step = _timer({256: 5.0, 512: None, 1024: 9.0})
    s = choose_max_batch(256, 1024, 160.0, step)
    assert s.max_batch == 256 and step.asked == [256, 512] and "512: did not run" in s.describe()


def test_below_the_default_only_when_the_default_is_too_slow():
    step = _timer(per_row_ms=1.0)  # 256 ms at 256: over the 80 ms budget; 64 rows take 64 ms
    s = choose_max_batch(256, 1024, 160.0, step)
    assert s.max_batch == 64 and step.asked == [256, 128, 64]
    assert "below the default 256" in s.describe()
    # nothing fits: one row, the least a batch can be
    step = _timer(per_row_ms=1000.0)
    s = choose_max_batch(256, 1024, 160.0, step)
    assert s.max_batch == 1 and step.asked == [256, 128, 64, 32, 16, 8, 4, 2, 1]
    # a default that fits is kept even when the next candidate fails by a hair
    s = choose_max_batch(256, 1024, 160.0, _timer({256: 80.0, 512: 80.01}))
    assert s.max_batch == 256


def test_the_choice_is_monotone_in_the_step_time_and_the_budget():
    # Faster steps never choose a smaller batch; a longer chunk (more budget) never either.
    previous = None
    for per_row in (2.0, 1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.01):
        chosen = choose_max_batch(256, 1024, 160.0, _timer(per_row_ms=per_row)).max_batch
        assert previous is None or chosen >= previous
        previous = chosen
    by_chunk = [choose_max_batch(256, 1024, c, _timer(per_row_ms=0.2)).max_batch for c in (80.0, 160.0, 560.0, 1120.0)]
    assert by_chunk == sorted(by_chunk) and by_chunk[0] < by_chunk[-1]
    # whatever the figures, the choice is one of the batches measured and fitted, or 1; a larger
    # one that fitted was not taken only for gaining too little
    for per_row, fixed in ((0.01, 0.0), (0.01, 20.0), (0.3, 0.0), (5.0, 0.0)):
        s = choose_max_batch(256, 1024, 160.0, _timer(per_row_ms=per_row, fixed_ms=fixed))
        times = dict(s.measured)
        fitted = [b for b, ms in s.measured if ms is not None and ms <= s.budget_ms]
        assert s.max_batch in fitted or (not fitted and s.max_batch == 1)
        for b in fitted:
            if b > s.max_batch:
                assert not gains_enough(s.max_batch, times[s.max_batch], b, times[b])


def test_the_candidates_respect_the_streams_and_the_memory():
    assert batch_candidates(256, 1024) == (256, 512, 1024)
    assert batch_candidates(256, 700) == (256, 512, 700)
    assert batch_candidates(32, 64) == (32, 64)
    assert batch_candidates(256, 100) == (100,)
    assert batch_limit(256) == MAX_AUTO_BATCH
    assert batch_limit(256, max_streams=700) == 700 and batch_limit(100, max_streams=100) == 100
    assert batch_limit(256, max_streams=5000) == MAX_AUTO_BATCH
    # an explicit slot count bounds every batch measured
    step = _timer(per_row_ms=0.001, fixed_ms=5.0)
    s = choose_max_batch(auto_max_batch(True, 32, 700), batch_limit(256, max_streams=700), 160.0, step)
    assert s.max_batch == 700 and max(step.asked) == 700
    # memory stops the growth, never the default
    assert batch_limit(256, memory_limit=512) == 512
    assert batch_limit(256, memory_limit=64) == 256
    assert batch_limit(256, memory_limit=0) == 256


def test_the_memory_limit_leaves_slots_for_a_full_batch():
    # An H200 holds a 1,024-row step of the 0.6B slots with room to spare; a 24 GB GPU does not.
    assert batch_memory_limit(130 * GIB, 140 * GIB, 2 * NEMOTRON_FAST_SLOT) == MAX_AUTO_BATCH
    free, total, per = 20 * GIB, 24 * GIB, 2 * NEMOTRON_FAST_SLOT
    b = batch_memory_limit(free, total, per)
    assert 1 <= b < MAX_AUTO_BATCH
    assert streams_for_memory(free, total, per, b).fits_in_memory >= b
    assert streams_for_memory(free, total, per, 2 * b).fits_in_memory < 2 * b
    assert batch_memory_limit(1 * GIB, 24 * GIB, per) == 0


def test_a_larger_batch_whose_headroom_leaves_fewer_streams_is_not_taken():
    # Run 45's H100 at 560 ms, the step timed as served (its preparation apart): 512 rows in
    # 31.25 ms, 1,024 in 56.7 (1.10x the rows per ms: the rate rule alone takes 1,024), 256 rows
    # in about 18.7 (scaled by run 49's 256/512 ratio). But the headroom beside 1,024 rows leaves
    # 5,800 slots where 512 rows leave 7,900, and 512 rows already carry about 7,800 streams
    # (SERVED_RATE_SHARE of the lone step's 9,175): with 1,024 the server would carry fewer.
    times = {256: 18.7, 512: 31.25, 1024: 56.7}
    by_rate = choose_max_batch(256, 1024, 560.0, _timer(times))
    assert by_rate.max_batch == 1024 and by_rate.slots == ()
    asked: list[int] = []
    slots = {256: 8_600, 512: 7_900, 1024: 5_800}
    s = choose_max_batch(256, 1024, 560.0, _timer(times), slots_at=lambda b: (asked.append(b), slots[b])[1])
    assert s.max_batch == 512 and asked == [256, 512, 1024] and dict(s.slots) == slots
    assert s.streams_carried(512) == pytest.approx(SERVED_RATE_SHARE * 512 * 560 / 31.25) and s.streams_carried(1024) == 5_800
    # the step, below its slots, at the share of its measured rate a server carries
    assert s.streams_carried(256) == pytest.approx(SERVED_RATE_SHARE * 256 * 560 / 18.7)
    # 256 rows that carried more streams than 512 rows' slots would have stopped the growth there
    tight = {**slots, 512: 7_000}
    s256 = choose_max_batch(256, 1024, 560.0, _timer({**times, 256: 17.0}), slots_at=tight.get)
    assert s256.max_batch == 256 and "7000 slots beside a step of 512 rows" in s256.describe()
    assert "headroom leaves fewer streams: 5800 slots beside a step of 1024 rows" in s.describe()
    assert BatchSizing.from_dict(s.as_dict()) == s
    # slots enough beside every batch (an H200): the rate rule alone decides
    roomy = choose_max_batch(256, 1024, 560.0, _timer(times), slots_at=lambda b: 13_000)
    assert roomy.max_batch == 1024 and dict(roomy.slots) == {256: 13_000, 512: 13_000, 1024: 13_000}
    # a larger batch that loses slots but still carries more streams is taken
    fewer = choose_max_batch(256, 1024, 560.0, _timer(times), slots_at=lambda b: {256: 12_000, 512: 11_000,
                                                                                    1024: 9_500}[b])
    assert fewer.max_batch == 1024
    # where a batch's memory was not measured (None), its step alone counts
    unknown = choose_max_batch(256, 1024, 560.0, _timer(times), slots_at=lambda b: None)
    assert unknown.max_batch == 1024 and unknown.slots == ()


def test_a_batchs_rate_is_weighed_against_slots_at_the_share_a_server_carries():
    # Runs 52-55 on H100s, as each server measured at start-up. 160 ms (run 55): 512 rows in
    # 13.2 ms (6,206 real-time streams by the lone step), 1,024 rows in 20.8 ms with 5,990 slots
    # beside them. Served, 512 rows failed 4,956 streams, where 1,024 rows (runs 53-54) held
    # 4,506. Weighed whole, 512's rate beat 1,024's slots and the server kept 512.
    times_160 = {256: 8.8, 512: 13.2, 1024: 20.8}
    slots_160 = {256: 9_000, 512: 8_011, 1024: 5_990}
    s = choose_max_batch(256, 1024, 160.0, _timer(times_160), slots_at=slots_160.get)
    assert s.max_batch == 1024 and "the limit 1024 fits" in s.describe()
    assert s.streams_carried(512) == pytest.approx(SERVED_RATE_SHARE * 512 * 160 / 13.2)
    assert s.streams_carried(1024) == 5_990
    whole = 512 * 160 / 13.2  # what the rule took before: more than 1,024 rows' slots
    assert whole > slots_160[1024] > s.streams_carried(512)
    # 560 ms (run 52): 256 rows in 14.8 ms beside 8,969 slots held 8,000 streams; 512 rows in
    # 24.5 ms would leave 7,822 slots. The share does not tip this one: 256 is kept.
    times_560 = {256: 14.8, 512: 24.5, 1024: 45.0}
    slots_560 = {256: 8_969, 512: 7_822, 1024: 5_700}
    s = choose_max_batch(256, 1024, 560.0, _timer(times_560), slots_at=slots_560.get)
    assert s.max_batch == 256 and "7822 slots beside a step of 512 rows" in s.describe()
    assert s.streams_carried(256) == pytest.approx(SERVED_RATE_SHARE * 256 * 560 / 14.8)
    assert s.streams_carried(256) < slots_560[256]  # the step, not the slots, bounds it here


def test_the_batch_measurement_counts_each_batchs_slots_with_max_streams_auto(monkeypatch):
    # The factory's wiring, on the CPU with the GPU's figures given: each probe held 1 GiB at its
    # peak (less its own slots), the device has 10 GiB free of 80. The slots beside each batch
    # are streams_for_memory's with that probe's bytes; a batch whose step carries more streams
    # than its slots and whose larger neighbour's slots are fewer stops the growth.
    import torch

    from engines import factory
    from engines.models import load_model

    model = load_model("builtin:tiny", 160)
    dev = torch.device("cpu")
    cfg = EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32", max_batch=8,
                       auto_max_streams=True)
    encoder, _ = factory.start_encoder_engine("eager", model, cfg, dev, torch.float32)
    per = factory.per_stream_state_bytes(model, encoder, cfg, dev, torch.float32)
    peak = {2: 1 * GIB, 4: 3 * GIB, 8: 9 * GIB}  # what each probe held at most, its slots included
    probing: list[int] = []
    original = factory._probe_step

    def probe(model, encoder, cfg, device, dtype, rows, give_up_ms):
        probing.append(rows)
        return original(model, encoder, cfg, device, dtype, rows, give_up_ms)

    monkeypatch.setattr(factory, "_probe_step", probe)
    monkeypatch.setattr(factory, "_reset_peak", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak[probing[-1]])
    monkeypatch.setattr(factory.StreamingEngine, "measure_step_ms",
                        lambda self, rows, timed_steps=3, give_up_ms=None: 0.001)
    monkeypatch.setattr(factory, "free_device_memory", lambda device: (30 * GIB, 80 * GIB))
    s = factory.measure_max_batch(model, encoder, cfg, dev, torch.float32, 2)
    expect = {b: streams_for_memory(30 * GIB, 80 * GIB, per, b, engine_bytes=peak[b] - b * per).fits_in_memory
              for b in (2, 4, 8)}
    assert dict(s.slots) == expect and expect[8] < expect[4] < 4 * 160 / 0.001 and 2 * 160 / 0.001 < expect[4]
    assert s.max_batch == 4, s.describe()  # 8 rows would carry more by the step, but leave fewer slots
    # without --max-streams auto the slots are not the server's to size: the step alone decides
    s = factory.measure_max_batch(model, encoder, dataclasses.replace(cfg, auto_max_streams=False), dev,
                                  torch.float32, 2)
    assert s.max_batch == 8 and s.slots == ()


def test_batch_sizing_round_trips_through_its_dict():
    s = choose_max_batch(256, 1024, 160.0, _timer({256: 5.0, 512: None}))
    assert BatchSizing.from_dict(s.as_dict()) == s
    with pytest.raises(ValueError):
        choose_max_batch(0, 1024, 160.0, _timer(per_row_ms=1.0))


def test_the_step_is_timed_on_a_real_engine(tiny_engine):
    # The measuring loop is the same on either device: whole steps of silent streams.
    ms = tiny_engine.measure_step_ms(4, timed_steps=2)
    assert ms > 0 and tiny_engine.slots_in_use() == 0
    with pytest.raises(ValueError):
        tiny_engine.measure_step_ms(tiny_engine.max_batch + 1)
    # a step over the give-up time ends the measuring after one timed step
    steps = []
    original = tiny_engine.step
    try:
        tiny_engine.step = lambda prepared: (steps.append(len(prepared.plan)), original(prepared))[1]
        tiny_engine.measure_step_ms(2, timed_steps=5, give_up_ms=0.0)
    finally:
        del tiny_engine.step
    assert steps == [2, 2, 2] and tiny_engine.slots_in_use() == 0


def test_the_measured_step_overlaps_its_preparation_as_serving_does(tiny_engine):
    # Served, a step is prepared while the one before it runs: the measurement takes the larger
    # of the two, not their sum. Each part made slow in turn sets the figure alone.
    prepare, step = tiny_engine.prepare, tiny_engine.step

    def slow(fn, seconds):
        def run(arg):
            time.sleep(seconds)
            return fn(arg)
        return run

    try:
        tiny_engine.prepare = slow(prepare, 0.25)
        prepare_bound = tiny_engine.measure_step_ms(2, timed_steps=2)
        tiny_engine.step = slow(step, 0.4)
        step_bound = tiny_engine.measure_step_ms(2, timed_steps=2)
    finally:
        del tiny_engine.prepare, tiny_engine.step
    assert 250 <= prepare_bound < 400, prepare_bound
    assert 400 <= step_bound < 650, step_bound  # the sum would be at least 650
    assert tiny_engine.slots_in_use() == 0


def test_the_factory_measures_the_batch_and_rebuilds_the_encoder_for_it(monkeypatch):
    # The GPU's path, run on the CPU: encoder built for the largest batch tried, the step timed
    # there, the encoder rebuilt for a smaller choice, the engine and its report at the choice.
    from engines import factory

    monkeypatch.setattr(factory, "MEASURE_BATCH_ON_CPU", True)
    built: list[int] = []
    original_start = factory.start_encoder_engine

    def start(name, model, cfg, device, dtype):
        encoder, check = original_start(name, model, cfg, device, dtype)
        encoder.max_batch = cfg.max_batch  # as the graph engines have: buckets up to it
        built.append(cfg.max_batch)
        return encoder, check

    monkeypatch.setattr(factory, "start_encoder_engine", start)
    timed: list[int] = []

    def step_ms(self, rows, timed_steps=3, give_up_ms=None):
        timed.append(rows)
        return 1.0 if rows <= 4 else 1e6  # 4 rows fit, 8 do not

    monkeypatch.setattr(factory.StreamingEngine, "measure_step_ms", step_ms)
    cfg = EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32",
                       **engine_sizing_kwargs(16, None))
    engine = factory.build_engine(cfg)
    # default min(32, 16 slots) = 16 is too slow: halving to 4
    assert timed == [16, 8, 4] and built == [16, 4]
    assert (engine.capacity, engine.max_batch) == (16, 4)
    report = engine.startup_report.as_dict()
    assert report["batch_sizing"]["max_batch"] == 4 and report["batch_sizing"]["limit"] == 16
    assert report["details"]["engine"] == "eager" and engine.slots_in_use() == 0
    # an explicit --max-batch measures nothing
    timed.clear()
    built.clear()
    engine = factory.build_engine(EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32",
                                               **engine_sizing_kwargs(16, 8)))
    assert timed == [] and built == [8] and engine.max_batch == 8
    assert engine.startup_report.batch_sizing is None


def test_the_sizing_lines_say_how_the_batch_was_chosen():
    s = choose_max_batch(256, 1024, 560.0, _timer(H200_560))
    sizing = streams_for_memory(130 * GIB, 140 * GIB, NEMOTRON_FAST_SLOT, s.max_batch)
    gpu = SimpleNamespace(capacity=sizing.max_streams, max_batch=s.max_batch, startup_report={
        "device": "cuda:0", "sizing": sizing.as_dict(), "batch_sizing": s.as_dict()})
    _, lines = resolve_frontends(1, gpu, True, True)
    assert "max batch 512 (auto: measured step time)" in lines[0]
    assert lines[-1].startswith("max batch from the step time: max batch 512") and "1024: 44.9 ms" in lines[-1]
    _, lines = resolve_frontends(1, _engine("cpu"), True, True)
    assert "max batch 32 (auto: the fixed default)" in lines[0] and len(lines) == 1


async def test_a_real_server_reports_its_measured_batch():
    # A real server process (builtin:tiny on the CPU, its engine in a worker process) with the
    # measuring turned on as on a GPU: its sizing lines carry the measured choice and ListModels
    # serves the same cap. The figures themselves are this host's, so only their agreement is
    # asserted.
    import asyncio
    import re

    import grpc

    from proto import asr_stream_pb2 as pb
    from proto import asr_stream_pb2_grpc as pb_grpc
    from tests.server_harness import spawn_server

    proc, match, lines = await spawn_server(
        "--engine-factory", "tests.measuring_factory:build", "--model", "builtin:tiny", "--device", "cpu",
        "--host", "127.0.0.1", "--port", "0", "--no-metrics", "--max-streams", "8")
    try:
        text = "".join(lines)
        sizing = re.search(r"sizing: .*max batch (\d+) \(auto: measured step time\)", text)
        measured = re.search(r"max batch from the step time: max batch (\d+) .*step time by batch (.*); a step may "
                             r"take 80\.0 ms, 0\.5 of the 160 ms chunk", text)
        assert sizing and measured, text
        chosen = int(sizing.group(1))
        assert int(measured.group(1)) == chosen and 1 <= chosen <= 8
        tried = [int(b) for b in re.findall(r"(\d+): ", measured.group(2))]
        assert tried[0] == 8 and (chosen in tried or chosen == 1)
        # --decode-stream auto timed both ways at the chosen batch (the 8 slots allow 4 rows: two
        # steps in flight hold different streams)
        decode = re.search(r"decode stream: (on|off) \(measured: [^)]*\): a pipelined step of (\d+) rows took "
                           r"([\d.]+) ms with it and ([\d.]+) ms without, ([\d.]+)x", text)
        assert decode, text
        assert int(decode.group(2)) == min(chosen, 4) and float(decode.group(3)) > 0 and float(decode.group(4)) > 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{match.group(1)}") as channel:
            model = (await pb_grpc.SpeechRecognitionStub(channel).ListModels(pb.ListModelsRequest())).models[0]
        assert (model.max_batch, model.max_streams) == (chosen, 8)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 60)


def test_overlap_at_reaches_the_scheduler_and_is_checked():
    from server.service.cli import build_settings
    assert build_settings(parse_args([])).scheduler.overlap_at == SchedulerConfig.overlap_at
    assert build_settings(parse_args(["--overlap-at", "0.3"])).scheduler.overlap_at == 0.3
    with pytest.raises(ValueError):
        build_settings(parse_args(["--overlap-at", "-1"]))
