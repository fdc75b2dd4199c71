"""`asr-loadgen`: concurrent real-time streams against a server; latency, throughput, capacity.

    asr-loadgen --server localhost:50051 --concurrency 1,10,50,100 [--audio DIR_OR_WAV ...]
    asr-loadgen --server localhost:50051 --capacity --target-ms 160 --workers 8 --json out.json --plot out.png

Each stream sends one audio item (WAV files or folders cycled across streams; without --audio a
built-in synthetic set), as raw samples in messages of --chunk-ms (default: the model's chunk),
paced in real time unless --no-realtime, stream starts spread over --ramp-s. Per concurrency
level it reports chunk latency (a message's send to the first response whose audio_processed
covers it) p50/p90/p95/p99, first-partial latency (first audio sent to first response), final
latency (last audio sent to the final result), real-time factor, completed streams and errors by
status code; the server's own metrics (--metrics-url) show where its time went; the load
generator's own event-loop lag, send lateness and CPU say when it, not the server, is the
bottleneck. --capacity finds the largest concurrency whose p95 chunk latency is at most
--target-ms with zero errors.

Long streams: --stream-seconds S makes every stream play its clips back to back (cycled) for S
seconds of audio, as a call lasts, instead of one clip each: short clips measure stream churn
(stream openings, first chunks, finals) as much as steady serving. Latencies stay per chunk.

    asr-loadgen --capacity --target-ms 160 --stream-seconds 60 --synthetic-seconds 6

Calls: --utterances N makes each stream a call of N clips joined by --pause-s of silence, with
endpointing on (--stop-history-ms, default 320 as Pipecat's; --no-endpointing for off); per
level it then also reports time to final (an utterance's last speech sample played -> its final
received) p50/p90/p95/p99, finals per stream and utterances missed; with
--client-eou-ms D the client also asks for each utterance's final D ms of audio after its speech
ends (a turn detector's wait), and the time from that request to the final is reported.

    asr-loadgen --concurrency 1,64 --utterances 6 --pause-s 1.2 --client-eou-ms 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import platform
import socket
import sys
import time
from dataclasses import asdict, dataclass

import grpc

from client.balancing import add_target_args, channel_target
from client.loadgen_audio import AudioSpec
from client.loadgen_report import (METRICS, level_passes, merge_level, proc_cpu_delta, proc_cpu_snapshot, progress_bar,
                                   scrape, server_delta, table_header, table_row, utterance_row, write_plot)
from client.loadgen_run import LevelSpec, RunOptions, ShareResult, new_event_loop, prepare, run_share, worker_main
from client.provenance import source_revision
from proto import asr_stream_pb2 as pb
from proto import asr_stream_pb2_grpc as pb_grpc

VERSION = 1


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, but not for on/off switches: a `--no-X` switch's default is
    its dest's True, which would read as if the switch were on by default."""

    def _get_help_string(self, action):
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="asr-loadgen", description=__doc__.split("\n\n")[0],
                                formatter_class=_DefaultsHelp)
    add_target_args(p)
    a = p.add_argument_group("audio")
    a.add_argument("--audio", nargs="+", default=[], metavar="PATH",
                   help="WAV files or folders of them, cycled across streams (default: synthetic audio)")
    a.add_argument("--synthetic-clips", type=int, default=8, help="distinct synthetic clips")
    a.add_argument("--synthetic-seconds", type=float, default=8.0, help="length of each synthetic clip")
    a.add_argument("--max-audio-s", type=float, default=0.0, help="trim longer files to this many seconds (0: no)")
    a.add_argument("--stream-seconds", type=float, default=0.0,
                   help="each stream plays its clips back to back (cycled) for this many seconds of audio, "
                        "cut there (calls of --utterances are repeated whole); 0: one clip (or call) per stream")
    a.add_argument("--chunk-ms", type=float, default=0.0, help="audio per message; 0: the model's chunk (ListModels)")
    u = p.add_argument_group("calls of several utterances")
    u.add_argument("--utterances", type=int, default=0,
                   help="each stream is a call of this many clips joined by --pause-s of silence (0: one clip)")
    u.add_argument("--pause-s", type=float, default=1.0, help="silence between (and after) a call's utterances")
    u.add_argument("--no-endpointing", dest="endpointing", action="store_false",
                   help="calls: do not ask the server for endpointing (with --client-eou-ms: client finals only)")
    u.add_argument("--start-history-ms", type=int, default=0, help="endpointing start_history (0: the server's)")
    u.add_argument("--start-threshold", type=float, default=0.0, help="endpointing start_threshold (0: the server's)")
    u.add_argument("--stop-history-ms", type=int, default=320,
                   help="endpointing stop_history (Pipecat's default 320; 0: the server's)")
    u.add_argument("--stop-threshold", type=float, default=0.0, help="endpointing stop_threshold (0: the server's)")
    u.add_argument("--stop-history-eou-ms", type=int, default=0, help="endpointing stop_history_eou (0: the server's)")
    u.add_argument("--stop-threshold-eou", type=float, default=0.0,
                   help="endpointing stop_threshold_eou (0: the server's)")
    u.add_argument("--client-eou-ms", type=float, default=None,
                   help="calls: send end_utterance this many ms of audio after each utterance's speech ends "
                        "(a client-side turn detector) and report the time from it to the final")
    a.add_argument("--right-context-ms", type=float, default=0.0,
                   help="audio the server needs past a chunk's end before it runs the chunk: 0 for servers "
                        "with chunk-aligned framing (the default), 6 for NeMo's raw framing at 16 kHz "
                        "(96 samples of STFT window); used for response latency only")
    s = p.add_argument_group("load")
    s.add_argument("--concurrency", type=_int_list, default=None,
                   help="comma-separated levels to sweep, e.g. 1,10,50 (default 1, or none with --capacity)")
    s.add_argument("--ramp-s", type=float, default=2.0, help="stream starts are spread evenly over this time")
    s.add_argument("--no-realtime", dest="realtime", action="store_false",
                   help="send as fast as the server takes audio, not at real-time pace")
    s.add_argument("--no-interim", dest="interim", action="store_false", help="ask for finals only")
    s.add_argument("--model", default="", help="model name to request (default: the server's)")
    s.add_argument("--lookahead-ms", type=int, default=0, help="lookahead to request (0: the server's)")
    s.add_argument("--workers", type=int, default=1, help="load-generator processes (each owns a share of streams)")
    s.add_argument("--channels", type=int, default=0, help="gRPC connections per worker (0: one per 25 streams, at most 64)")
    s.add_argument("--cooldown-s", type=float, default=1.0, help="pause between levels")
    s.add_argument("--stream-timeout-s", type=float, default=0.0, help="gRPC deadline per stream (0: none)")
    s.add_argument("--level-grace-s", type=float, default=120.0,
                   help="streams still open this long after the level's audio should have ended are cancelled")
    s.add_argument("--no-uvloop", action="store_true", help="use the default asyncio event loop")
    c = p.add_argument_group("capacity search")
    c.add_argument("--capacity", action="store_true",
                   help="find the largest concurrency with p95 chunk latency <= --target-ms and zero errors")
    c.add_argument("--target-ms", type=float, default=None, help="p95 latency target (default: the chunk)")
    c.add_argument("--capacity-metric", choices=("chunk", "response"), default="chunk",
                   help="latency the target applies to: chunk (message sent -> response covering it) or response "
                        "(audio complete -> response; leaves out waiting for the server's right context)")
    c.add_argument("--stop-on-fail", action="store_true",
                   help="sweep: run no higher level once one fails the target (or has errors)")
    c.add_argument("--time-budget-s", type=float, default=0.0,
                   help="start no level whose audio (ramp + longest stream, paced in real time) would end after "
                        "this many seconds (0: no limit; the first level always runs); the report says which "
                        "levels were skipped")
    c.add_argument("--start-concurrency", type=int, default=16, help="first probe when no sweep brackets it")
    c.add_argument("--max-concurrency", type=int, default=4096, help="never probe above this")
    c.add_argument("--resolution", type=float, default=0.05, help="stop bisecting when the bracket is this narrow (relative)")
    c.add_argument("--max-probes", type=int, default=10, help="most levels the capacity search runs")
    c.add_argument("--capacity-growth", type=float, default=2.0,
                   help="until a level passes and one fails, step up from the highest passing level (or down "
                        "from the lowest failing one) by this factor, then bisect; e.g. 1.1 around a known "
                        "capacity when each level is expensive (long streams)")
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="FILE", help="write the full report as JSON")
    o.add_argument("--plot", default=None, metavar="FILE.png", help="plot latency against concurrency (matplotlib)")
    o.add_argument("--dump-transcripts", default=None, metavar="FILE.jsonl",
                   help="one line per stream: level, stream, audio name, status, final transcript")
    o.add_argument("--metrics-url", default=None,
                   help="the server's Prometheus endpoint (e.g. http://localhost:9400/metrics): server-side deltas per level")
    o.add_argument("--server-pid", type=int, default=None,
                   help="the server's process id when it runs on this machine: its CPU use per level and per thread")
    o.add_argument("--lag-threshold-ms", type=float, default=20.0,
                   help="load-generator lag/lateness above this marks a level LOADGEN-BOUND")
    o.add_argument("--label", default="", help="free text stored in the JSON report (e.g. the machine)")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.concurrency is None:
        args.concurrency = [] if args.capacity else [1]
    if args.chunk_ms < 0 or args.ramp_s < 0:
        p.error("--chunk-ms and --ramp-s must be >= 0")
    if args.utterances < 0 or args.pause_s < 0:
        p.error("--utterances and --pause-s must be >= 0")
    if args.stream_seconds < 0:
        p.error("--stream-seconds must be >= 0")
    if args.capacity_growth <= 1:
        p.error("--capacity-growth must be > 1")
    if args.client_eou_ms is not None and (args.utterances < 1 or args.client_eou_ms < 0):
        p.error("--client-eou-ms needs --utterances and a value >= 0")
    return args


