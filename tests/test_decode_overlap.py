"""`--decode-stream auto` (engines.decode_overlap, engines.capacity.decide_decode_stream): the
choice from the timings of both modes, and the start-up's timing over a real engine.

On the CPU there is no CUDA stream, so the engine's "on" only begins the next step at QUEUED
(StreamingEngine.set_decode_stream); these tests check the decision, the stepping, the slots and
the report. Whether the stream pays is the GPU's to measure (tests/gpu, bench/pipeline_bench.py).
"""

from __future__ import annotations

import re

import pytest

from engines.api import DEVICE_DONE, QUEUED
from engines.capacity import MIN_DECODE_STREAM_GAIN, DecodeStreamChoice, decide_decode_stream
from engines.config import EngineConfig


# -- the decision ---------------------------------------------------------------------------------

def test_the_stream_is_kept_only_where_it_gains_clearly():
    # run 36 on an H100: 160 ms at 256 rows, the better of two repeats each
    fast = decide_decode_stream([11.59, 12.4], [9.90, 10.8], rows=256)
    assert fast.on and fast.speedup == pytest.approx(11.59 / 9.90) and "faster" in fast.reason
    # 560 ms at 256 rows: the stream loses
    slow = decide_decode_stream([21.91, 22.3], [37.61, 38.0], rows=256)
    assert not slow.on and "slower" in slow.reason
    # a gain inside the noise keeps one stream
    near = decide_decode_stream([10.0], [10.0 / (MIN_DECODE_STREAM_GAIN - 0.01)], rows=8)
    assert not near.on and "too little" in near.reason
    at = decide_decode_stream([10.0], [10.0 / MIN_DECODE_STREAM_GAIN], rows=8)
    assert at.on


def test_a_decode_stream_whose_repeats_swing_is_not_kept():
    """Run 37 on an H100, 160 ms at 256 rows: one repeat with the decode stream 1.19x faster,
    the other 2.4x slower. The better repeats alone would keep it; every repeat must gain."""
    swing = decide_decode_stream([12.28, 11.85], [23.93, 9.98], rows=256)
    assert swing.speedup == pytest.approx(11.85 / 9.98) and swing.worst_speedup == pytest.approx(11.85 / 23.93)
    assert not swing.on and "unsteady" in swing.reason
    text = swing.describe()
    assert text.startswith("off (measured: unsteady") and "1.19x; its slower repeat 23.93 ms, 0.50x" in text
    # the start-up line keeps the shape the serving tests read (tests/test_auto_config.py, the GPU suite)
    assert re.search(r"^off \(measured: [^)]*\): a pipelined step of 256 rows took 9.98 ms with it and "
                     r"11.85 ms without, 1.19x", text), text
    # both repeats clear the margin, the slower one only just
    steady = decide_decode_stream([11.85, 12.28], [9.98, 11.85 / MIN_DECODE_STREAM_GAIN], rows=256)
    assert steady.on
    assert not decide_decode_stream([11.85, 12.28], [9.98, 11.85 / (MIN_DECODE_STREAM_GAIN - 0.01)], rows=256).on


def test_the_choice_round_trips_and_says_what_it_rests_on():
    choice = decide_decode_stream([11.59, 12.4], [9.90, 10.8], rows=256)
    assert DecodeStreamChoice.from_dict(choice.as_dict()) == choice
    text = choice.describe()
    assert text.startswith("on (measured: faster") and "256 rows" in text and "9.90 ms with it" in text \
        and "11.59 ms without" in text and "1.17x" in text
    unmeasured = DecodeStreamChoice(on=False, reason="auto: no CUDA device, one stream")
    assert unmeasured.speedup is None and unmeasured.describe() == "off (auto: no CUDA device, one stream)"
    assert DecodeStreamChoice.from_dict(unmeasured.as_dict()) == unmeasured


# -- the timing over a real engine ------------------------------------------------------------------

def _engine(decode_stream: str = "on", max_streams: int = 8, max_batch: int = 4):
    from engines.factory import build_engine

    return build_engine(EngineConfig(model="builtin:tiny", engine="eager", device="cpu", dtype="float32",
                                     max_streams=max_streams, max_batch=max_batch, decode_stream=decode_stream))


def test_switching_the_mode_sets_the_stage_the_next_step_begins_at():
    engine = _engine()
    assert engine.decode_stream is None and engine.next_at == DEVICE_DONE  # no stream on the CPU
    engine.set_decode_stream(True)
    assert engine.next_at == QUEUED and engine.decode_stream is None
    engine.set_decode_stream(False)
    assert engine.next_at == DEVICE_DONE


def test_timing_both_modes_leaves_the_engine_in_the_chosen_one_with_every_slot_free():
    from engines.decode_overlap import measure_decode_stream, time_mode, timing_clips

    engine = _engine()
    choice = measure_decode_stream(engine, rows=4, timed_steps=3, repeats=2)
    assert choice.rows == 4 and len(choice.one_stream_ms) == len(choice.decode_stream_ms) == 2
    assert all(ms > 0 for ms in choice.one_stream_ms + choice.decode_stream_ms)
    assert choice == decide_decode_stream(list(choice.one_stream_ms), list(choice.decode_stream_ms), 4)
    assert engine.next_at == (QUEUED if choice.on else DEVICE_DONE)
    assert engine.slots_in_use() == 0
    # both modes decode the same tokens from the timing's speech-like clips (not silence)
    ring = timing_clips(engine, 4 + 4)
    _, _, early = time_mode(engine, ring, 4, True, timed_steps=4)
    _, _, late = time_mode(engine, ring, 4, False, timed_steps=4)
    assert early == late and any(t for step in early for t in step), "nothing decoded: the comparison is vacuous"
    assert engine.slots_in_use() == 0
    # two steps in flight hold different streams: 2 x rows free slots, or nothing is timed
    with pytest.raises(ValueError, match="needs 10 free slots"):
        measure_decode_stream(engine, rows=5)
    held = engine.acquire_slot()
    with pytest.raises(ValueError, match="needs 8 free slots; 7 are free"):
        measure_decode_stream(engine, rows=4)
    engine.release_slot(held)


def test_the_factory_decides_once_and_reports_it(monkeypatch):
    from engines import factory

    # the CPU, as served: auto is one stream, unmeasured
    engine = _engine("auto")
    assert engine.next_at == DEVICE_DONE
    assert engine.startup_report.as_dict()["decode_stream"] == {
        "on": False, "reason": "auto: no CUDA device, one stream", "rows": 0, "one_stream_ms": [], "decode_stream_ms": []}
    assert _engine("on").startup_report.decode_stream["reason"] == "--decode-stream on: no CUDA device, one stream"
    assert _engine("off").startup_report.decode_stream["reason"] == "--decode-stream off"
    # measured, as on a GPU: at the max batch, or at half the slots when fewer
    monkeypatch.setattr(factory, "MEASURE_DECODE_STREAM_ON_CPU", True)
    for max_streams, max_batch, rows in ((8, 4, 4), (6, 4, 3)):
        engine = _engine("auto", max_streams=max_streams, max_batch=max_batch)
        report = DecodeStreamChoice.from_dict(engine.startup_report.as_dict()["decode_stream"])
        assert report.rows == rows and report.speedup is not None and report.reason.startswith("measured")
        assert engine.next_at == (QUEUED if report.on else DEVICE_DONE) and engine.slots_in_use() == 0
    # one slot: nothing to time two steps with
    engine = _engine("auto", max_streams=1, max_batch=1)
    assert engine.startup_report.decode_stream["reason"] == "auto: one slot, nothing to time two steps with"
