"""asr-loadgen with calls of several utterances: time to final and client end-of-utterance to
final. Against a real server on loopback with the fake engine, whose endpointer is exact (a
chunk of exact zeros after speech ends the utterance, tests/fake_engine.py), so the earliest
moment each final can exist is known from the audio: the matching of finals to utterances and
the time origin are checked against it, never a timing target. The accounting itself runs on
made-up times.
"""

from __future__ import annotations

import json
import math
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from client.loadgen import amain, parse_args
from client.loadgen_audio import AudioItem, AudioSpec
from client.loadgen_run import (Final, LevelSpec, RunOptions, StreamRecord, _account_utterances, _Prepared,
                                _ShareStats, prepare, run_share)
from tests.fake_engine import fake_geometry
from tests.server_harness import FAKE, RATE, make_engine, pcm16_audio, running_server

CHUNK_MS = 160.0
PAUSE_S = 0.6   # holds a whole chunk of zeros (the fake engine's endpoint) wherever the speech ends


def _speech_wav(path: Path, seed: int, n: int) -> None:
    clip = pcm16_audio(seed, n)
    clip[np.abs(clip) < 1000] = 1000  # loud throughout: the speech ends at the clip's last sample
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(clip.astype("<i2").tobytes())


@pytest.fixture
def clips(tmp_path: Path) -> Path:
    d = tmp_path / "clips"
    d.mkdir()
    for i, n in enumerate((RATE + 1234, RATE // 2 + 555, RATE + RATE // 3)):
        _speech_wav(d / f"c{i}.wav", 70 + i, n)
    return d


def earliest_final_s(speech_end: int, ends: list[int]) -> float:
    """Seconds of audio from the end of speech (sample speech_end) to the message that completes
    the fake engine's first chunk of zeros after it: no final can come sooner when the audio is
    paced in real time."""
    g = fake_geometry(160)
    k = 0
    while k * g.chunk_samples + g.wait_samples < speech_end:  # chunk k spans [k C + w, (k + 1) C + w)
        k += 1
    need = g.samples_needed(k)
    completes = next(e for e in ends if e >= need)
    return (completes - speech_end) / RATE


def test_calls_join_clips_with_pauses_and_know_where_speech_ends(clips):
    items = AudioSpec(paths=(str(clips),), utterances=4, pause_s=PAUSE_S).load()
    singles = AudioSpec(paths=(str(clips),)).load()
    assert len(items) == 3 and [i.name for i in items][0].startswith("call-000-c0")
    pause = int(PAUSE_S * RATE)
    call = items[1]  # clips 1, 2, 0, 1
    order = [singles[1], singles[2], singles[0], singles[1]]
    at = 0
    for (lo, hi), clip in zip(call.speech, order):
        assert (lo, hi) == (at, at + clip.n_samples)
        assert call.data[2 * lo:2 * hi] == clip.data and call.data[2 * hi:2 * (hi + pause)] == bytes(2 * pause)
        at = hi + pause
    assert call.n_samples == at
    # The end_utterance request follows the message whose audio has played by then, never one
    # before the speech's last sample.
    (prep,) = prepare([call], CHUNK_MS, client_eou_ms=200)
    step = int(RATE * CHUNK_MS / 1000)
    for k, (lo, hi) in enumerate(call.speech):
        assert prep.speech_end_msg[k] == (hi - 1) // step
        assert prep.eou_due_s[k] == pytest.approx(hi / RATE + 0.2)
        assert prep.eou_after_msg[k] == max(prep.speech_end_msg[k], int((hi + 0.2 * RATE) // step) - 1)


def test_long_streams_repeat_calls_whole_with_their_speech_windows(clips):
    calls = AudioSpec(paths=(str(clips),), utterances=2, pause_s=PAUSE_S).load()
    longer = AudioSpec(paths=(str(clips),), utterances=2, pause_s=PAUSE_S, stream_seconds=5.0).load()
    assert len(longer) == 3
    for k, item in enumerate(longer):
        # calls k, k + 1, ... until 5 s: never cut inside an utterance, so at least 5 s
        parts, at, speech = [], 0, []
        while at < 5 * RATE:
            call = calls[(k + len(parts)) % 3]
            speech += [(lo + at, hi + at) for lo, hi in call.speech]
            parts.append(call.data)
            at += call.n_samples
        assert item.data == b"".join(parts) and item.speech == tuple(speech) and item.seconds >= 5.0
        assert item.n_samples - calls[(k + len(parts) - 1) % 3].n_samples < 5 * RATE


def test_finals_are_matched_to_utterances_by_window_and_time():
    item = AudioItem("x", b"", RATE, "PCM16")
    ends = [0.5 * (j + 1) for j in range(14)]
    # utterance 0's speech ends 0.2 s before its message does: paced in real time, its last
    # speech sample played 0.2 s before the message went out
    prep = _Prepared(item, [], ends, speech_s=[(0.5, 1.8), (3.0, 4.0), (5.0, 6.0)], speech_end_msg=[3, 7, 11])
    sent = [100.0 + e for e in ends]
    finals = [Final(101.5, 0.5, 1.2, 0, "endpoint", "a"),      # split off before the speech ended: extra
              Final(102.4, 1.3, 1.9, 1, "endpoint", "b"),      # utterance 0: 102.4 - (sent[3] - 0.2) = 0.6 s
              Final(106.5, 3.1, 5.9, 2, "endpoint", "c d"),    # utterance 2 (1 ran into it: missed)
              Final(107.0, 6.2, 6.5, 3, "end_of_audio", "e")]  # noise in the last pause: extra
    rec, stats = StreamRecord(0, "x", 7.0), _ShareStats()
    _account_utterances(rec, finals, sent, [], prep, stats)
    assert stats.time_to_final_ms == pytest.approx([600.0, 500.0])
    # Not paced in real time: from the message's send time.
    rec, stats = StreamRecord(0, "x", 7.0), _ShareStats()
    _account_utterances(rec, finals, sent, [], prep, stats, realtime=False)
    assert stats.time_to_final_ms == pytest.approx([400.0, 500.0])
    rec, stats = StreamRecord(0, "x", 7.0), _ShareStats()
    _account_utterances(rec, finals, sent, [], prep, stats)
    assert (rec.utterances, rec.finals, rec.missed, rec.extra_finals) == (3, 4, 1, 2)
    assert rec.end_reasons == {"endpoint": 2} and stats.eou_to_final_ms == []
    # Client end of utterance: measured from the request to a final it closed; a final the
    # endpointer closed first is counted apart.
    finals[1] = Final(102.4, 1.3, 1.9, 1, "client", "b")
    rec, stats = StreamRecord(0, "x", 7.0), _ShareStats()
    _account_utterances(rec, finals, sent, [102.25, math.nan, 106.2], prep, stats)
    assert stats.eou_to_final_ms == pytest.approx([150.0]) and rec.eou_preempted == 1
    assert rec.end_reasons == {"client": 1, "endpoint": 1}
    # Utterances never sent (the call failed first) are not missed.
    rec, stats = StreamRecord(0, "x", 7.0, code="UNAVAILABLE"), _ShareStats()
    _account_utterances(rec, finals[:2], sent[:5] + [math.nan] * 9, [], prep, stats)
    assert rec.missed == 0 and stats.time_to_final_ms == pytest.approx([600.0])


@pytest.mark.asyncio
async def test_time_to_final_is_measured_from_the_last_speech_message(clips):
    """One real-time call: each utterance's final is the endpointer's, and its time to final is
    never below the audio the fake engine must receive before it can end the utterance."""
    engine = make_engine(FAKE)
    items = AudioSpec(paths=(str(clips),), utterances=3, pause_s=PAUSE_S).load()[:1]
    prepared = prepare(items, CHUNK_MS)
    item, (prep,) = items[0], prepared
    _, ends = item.messages(CHUNK_MS)
    async with running_server(engine) as server:
        opts = RunOptions(target=f"127.0.0.1:{server.port}", chunk_ms=CHUNK_MS, interim=True,
                          endpointing=(("stop_history_ms", 320),))
        level = LevelSpec(1, 0.0, time.time() + 0.05, 60.0)
        share = await run_share(level, 0, 1, prepared, opts)
    (rec,) = share.streams
    assert rec.code == "OK" and not rec.anomalies
    assert (rec.utterances, rec.missed, rec.end_reasons) == (3, 0, {"endpoint": 3})
    assert len(share.time_to_final_ms) == 3
    for (lo, hi), ttf in zip(item.speech, share.time_to_final_ms):
        assert ttf >= 1e3 * earliest_final_s(hi, ends) - 5.0, (hi, ttf)
    assert share.chunk_latency_ms and len(share.chunk_latency_ms) == len(prep.requests)
    assert engine.slots_in_use() == 0


@pytest.mark.asyncio
async def test_report_with_endpointing_client_eou_and_without(clips, tmp_path):
    engine = make_engine(FAKE)
    async with running_server(engine) as server:
        async def run(*extra: str) -> dict:
            out = tmp_path / f"r{len(extra)}.json"
            args = parse_args(["--server", f"127.0.0.1:{server.port}", "--audio", str(clips), "--concurrency", "2",
                               "--ramp-s", "0.1", "--json", str(out), "--quiet", *extra])
            assert await amain(args) == 0
            return json.loads(out.read_text())

        endpointed = await run("--utterances", "3", "--pause-s", str(PAUSE_S))
        client_eou = await run("--utterances", "3", "--pause-s", str(PAUSE_S), "--client-eou-ms", "150",
                               "--no-endpointing")
        plain = await run()
        long_calls = await run("--utterances", "2", "--pause-s", str(PAUSE_S), "--stream-seconds", "5")
    (lv,) = endpointed["levels"]
    assert endpointed["settings"]["endpointing"]["stop_history_ms"] == 320
    u = lv["utterances"]
    assert (u["sent"], u["with_final"], u["missed"], u["end_reasons"]) == (6, 6, 0, {"endpoint": 6})
    assert u["time_to_final_ms"]["count"] == 6 and u["time_to_final_ms"]["min"] > 0
    assert u["eou_to_final_ms"]["count"] == 0 and u["finals_per_stream"]["min"] >= 3
    assert lv["streams_completed"] == 2 and lv["anomaly_count"] == 0 and lv["messages_uncovered"] == 0
    (lv,) = client_eou["levels"]
    u = lv["utterances"]
    assert client_eou["settings"]["endpointing"] is None and client_eou["settings"]["client_eou_ms"] == 150
    assert (u["sent"], u["missed"], u["eou_preempted"], u["end_reasons"]) == (6, 0, 0, {"client": 6})
    assert u["eou_to_final_ms"]["count"] == 6 and u["eou_to_final_ms"]["min"] >= 0
    assert u["time_to_final_ms"]["count"] == 6
    # Without the new flags: the report as before.
    (lv,) = plain["levels"]
    assert "utterances" not in lv and plain["settings"]["utterances"] == 0
    assert lv["anomaly_count"] == 0 and lv["final_latency_ms"]["count"] == 2
    # Long streams of calls: every utterance of the repeated calls is accounted for.
    (lv,) = long_calls["levels"]
    items = AudioSpec(paths=(str(clips),), utterances=2, pause_s=PAUSE_S, stream_seconds=5.0).load()
    u = lv["utterances"]
    assert long_calls["settings"]["stream_seconds"] == 5.0
    assert (u["sent"], u["with_final"], u["missed"]) == (sum(len(i.speech) for i in items[:2]),) * 2 + (0,)
    assert lv["chunk_latency_ms"]["count"] == sum(len(i.messages(CHUNK_MS)[0]) for i in items[:2])
    assert engine.slots_in_use() == 0