def endpointing_settings(args: argparse.Namespace) -> tuple[tuple[str, float], ...] | None:
    """The EndpointingConfig calls ask for (None: not a call, or --no-endpointing)."""
    if args.utterances < 1 or not args.endpointing:
        return None
    return (("start_history_ms", args.start_history_ms), ("start_threshold", args.start_threshold),
            ("stop_history_ms", args.stop_history_ms), ("stop_threshold", args.stop_threshold),
            ("stop_history_eou_ms", args.stop_history_eou_ms), ("stop_threshold_eou", args.stop_threshold_eou))


# -- server queries ------------------------------------------------------------------------------
async def list_models(target: str, timeout: float = 30.0, balance: bool = False) -> dict:
    target, options = channel_target(target, balance)
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.SpeechRecognitionStub(channel)
        models = (await stub.ListModels(pb.ListModelsRequest(), timeout=timeout, wait_for_ready=True)).models
    if not models:
        raise RuntimeError("the server lists no model")
    m = models[0]
    return {"name": m.name, "engine": m.engine, "engine_executions": dict(m.engine_executions),
            "lookahead_ms": m.lookahead_ms, "chunk_ms": m.chunk_ms, "sample_rate": m.sample_rate,
            "max_streams": m.max_streams, "max_batch": m.max_batch, "random_weights": m.random_weights,
            "vocabulary_size": m.vocabulary_size, "description": m.description}


