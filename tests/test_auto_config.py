"""`auto` sizing: slots from device memory and the batch cap (engines/capacity.py, decided in the
engine process), the frontend count and the flags (server/service/auto_config.py). The decisions are
pure functions, checked with given memory and CPU figures; the factory's measuring is checked
on the CPU with the real tiny model (its CUDA memory queries replaced by given figures: no GPU
here); the CLI's parsing and its explicit values as overrides."""

from __future__ import annotations

import argparse
import dataclasses
from types import SimpleNamespace

import pytest

from engines.capacity import (GPU_MAX_BATCH, HEADROOM_FRACTION, MAX_AUTO_STREAMS, STEP_STATE_COPIES, StreamSizing,
                              auto_max_batch, streams_for_memory)
from engines.config import EngineConfig
from server.service.auto_config import (CORES_PER_FRONTEND, ENGINE_CORES, MAX_AUTO_FRONTENDS, auto_frontends,
                                cgroup_cpu_limit, engine_sizing_kwargs, int_or_auto, resolve_frontends, usable_cpus)
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


def test_auto_on_the_cpu_keeps_the_fixed_defaults():
    from engines.factory import build_engine

    cfg = EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32",
                       **engine_sizing_kwargs(None, None))
    assert cfg.auto_max_streams and cfg.auto_max_batch
    engine = build_engine(cfg)
    assert (engine.capacity, engine.max_batch) == (EngineConfig.max_streams, EngineConfig.max_batch) == (64, 32)
    report = engine.startup_report.as_dict()
    assert report["device"] == "cpu" and report["sizing"] is None


# -- frontends ------------------------------------------------------------------------------------

def test_frontends_from_the_cpu_count():
    assert [auto_frontends(c, on_gpu=False) for c in (1, 2, 16, 64)] == [1, 1, 1, 1]
    assert auto_frontends(2, on_gpu=True) == 1
    assert auto_frontends(4, on_gpu=True) == 1
    assert auto_frontends(ENGINE_CORES + 2 * CORES_PER_FRONTEND, on_gpu=True) == 2     # 8 cores
    assert auto_frontends(16, on_gpu=True) == 4                                          # the H200 host
    assert auto_frontends(128, on_gpu=True) == MAX_AUTO_FRONTENDS
    # several engine cores: one more reserved core per extra engine worker, and a cap per core
    assert auto_frontends(16, on_gpu=True, engine_cores=2) == 4                          # (16 - 3) // 3
    assert auto_frontends(32, on_gpu=True, engine_cores=2) == 2 * MAX_AUTO_FRONTENDS     # 9 capped to 8
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
    assert frontends == 4
    assert "device cuda:0, max streams 4608 (auto: from device memory), max batch 256 (auto), frontends 4" in lines[0]
    assert "16 usable cores" in lines[0] and "limited by the cap" in lines[1]
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


def test_a_bad_value_is_refused():
    with pytest.raises(argparse.ArgumentTypeError):
        int_or_auto("many")
    with pytest.raises(SystemExit):
        parse_args(["--max-streams", "many"])
