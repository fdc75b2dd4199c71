"""asr-loadgen: against a real server on loopback (builtin:tiny, eager, CPU) for the report's
structure and counts, errors by status code, worker processes and the capacity search; and its
pure parts (response-to-message accounting, audio input, bisection) without a server.

Timings are never asserted: only counts, structure, signs, and arithmetic on made-up times.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from client.loadgen import amain, capacity_search, parse_args
from client.loadgen_audio import AudioSpec, expand_paths, read_wav
from client.loadgen_report import level_passes, merge_level
from client.loadgen_run import ShareResult, StreamRecord, _account, _Responses, _ShareStats
from client.synth_audio import synth_speechlike
from proto import asr_stream_pb2 as pb
from tests.server_harness import REAL_TINY, make_engine, running_server, stub_for

ROOT = Path(__file__).resolve().parents[1]
CHUNK_MS = 160.0  # builtin:tiny at its default lookahead


def _write_wav(path: Path, pcm: np.ndarray, rate: int, channels: int = 1) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype("<i2").tobytes())


@pytest.fixture
def wav_dir(tmp_path: Path) -> Path:
    d = tmp_path / "audio"
    d.mkdir()
    _write_wav(d / "a16k.wav", synth_speechlike(1.3, seed=1, sample_rate=16000), 16000)
    _write_wav(d / "b8k.wav", synth_speechlike(0.9, seed=2, sample_rate=8000), 8000)  # resampled by the server
    return d


def _messages(path: Path) -> int:
    item = read_wav(str(path))
    return len(item.messages(CHUNK_MS)[0])


def _check_level(level: dict, concurrency: int, messages: int) -> None:
    assert level["concurrency"] == level["streams_requested"] == concurrency
    assert level["streams_completed"] == concurrency
    assert level["errors"] == {} and level["anomaly_count"] == 0 and level["messages_uncovered"] == 0
    chunk = level["chunk_latency_ms"]
    assert chunk["count"] == messages  # one latency per audio message sent
    assert chunk["min"] > 0 and chunk["p50"] <= chunk["p90"] <= chunk["p95"] <= chunk["p99"] <= chunk["max"]
    for key in ("first_partial_ms", "final_latency_ms", "rtf"):
        assert level[key]["count"] == concurrency and level[key]["min"] > 0, key
    assert level["response_latency_ms"]["count"] > 0 and level["response_latency_ms"]["min"] >= 0
    assert level["throughput"]["audio_s"] > 0 and level["throughput"]["rtfx"] > 0
    lg = level["loadgen"]
    assert lg["workers"] == len(lg["pids"]) == len(lg["cpu_util"]) and isinstance(lg["bottleneck"], bool)
    assert lg["loop_lag_ms"]["count"] > 0


async def test_sweep_counts_structure_and_transcripts(tiny_engine, wav_dir, tmp_path):
    out, dump = tmp_path / "report.json", tmp_path / "transcripts.jsonl"
    files = sorted(wav_dir.glob("*.wav"))
    async with running_server(tiny_engine) as server, stub_for(server) as stub:
        args = parse_args([
            "--server", f"127.0.0.1:{server.port}", "--audio", str(wav_dir), "--concurrency", "1,3",
            "--ramp-s", "0.2", "--cooldown-s", "0", "--json", str(out), "--dump-transcripts", str(dump),
            "--metrics-url", f"http://127.0.0.1:{server.metrics_port}/metrics", "--quiet"])
        assert await amain(args) == 0
        # The server's own transcript of each file, in one unary call.
        expected = {}
        for f in files:
            response = await stub.Recognize(pb.RecognizeRequest(config=pb.RecognitionConfig(), audio=f.read_bytes()))
            expected[f.name] = response.result.transcript
    report = json.loads(out.read_text())
    assert report["tool"] == "asr-loadgen" and report["server"]["engine"] == "eager"
    assert report["settings"]["chunk_ms"] == CHUNK_MS and report["settings"]["audio_items"] == 2
    assert report["capacity"] is None and set(report["definitions"]) >= {"chunk_latency_ms", "final_latency_ms"}
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 3]
    per_file = [_messages(f) for f in files]  # stream i plays file i % 2
    for level in report["levels"]:
        c = level["concurrency"]
        _check_level(level, c, sum(per_file[i % 2] for i in range(c)))
        sm = level["server_metrics"]
        assert sm["steps"] > 0 and set(sm["steps_by_engine"]) == {"eager"} and sm["mean_batch"] >= 1
        assert sm["gc_full_collections"] >= 0 and sm["gc_pause_ms_total"] >= 0  # the GC pause metric is read
        assert level["server_engine"] == "eager" and level["engine_executions_after"]["eager"] > 0
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [(d["concurrency"], d["stream"]) for d in lines] == [(1, 0), (3, 0), (3, 1), (3, 2)]
    for d in lines:
        assert d["status"] == "OK" and d["audio"] == files[d["stream"] % 2].name
        assert d["transcript"] == expected[d["audio"]], d


async def test_refused_streams_are_counted_by_status_code(tmp_path):
    engine = make_engine(REAL_TINY, capacity=2, max_batch=2)
    out = tmp_path / "report.json"
    async with running_server(engine) as server:
        # The refused streams' clients (grpc.aio) are still sending, in real time, when refused:
        # the server reads what they send until they half-close, for up to 2 s, so that the
        # status is what they see (grpc/grpc#36066). 1 s of audio leaves a second of margin on
        # a loaded machine.
        args = parse_args(["--server", f"127.0.0.1:{server.port}", "--concurrency", "5", "--ramp-s", "0",
                           "--synthetic-clips", "1", "--synthetic-seconds", "1.0", "--json", str(out), "--quiet"])
        assert await amain(args) == 0
    (level,) = json.loads(out.read_text())["levels"]
    assert level["errors"] == {"RESOURCE_EXHAUSTED": 3} and level["streams_completed"] == 2
    assert "slots" in level["error_examples"]["RESOURCE_EXHAUSTED"]
    assert not level_passes(level, target_ms=1e9)
    assert level["final_latency_ms"]["count"] == 2
    assert engine.slots_in_use() == 0


async def test_worker_processes_no_realtime_and_capacity_search(tiny_engine, tmp_path):
    out, dump = tmp_path / "report.json", tmp_path / "t.jsonl"
    async with running_server(tiny_engine) as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "client.loadgen", "--server", f"127.0.0.1:{server.port}", "--workers", "2",
            "--no-realtime", "--capacity", "--target-ms", "1e7", "--start-concurrency", "2",
            "--max-concurrency", "4", "--synthetic-clips", "3", "--synthetic-seconds", "1.0", "--ramp-s", "0.1",
            "--cooldown-s", "0", "--json", str(out), "--dump-transcripts", str(dump), "--quiet",
            cwd=str(ROOT), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        stdout, _ = await asyncio.wait_for(proc.communicate(), timeout=240)
    assert proc.returncode == 0, stdout.decode()
    report = json.loads(out.read_text())
    cap = report["capacity"]
    assert cap["capacity"] == 4 and cap["probes"] == [2, 4] and cap["limited_by_max_concurrency"]
    assert not report["settings"]["realtime"]
    item_messages = len(AudioSpec(synthetic_clips=3, synthetic_seconds=1.0).load()[0].messages(CHUNK_MS)[0])
    for level in report["levels"]:
        _check_level(level, level["concurrency"], level["concurrency"] * item_messages)
        pids = level["loadgen"]["pids"]
        assert len(set(pids)) == 2 and proc.pid not in pids and level["loadgen"]["send_lateness_ms"] is None
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(lines) == 6 and all(d["status"] == "OK" for d in lines)
    by_audio = {}
    for d in lines:  # the same audio gives the same transcript whichever worker sent it
        assert by_audio.setdefault(d["audio"], d["transcript"]) == d["transcript"]


async def test_long_streams_play_their_clips_back_to_back_for_the_length_asked(tiny_engine, tmp_path):
    """--stream-seconds: each stream lasts that much audio (clips cycled, cut at the length), paced
    in real time, with one chunk latency per message; the server hears exactly that audio."""
    seconds, out, dump = 3.0, tmp_path / "report.json", tmp_path / "t.jsonl"
    spec = AudioSpec(synthetic_clips=2, synthetic_seconds=1.1, stream_seconds=seconds)
    items = spec.load()
    async with running_server(tiny_engine) as server, stub_for(server) as stub:
        args = parse_args(["--server", f"127.0.0.1:{server.port}", "--concurrency", "2", "--synthetic-clips", "2",
                           "--synthetic-seconds", "1.1", "--stream-seconds", str(seconds), "--ramp-s", "0.1",
                           "--cooldown-s", "0", "--json", str(out), "--dump-transcripts", str(dump), "--quiet"])
        assert await amain(args) == 0
        expected = {}
        for item in items:
            wav = tmp_path / f"{item.name}.wav"
            _write_wav(wav, np.frombuffer(item.data, "<i2"), item.sample_rate)
            response = await stub.Recognize(pb.RecognizeRequest(config=pb.RecognitionConfig(), audio=wav.read_bytes()))
            expected[item.name] = response.result.transcript
        # The time budget counts a level's whole audio: a second level of 3 s streams cannot end
        # inside 4 s once the first has run (it would have started under "no new level after").
        budgeted = tmp_path / "budget.json"
        args = parse_args(["--server", f"127.0.0.1:{server.port}", "--concurrency", "1,2", "--synthetic-clips", "1",
                           "--synthetic-seconds", "1.1", "--stream-seconds", str(seconds), "--ramp-s", "0.1",
                           "--cooldown-s", "0", "--time-budget-s", "4", "--json", str(budgeted), "--quiet"])
        assert await amain(args) == 0
    short = json.loads(budgeted.read_text())
    assert [lv["concurrency"] for lv in short["levels"]] == [1] and short["levels_skipped_for_time"] == [2]
    report = json.loads(out.read_text())
    assert report["settings"]["stream_seconds"] == seconds and report["settings"]["audio_items"] == 2
    assert report["settings"]["audio_seconds_total"] == pytest.approx(2 * seconds)
    (level,) = report["levels"]
    per_stream = math.ceil(seconds * 1000 / CHUNK_MS)  # 19 messages of 160 ms for 3 s
    _check_level(level, 2, 2 * per_stream)
    assert level["throughput"]["audio_s"] == pytest.approx(2 * seconds)
    # Paced in real time: the last message of a stream goes out at least S - one message after
    # its first, so no stream can finish in much less than S seconds of wall time.
    assert level["rtf"]["min"] >= (seconds - CHUNK_MS / 1000) / seconds
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [d["audio"] for d in lines] == [i.name for i in items]
    for d in lines:
        assert d["status"] == "OK" and d["transcript"] == expected[d["audio"]], d


def test_long_streams_cycle_clips_and_cut_at_the_length():
    clips = AudioSpec(synthetic_clips=3, synthetic_seconds=0.5).load()
    items = AudioSpec(synthetic_clips=3, synthetic_seconds=0.5, stream_seconds=1.7).load()
    assert [i.n_samples for i in items] == [int(1.7 * 16000)] * 3 and all(not i.speech for i in items)
    # Stream 1 plays clips 1, 2, 0, 1 (the last cut): speech back to back, no silence between.
    assert items[1].data == (clips[1].data + clips[2].data + clips[0].data + clips[1].data)[:len(items[1].data)]
    assert items[1].name.startswith("long-001-synthetic-001")
    # Longer clips than the length: cut to it. 0 leaves the clips as they are.
    assert [i.seconds for i in AudioSpec(synthetic_clips=1, synthetic_seconds=2.0, stream_seconds=0.5).load()] == [0.5]
    assert AudioSpec(synthetic_clips=3, synthetic_seconds=0.5).load() == clips
    with pytest.raises(SystemExit):
        parse_args(["--stream-seconds", "-1"])


# -- pure parts -------------------------------------------------------------------------------------
def test_responses_are_matched_to_the_messages_they_cover():
    ends = [0.1, 0.2, 0.3, 0.4, 0.45]
    sent = [1.0, 1.1, 1.2, 1.3, 1.35]
    r = _Responses()
    r.times, r.indices, r.processed = [1.25, 1.45, 1.5], [0, 1, 1], [0.16, 0.32, 0.45]
    r.final_count, r.final_text, r.first_text_t = 1, "final text", 1.45
    rec, stats = StreamRecord(0, "x", 0.45), _ShareStats()
    _account(rec, r, sent, ends, t_done=1.36, stats=stats, right_context_s=0.006)
    assert np.allclose(stats.chunk_latency_ms, [250, 350, 250, 200, 150])
    # Chunk 0 (0.16 s + 6 ms) was completed by message 1, chunk 1 (0.326 s) by message 3.
    assert np.allclose(stats.response_latency_ms, [150, 150]) and stats.response_latency_negative == 0
    assert math.isclose(rec.first_partial_ms, 250) and math.isclose(rec.first_text_ms, 450)
    assert math.isclose(rec.final_ms, 140) and math.isclose(rec.wall_s, 0.5)
    assert rec.transcript == "final text" and rec.anomalies == [] and rec.uncovered == 0


def test_a_failed_stream_leaves_uncovered_messages_and_no_final():
    r = _Responses()
    r.times, r.indices, r.processed = [1.25], [0], [0.16]
    rec, stats = StreamRecord(0, "x", 0.4, code="UNAVAILABLE"), _ShareStats()
    _account(rec, r, [1.0, 1.1, 1.2, math.nan], [0.1, 0.2, 0.3, 0.4], t_done=None, stats=stats)
    assert np.allclose(stats.chunk_latency_ms, [250]) and rec.uncovered == 2
    assert rec.final_ms is None and rec.transcript is None and stats.errors == 1


def test_audio_files_folders_and_messages(tmp_path):
    pcm = (np.arange(16000 * 2) % 200 - 100).astype(np.int16)
    _write_wav(tmp_path / "st.wav", pcm, 16000, channels=2)  # 1 s of stereo
    floats = np.linspace(-0.5, 0.5, 8000, dtype="<f4")
    header = b"RIFF" + struct.pack("<I", 36 + floats.nbytes) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 3, 1, 8000, 32000, 4, 32) + b"data" + struct.pack("<I", floats.nbytes)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.wav").write_bytes(header + floats.tobytes())
    (tmp_path / "notes.txt").write_text("not audio")
    assert [Path(p).name for p in expand_paths([str(tmp_path)])] == ["st.wav", "f.wav"]
    st, fl = read_wav(str(tmp_path / "st.wav")), read_wav(str(tmp_path / "sub" / "f.wav"))
    assert (st.channels, st.sample_rate, st.encoding, st.n_samples) == (2, 16000, "PCM16", 16000)
    assert (fl.channels, fl.sample_rate, fl.encoding, fl.n_samples) == (1, 8000, "FLOAT32", 8000)
    pieces, ends = st.messages(300.0)
    assert ends == [4800, 9600, 14400, 16000] and b"".join(pieces) == st.data
    assert all(len(p) % st.frame_bytes == 0 for p in pieces)
    items = AudioSpec(paths=(str(tmp_path),), max_seconds=0.5).load()
    assert [round(i.seconds, 3) for i in items] == [0.5, 0.5]
    with pytest.raises(ValueError):
        expand_paths([str(tmp_path / "missing.wav")])


def test_synthetic_audio_is_deterministic():
    a, b = AudioSpec(synthetic_clips=2, synthetic_seconds=0.5).load(), AudioSpec(synthetic_clips=2, synthetic_seconds=0.5).load()
    assert [i.data for i in a] == [i.data for i in b] and a[0].data != a[1].data
    assert a[0].n_samples == 8000 and np.abs(np.frombuffer(a[0].data, "<i2")).max() > 1000


async def test_capacity_search_bisects_to_the_largest_passing_level():
    def level(c: int, ok: bool) -> dict:
        return {"concurrency": c, "streams_requested": c, "streams_completed": c, "errors": {} if ok else {"X": 1},
                "chunk_latency_ms": {"p95": 10.0}, "loadgen": {"bottleneck": c > 60}}

    async def run(c: int) -> dict:
        return level(c, c <= 37)

    results: dict[int, dict] = {}
    cap = await capacity_search(run, results, 100.0, start=4, maximum=1000, resolution=0.0, max_probes=20)
    assert cap["capacity"] == 37 and cap["bracket"] == [37, 38] and cap["probes"][:5] == [4, 8, 16, 32, 64]
    assert cap["loadgen_bound_levels"] == [64]
    # A sweep already run brackets the search: no doubling, only bisection between 10 and 50.
    results = {1: level(1, True), 10: level(10, True), 50: level(50, False)}
    cap = await capacity_search(run, results, 100.0, start=4, maximum=1000, resolution=0.0, max_probes=20)
    assert cap["capacity"] == 37 and all(10 < c < 50 for c in cap["probes"])
    # Nothing fails up to the maximum: the capacity is a lower bound.
    cap = await capacity_search(run, {}, 100.0, start=4, maximum=20, resolution=0.0, max_probes=20)
    assert cap["capacity"] == 20 and cap["limited_by_max_concurrency"] and cap["probes"] == [4, 8, 16, 20]
    # Only a failing level known: with growth 2, stepping down is the bisection from zero.
    cap = await capacity_search(run, {100: level(100, False)}, 100.0, start=4, maximum=1000, resolution=0.0,
                                max_probes=20)
    assert cap["capacity"] == 37 and cap["probes"][:3] == [50, 25, 37]
    # Growth 1.1 from a level near the capacity (expensive levels): small steps up, then down.
    cap = await capacity_search(run, {34: level(34, True)}, 100.0, start=4, maximum=1000, resolution=0.0,
                                max_probes=20, growth=1.1)
    assert cap["capacity"] == 37 and cap["probes"] == [38, 36, 37]
    cap = await capacity_search(run, {42: level(42, False)}, 100.0, start=4, maximum=1000, resolution=0.0,
                                max_probes=1, growth=1.1)
    assert cap["probes"] == [38] and cap["bracket"] == [0, 38] and cap["search_unfinished"]


def test_a_busy_load_generator_is_reported():
    def share(lag_ms: float, cpu_s: float) -> ShareResult:
        return ShareResult(worker=0, streams=[StreamRecord(0, "x", 1.0, transcript="")], chunk_latency_ms=[10.0],
                           response_latency_ms=[5.0], response_latency_negative=0, loop_lag_ms=[lag_ms] * 100,
                           wake_late_ms=[1.0], write_ms=[0.1], cpu_s=cpu_s, wall_s=1.0,
                           first_start_wall=0.0, last_end_wall=1.0)

    calm = merge_level(1, [share(1.0, 0.2)], realtime=True, chunk_ms=160, lag_threshold_ms=20)
    busy = merge_level(1, [share(50.0, 0.99)], realtime=True, chunk_ms=160, lag_threshold_ms=20)
    assert not calm["loadgen"]["bottleneck"] and calm["loadgen"]["bottleneck_reasons"] == []
    reasons = " ".join(busy["loadgen"]["bottleneck_reasons"])
    assert busy["loadgen"]["bottleneck"] and "lag" in reasons and "busy" in reasons


def test_the_report_reads_the_share_of_steps_prepared_ahead():
    """asr_engine_steps_prepared_ahead (server.ops.metrics, from StepTimings.prepared_ahead: the
    engine worker's overlap) reaches the level's server metrics as a share of the steps."""
    from prometheus_client import generate_latest

    from client.loadgen_report import parse_metrics, server_delta
    from engines.api import StepTimings
    from server.ops.metrics import ServerMetrics

    m = ServerMetrics(max_batch=8)
    before = parse_metrics(generate_latest(m.registry).decode())
    for ahead in (True, False, True, True):
        m.step_done(4, 0.01, [0.001] * 4, "eager", {"eager": 1}, StepTimings(total_ms=9.0, prepared_ahead=ahead))
    after = parse_metrics(generate_latest(m.registry).decode())
    sm = server_delta(before, after, wall_s=1.0)
    assert sm["steps"] == 4 and sm["steps_prepared_ahead_share"] == 0.75


def test_a_worker_opens_a_connection_per_25_streams_so_frontends_share_the_load():
    """A server's frontend processes share connections, not streams (SO_REUSEPORT): a worker
    carrying hundreds of streams opens many connections (run 26: with one per 100, one frontend
    of four carried four times another's load)."""
    from client.loadgen_run import auto_channels
    assert [auto_channels(n) for n in (1, 25, 26, 267, 500)] == [1, 1, 2, 11, 20]
    assert auto_channels(100_000) == 64


def test_the_report_counts_the_streams_each_frontend_opened_in_the_level():
    """asr_frontend_streams_total{frontend} (server.runtime.engine_host) reaches the level's server
    metrics as streams per frontend, so an uneven spread of connections shows in the report."""
    from prometheus_client import Counter, generate_latest

    from client.loadgen_report import parse_metrics, server_delta
    from server.ops.metrics import ServerMetrics

    m = ServerMetrics(max_batch=8)
    opened = Counter("asr_frontend_streams", "streams by frontend", ["frontend"], registry=m.registry)
    opened.labels(frontend="frontend-0").inc(5)
    before = parse_metrics(generate_latest(m.registry).decode())
    opened.labels(frontend="frontend-0").inc(3)
    opened.labels(frontend="frontend-1").inc(1)
    after = parse_metrics(generate_latest(m.registry).decode())
    assert server_delta(before, after, wall_s=1.0)["frontend_streams"] == {"frontend-0": 3, "frontend-1": 1}


def test_the_report_gives_gc_pauses_by_process_and_generation_and_bounds_the_longest():
    """asr_gc_pause_seconds{generation, process} reaches the level's report per process, per
    generation, with a bound on the longest pause: a sum alone cannot tell one stall of a second
    from a thousand pauses of a millisecond (runs 29-30: the scheduler's process spent 2-3 s of
    each 60 s level in collections)."""
    from prometheus_client import generate_latest

    from client.loadgen_report import parse_metrics, server_delta
    from server.ops.metrics import ServerMetrics

    m = ServerMetrics(max_batch=8)
    m.gc_paused("0", 0.002, process="engine")  # before the level: not counted
    before = parse_metrics(generate_latest(m.registry).decode())
    for seconds in (0.0005, 0.0008, 0.0009):
        m.gc_paused("0", seconds, process="engine")
    m.gc_paused("1", 0.02, process="engine")
    m.gc_paused("2", 0.3, process="engine")
    m.gc_paused("0", 0.0004, process="frontend-0")
    after = parse_metrics(generate_latest(m.registry).decode())
    sm = server_delta(before, after, wall_s=1.0)
    engine = sm["gc_by_process"]["engine"]
    assert engine["by_generation"]["0"] == {"ms": 2.2, "count": 3}
    assert engine["by_generation"]["1"]["count"] == 1 and engine["by_generation"]["2"]["count"] == 1
    assert engine["full"] == 1 and sm["gc_full_collections"] == 1
    assert engine["longest_ms_at_most"] == 500.0     # 0.3 s lies in the bucket up to 0.5 s
    assert sm["gc_by_process"]["frontend-0"]["longest_ms_at_most"] == 1.0
    assert abs(sm["gc_pause_ms_total"] - 322.6) < 0.2