async def _scrape(url: str | None) -> dict | None:
    if not url:
        return None
    try:
        return await asyncio.to_thread(scrape, url)
    except Exception as exc:  # noqa: BLE001 - metrics are optional; say so and go on
        print(f"asr-loadgen: cannot read server metrics at {url}: {exc}", file=sys.stderr)
        return None


# -- the generator ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadgenConfig:
    run: RunOptions
    audio: AudioSpec
    workers: int = 1
    ramp_s: float = 2.0
    level_grace_s: float = 120.0
    lag_threshold_ms: float = 20.0
    metrics_url: str | None = None
    server_pid: int | None = None
    use_uvloop: bool = True
    show_progress: bool = True


class LoadGenerator:
    """Runs levels; with workers > 1 through persistent worker processes (spawned), each owning
    the streams i with i % workers == its index. Use as an async context manager."""

    def __init__(self, cfg: LoadgenConfig):
        self.cfg = cfg
        self.items = cfg.audio.load()
        self.max_audio_s = max(i.seconds for i in self.items)
        self._prepared = None
        self._procs: list = []
        self._conns: list = []
        self._progress_q = None

    async def __aenter__(self) -> LoadGenerator:
        if self.cfg.workers == 1:
            self._prepared = prepare(self.items, self.cfg.run.chunk_ms, self.cfg.run.client_eou_ms)
            return self
        ctx = multiprocessing.get_context("spawn")
        self._progress_q = ctx.Queue()
        for w in range(self.cfg.workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, name=f"loadgen-worker-{w}", daemon=True,
                               args=(w, self.cfg.workers, self.cfg.audio, self.cfg.run.chunk_ms, self.cfg.run,
                                     self.cfg.use_uvloop, child, self._progress_q))
            proc.start()
            self._procs.append(proc)
            self._conns.append(parent)
        for w, conn in enumerate(self._conns):
            msg = await self._recv(conn, 120.0, w)
            if msg[0] != "ready":
                raise RuntimeError(f"load-generator worker {w} failed to start: {msg[1]}")
        return self

    async def __aexit__(self, *exc) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for proc in self._procs:
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.terminate()

    async def _recv(self, conn, timeout: float, worker: int):
        deadline = time.monotonic() + timeout
        while not conn.poll():
            if not self._procs[worker].is_alive():
                raise RuntimeError(f"load-generator worker {worker} exited (code {self._procs[worker].exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"load-generator worker {worker} did not answer in {timeout:g} s")
            await asyncio.sleep(0.05)
        return conn.recv()

    async def run_level(self, concurrency: int) -> dict:
        cfg = self.cfg
        deadline = cfg.ramp_s + (self.max_audio_s if cfg.run.realtime else 0.0) + cfg.level_grace_s
        before = await _scrape(cfg.metrics_url)
        cpu_before = proc_cpu_snapshot(cfg.server_pid) if cfg.server_pid else None
        start_wall = time.time() + (0.05 if cfg.workers == 1 else 0.3)
        level = LevelSpec(concurrency, cfg.ramp_s, start_wall, deadline)
        progress: dict[int, tuple[int, int]] = {}
        drawer = asyncio.get_running_loop().create_task(self._draw(concurrency, progress, start_wall))
        try:
            if cfg.workers == 1:
                shares = [await run_share(level, 0, 1, self._prepared, cfg.run,
                                          lambda d, e: progress.__setitem__(0, (d, e)))]
            else:
                shares = await self._run_workers(level, progress)
        finally:
            drawer.cancel()
            await asyncio.gather(drawer, return_exceptions=True)
            if cfg.show_progress:
                sys.stderr.write("\r" + " " * 100 + "\r")
                sys.stderr.flush()
        after = await _scrape(cfg.metrics_url)
        cpu_after = proc_cpu_snapshot(cfg.server_pid) if cfg.server_pid else None
        report = merge_level(concurrency, shares, realtime=cfg.run.realtime, chunk_ms=cfg.run.chunk_ms,
                             lag_threshold_ms=cfg.lag_threshold_ms)
        if before is not None and after is not None:
            report["server_metrics"] = server_delta(before, after, report["throughput"]["wall_s"])
        if cfg.server_pid:
            report["server_process"] = proc_cpu_delta(cpu_before, cpu_after)
        return report

    async def _run_workers(self, level: LevelSpec, progress: dict) -> list[ShareResult]:
        for conn in self._conns:
            conn.send(level)
        shares: list[ShareResult | None] = [None] * len(self._conns)
        timeout = level.deadline_s + 60.0
        deadline = time.monotonic() + timeout
        while any(s is None for s in shares):
            while True:
                try:
                    w, done, errors = self._progress_q.get_nowait()
                except Exception:  # queue.Empty
                    break
                progress[w] = (done, errors)
            for w, conn in enumerate(self._conns):
                if shares[w] is None and conn.poll():
                    kind, payload = conn.recv()
                    if kind == "error":
                        raise RuntimeError(payload)
                    shares[w] = payload
                elif shares[w] is None and not self._procs[w].is_alive():
                    raise RuntimeError(f"load-generator worker {w} died (exit code {self._procs[w].exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"load-generator workers gave no result within {timeout:g} s")
            await asyncio.sleep(0.05)
        return shares  # type: ignore[return-value]

    async def _draw(self, concurrency: int, progress: dict, start_wall: float) -> None:
        if not self.cfg.show_progress:
            return
        while True:
            done = sum(d for d, _ in progress.values())
            errors = sum(e for _, e in progress.values())
            sys.stderr.write(progress_bar(concurrency, done, errors, max(time.time() - start_wall, 0.0)))
            sys.stderr.flush()
            await asyncio.sleep(0.25)


# -- sweep and capacity search ----------------------------------------------------------------------
class OutOfTime(Exception):
    """The time budget allows no further level."""


async def capacity_search(run, results: dict[int, dict], target_ms: float, start: int, maximum: int,
                          resolution: float, max_probes: int, metric: str = "chunk", growth: float = 2.0) -> dict:
    """Largest concurrency that passes (the metric's p95 <= target, zero errors, all streams
    completed), assuming passing is monotone in concurrency. Levels already in `results` (the
    sweep) bracket the search; then grow by `growth` (doubling) until a level fails, or, when
    only failing levels are known, shrink by it until one passes; then bisect. With growth 2 the
    shrinking is the bisection from zero. `run` may raise OutOfTime: the search then reports the
    bracket it had."""
    probes: list[int] = []
    out_of_time = False

    def ok(c: int) -> bool:
        return level_passes(results[c], target_ms, metric)

    async def probe(c: int) -> bool:
        if c not in results:
            results[c] = await run(c)
            probes.append(c)
        return ok(c)

    failing = sorted(c for c in results if not ok(c))
    hi = failing[0] if failing else None
    passing = sorted(c for c in results if ok(c) and (hi is None or c < hi))
    lo = passing[-1] if passing else 0
    try:
        if hi is None:
            c = max(start, _grow(lo, growth)) if lo else start
            while len(probes) < max_probes:
                c = min(c, maximum)
                if await probe(c):
                    lo = c
                    if c >= maximum:
                        break
                    c = _grow(c, growth)
                else:
                    hi = c
                    break
        # Nothing passed yet: step down from the lowest failing level (what bisecting from zero
        # does when growth is 2; a smaller factor probes near a level known to be close).
        while hi is not None and lo == 0 and hi > 1 and len(probes) < max_probes:
            c = max(1, min(hi - 1, int(hi / growth)))
            if await probe(c):
                lo = c
            else:
                hi = c
        while hi is not None and hi - lo > max(1, int(resolution * max(lo, 1))) and len(probes) < max_probes:
            mid = (lo + hi) // 2
            if await probe(mid):
                lo = mid
            else:
                hi = mid
    except OutOfTime:
        out_of_time = True
    lg_bound = sorted(c for c, lv in results.items() if lv["loadgen"]["bottleneck"])
    return {"target_ms": target_ms, "metric": metric, "capacity": lo, "bracket": [lo, hi], "probes": probes,
            "limited_by_max_concurrency": hi is None and lo >= maximum,
            "search_unfinished": out_of_time or (hi is not None and hi - lo > max(1, int(resolution * max(lo, 1))))
            or (hi is None and lo < maximum),
            "time_budget_exhausted": out_of_time,
            "loadgen_bound_levels": lg_bound,
            "criterion": f"p95 {METRICS[metric]} <= target_ms, zero errors, every stream completed"}


def _grow(c: int, growth: float) -> int:
    return max(c + 1, math.ceil(c * growth))


def _host_info() -> dict:
    return {"hostname": socket.gethostname(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "grpcio": grpc.__version__}


def _public(level: dict) -> dict:
    return {k: v for k, v in level.items() if not k.startswith("_")}


async def amain(args: argparse.Namespace) -> int:
    try:
        server = await list_models(args.server, balance=args.balance)
    except Exception as exc:  # noqa: BLE001 - the one thing that must work first
        print(f"asr-loadgen: cannot reach {args.server}: {exc}", file=sys.stderr)
        return 2
    chunk_ms = args.chunk_ms or server["chunk_ms"] or 160.0
    target_ms = args.target_ms if args.target_ms is not None else server["chunk_ms"] or chunk_ms
    run = RunOptions(target=args.server, balance=args.balance, chunk_ms=chunk_ms, realtime=args.realtime, interim=args.interim,
                     model=args.model, lookahead_ms=args.lookahead_ms,
                     stream_timeout_s=args.stream_timeout_s or None, channels=args.channels,
                     right_context_ms=args.right_context_ms, endpointing=endpointing_settings(args),
                     client_eou_ms=args.client_eou_ms)
    audio = AudioSpec(paths=tuple(args.audio), synthetic_clips=args.synthetic_clips,
                      synthetic_seconds=args.synthetic_seconds, max_seconds=args.max_audio_s,
                      utterances=args.utterances, pause_s=args.pause_s, stream_seconds=args.stream_seconds)
    cfg = LoadgenConfig(run=run, audio=audio, workers=args.workers, ramp_s=args.ramp_s,
                        level_grace_s=args.level_grace_s, lag_threshold_ms=args.lag_threshold_ms,
                        metrics_url=args.metrics_url, server_pid=args.server_pid, use_uvloop=not args.no_uvloop,
                        show_progress=not args.quiet and sys.stderr.isatty())
    rw = " RANDOM weights" if server["random_weights"] else ""
    print(f"asr-loadgen: {args.server}: model {server['name']}{rw}, engine {server['engine']}, "
          f"lookahead {server['lookahead_ms']} ms, chunk {server['chunk_ms']:g} ms, max streams {server['max_streams']}, "
          f"max batch {server['max_batch']}", flush=True)
    results: dict[int, dict] = {}
    order: list[int] = []
    skipped: list[int] = []
    started = time.time()
    async with LoadGenerator(cfg) as gen:
        total_audio = sum(i.seconds for i in gen.items)
        print(f"asr-loadgen: {len(gen.items)} audio item(s), {total_audio:.1f} s in all"
              + (f" (streams of {args.stream_seconds:g} s, clips back to back)" if args.stream_seconds else "")
              + f"; messages of {chunk_ms:g} ms, "
              f"{'real-time' if args.realtime else 'as fast as possible'}, ramp {args.ramp_s:g} s, "
              f"{args.workers} worker process(es)", flush=True)
        if args.utterances:
            ep = dict(run.endpointing) if run.endpointing else None
            print(f"asr-loadgen: calls of {args.utterances} utterances, pauses of {args.pause_s:g} s; endpointing "
                  + (", ".join(f"{k} {v:g}" for k, v in ep.items() if v) or "(server defaults)" if ep else "off")
                  + (f"; client end of utterance {args.client_eou_ms:g} ms after speech"
                     if args.client_eou_ms is not None else ""), flush=True)
        print(table_header(), flush=True)

        budget_end = started + args.time_budget_s if args.time_budget_s > 0 else None
        shown_target = target_ms if args.capacity or args.target_ms is not None else None

        # A level lasts its ramp and its longest stream's audio (real time): it starts only if that fits.
        level_s = args.ramp_s + (gen.max_audio_s if args.realtime else 0.0)

        async def run_one(c: int) -> dict:
            if order and budget_end is not None and time.time() + args.cooldown_s + level_s > budget_end:
                print(f"asr-loadgen: time budget of {args.time_budget_s:g} s spent: level {c} not run", flush=True)
                skipped.append(c)
                raise OutOfTime()
            if order:
                await asyncio.sleep(args.cooldown_s)
            level = await gen.run_level(c)
            after = await list_models(args.server, balance=args.balance)
            level["server_engine"] = after["engine"]
            level["engine_executions_after"] = after["engine_executions"]
            level["passes_target"] = {m: level_passes(level, target_ms, m) for m in METRICS}
            order.append(c)
            print(table_row(level, shown_target, args.capacity_metric), flush=True)
            if "utterances" in level:
                print(utterance_row(level), flush=True)
            for reason in level["loadgen"]["bottleneck_reasons"]:
                print(f"    load generator is the bottleneck here: {reason}", flush=True)
            return level

        stopped = None
        try:
            for c in args.concurrency:
                if c not in results:
                    results[c] = await run_one(c)
                if args.stop_on_fail and not level_passes(results[c], target_ms if shown_target else 1e12,
                                                          args.capacity_metric):
                    stopped = c
                    print(f"asr-loadgen: level {c} failed: higher sweep levels skipped (--stop-on-fail)", flush=True)
                    break
        except OutOfTime:
            pass
        capacity = None
        if args.capacity:
            capacity = await capacity_search(run_one, results, target_ms, args.start_concurrency,
                                             args.max_concurrency, args.resolution, args.max_probes,
                                             args.capacity_metric, args.capacity_growth)
    levels = [results[c] for c in order]
    if capacity is not None:
        bound = capacity["bracket"][1]
        print(f"capacity: {capacity['capacity']} concurrent streams with p95 {args.capacity_metric} latency <= "
              f"{target_ms:g} ms and zero errors (first failing level: "
              f"{bound if bound is not None else 'none up to --max-concurrency'})"
              + (" [search unfinished]" if capacity["search_unfinished"] else ""), flush=True)
        if capacity["loadgen_bound_levels"]:
            print(f"  warning: the load generator was the bottleneck at {capacity['loadgen_bound_levels']}: "
                  "add --workers or run it on another machine", flush=True)
    final_server = await list_models(args.server, balance=args.balance)
    report = {
        "tool": "asr-loadgen", "version": VERSION, "label": args.label, "started_at": started,
        "duration_s": round(time.time() - started, 2), "argv": sys.argv[1:], "host": _host_info(),
        # The load generator's own source (the same tree as the server's in bench/run_h100.sh).
        "source_revision": source_revision(),
        "server": server, "server_after": final_server,
        "settings": {"chunk_ms": chunk_ms, "realtime": args.realtime, "interim": args.interim,
                     "ramp_s": args.ramp_s, "workers": args.workers, "target_ms": target_ms,
                     "right_context_ms": args.right_context_ms, "capacity_metric": args.capacity_metric,
                     "stop_on_fail": args.stop_on_fail, "time_budget_s": args.time_budget_s,
                     "capacity_growth": args.capacity_growth,
                     "utterances": args.utterances, "pause_s": args.pause_s if args.utterances else None,
                     "endpointing": dict(run.endpointing) if run.endpointing else None,
                     "client_eou_ms": args.client_eou_ms, "stream_seconds": args.stream_seconds,
                     "audio": asdict(audio), "audio_items": len(gen.items), "audio_seconds_total": total_audio},
        "definitions": DEFINITIONS,
        "levels": [_public(lv) for lv in levels],
        "capacity": capacity,
        "sweep_stopped_at": stopped,
        "levels_skipped_for_time": skipped,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"asr-loadgen: report written to {args.json}", flush=True)
    if args.dump_transcripts:
        with open(args.dump_transcripts, "w") as f:
            for lv in levels:
                for s in lv["_streams"]:
                    line = {"concurrency": lv["concurrency"], "stream": s.index, "audio": s.audio,
                            "status": s.code, "transcript": s.transcript}
                    if s.utterances:
                        line.update(utterances=s.utterances, finals=s.finals, missed=s.missed)
                    f.write(json.dumps(line) + "\n")
        print(f"asr-loadgen: transcripts written to {args.dump_transcripts}", flush=True)
    if args.plot:
        title = (f"{server['name']} / {server['engine']} / lookahead {server['lookahead_ms']} ms / "
                 f"{'real-time' if args.realtime else 'max rate'} / {args.label}")
        why_not = write_plot(levels, args.plot, title, shown_target)
        print(f"asr-loadgen: {why_not}" if why_not else f"asr-loadgen: plot written to {args.plot}", flush=True)
    return 0 if any(lv["streams_completed"] for lv in levels) or not levels else 1


DEFINITIONS = {
    "chunk_latency_ms": "per audio message: receipt of the first response whose audio_processed covers the "
                        "message's end, minus the time call.write() returned for the message",
    "response_latency_ms": "per interim response: receipt minus the send time of the message that completed "
                           "the audio its chunk needed (audio_processed + --right-context-ms): the server and "
                           "transport's share, without the wait for audio that chunk_latency_ms includes",
    "first_partial_ms": "per stream: first response received minus first audio message sent (includes "
                        "gathering the first chunk's audio when paced in real time)",
    "first_text_ms": "per stream: first response with a non-empty transcript minus first audio sent",
    "final_latency_ms": "per stream: final result received minus the end of sending (last audio message "
                        "written and the stream half-closed)",
    "rtf": "per stream: (final received - first audio sent) / audio seconds",
    "throughput.rtfx": "audio seconds of completed streams / wall seconds of the level",
    "loadgen.loop_lag_ms": "how late a 10 ms asyncio sleep wakes up in the load generator's processes",
    "loadgen.send_lateness_ms": "real-time mode: how late the sender woke up for a message that was due",
    "loadgen.write_ms": "time call.write() took (gRPC flow control: the server not reading fast enough)",
    "server_metrics": "deltas of the server's Prometheus metrics over the level (--metrics-url)",
    "utterances.time_to_final_ms": "calls (--utterances): per utterance, its final received minus the instant its "
                                   "last speech sample played (real time: the send time of the message holding it, "
                                   "less the audio after that sample in the message; --no-realtime: that message's "
                                   "send time); an utterance's final is the last "
                                   "final whose end_seconds falls in its window (its speech start to the next "
                                   "utterance's)",
    "utterances.eou_to_final_ms": "calls with --client-eou-ms: per utterance, its final (closed by the client's "
                                  "request) received minus the time the end_utterance request was written",
    "utterances.missed": "utterances sent whose window got no final",
    "utterances.extra_finals": "finals beyond the first in an utterance's window (the utterance was split)",
    "server_process": "CPU cores the server process used over the level, and its busiest threads (--server-pid)",
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loop = new_event_loop(not args.no_uvloop)
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(amain(args))
    except KeyboardInterrupt:
        print("asr-loadgen: interrupted", file=sys.stderr)
        return 130
    finally:
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
