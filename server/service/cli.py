"""`asr-server`: build the engine, serve it over gRPC, drain on SIGTERM.

This is the composition root: the only server module that reaches the engine factory (which
loads torch), and it does so by name at run time, so importing the server package never
imports torch.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from engines.api import EndpointingParams, StreamingEngine
from engines.config import (DECODE_STREAM_MODES, DTYPE_NAMES, ENGINE_NAMES, LOOKAHEAD_TO_RIGHT_CONTEXT, STEP_KERNELS,
                            UTTERANCE_RESETS, EngineConfig)
from server.service.app import AsrServer, ServerSettings
from server.service.auto_config import (AUTO, FRONTENDS_AUTO_HELP, MAX_BATCH_HELP, MAX_STREAMS_HELP, engine_sizing_kwargs,
                                int_or_auto, resolve_frontends)
from server.transport.call_limits import RecognizeLimits
from server.transport.call_skeleton import TransportLimits
from server.runtime.gc_policy import parse_threshold
from server.runtime.logging_setup import configure_logging
from server.transport.riva_convert import RivaSettings
from server.scheduling.scheduler import SchedulerConfig
from server.transport.security import add_security_args, security_settings

log = logging.getLogger("nemostream.cli")
DEFAULT_FACTORY = "engines.factory:build_engine"
EXIT_ENGINE_DEAD = 3
DEFAULT_GC_THRESHOLD = "20000,20,20"  # bench/RESULTS.md, run 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="asr-server", description="Streaming speech recognition over gRPC.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model and engine")
    m.add_argument("--model", default="builtin:demo",
                   help="a .nemo file (trusted input: it is a pickle) or builtin:<name>: demo (trained on "
                        "synthetic English and Hindi speech; not for real-world audio), tiny or "
                        "nemotron-0.6b (random weights, for tests and benchmarks)")
    m.add_argument("--engine", default="auto", choices=ENGINE_NAMES,
                   help="encoder engine; auto: fast-cudagraph on a GPU, eager on the CPU")
    m.add_argument("--compile", action="store_true",
                   help="torch.compile under the CUDA graphs of the *cudagraph engines (slower start-up)")
    m.add_argument("--fallback-engine", default=None, choices=ENGINE_NAMES[1:],
                   help="engine to start on if --engine cannot load (reported in ListModels and metrics)")
    m.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1, ...")
    m.add_argument("--gpus", default=None, metavar="all|0,1,...",
                   help="one engine core (an engine worker process with its own scheduler) per listed CUDA "
                        "device: all (every visible GPU) or indices; new streams go to the core with the most "
                        "free slots and stay there; a core that dies fails only its own streams (replaces "
                        "--device)")
    m.add_argument("--engine-cores", type=int, default=1,
                   help="engine cores per device (--device, or each of --gpus): several on the CPU, or on one "
                        "large GPU")
    m.add_argument("--dtype", default="auto", choices=DTYPE_NAMES)
    m.add_argument("--lookahead-ms", type=int, default=160, choices=sorted(LOOKAHEAD_TO_RIGHT_CONTEXT))
    m.add_argument("--max-batch", type=int_or_auto, default=AUTO, help=MAX_BATCH_HELP)
    m.add_argument("--max-streams", type=int_or_auto, default=AUTO,
                   help=MAX_STREAMS_HELP + "; per engine core: with --gpus or --engine-cores the server takes this "
                        "times the number of cores")
    m.add_argument("--profile-every", type=int, default=100,
                   help="every Nth engine step synchronizes the device at each phase, for the per-phase "
                        "times in asr_engine_phase_seconds (0: never)")
    m.add_argument("--decode-stream", choices=DECODE_STREAM_MODES, nargs="?", const="on", default="auto",
                   help="on a GPU, decode each step on a CUDA stream of its own, beside the next step's encoder; "
                        "without it the next step waits for each decode. auto (the default): on a GPU, start-up times "
                        "the steps both ways at the max batch (or half the slots, if fewer) and keeps the decode "
                        "stream only where even its slower repeat is at least 3%% faster (on an H100 it gave 1.17x the steps at 160 ms "
                        "and 0.58x at 560 ms, at 256 rows); on the CPU, off. The flag alone means on")
    m.add_argument("--step-kernels", choices=STEP_KERNELS, default="auto",
                   help="the fast-cudagraph engine's kernels: torch (PyTorch's: SDPA over a copy of each row's "
                        "attention cache gathered out of the slot pool), triton (an attention kernel that reads each "
                        "row's cache in the pool itself, no copy, and each layer's element-wise chains fused; needs "
                        "Triton, which PyTorch's CUDA wheels bring; where it cannot run the engine keeps torch and "
                        "logs why) or auto (the default: triton where Triton can serve, else torch; on an H100 triton "
                        "carried 4,096 streams at 160 ms and 8.6 ms chunk latency at one stream, bench/RESULTS.md run 43)")
    m.add_argument("--cache-dir", default=None, help="exported graphs / built engine plans")
    m.add_argument("--seed", type=int, default=0, help="seed of builtin models' random weights")
    m.add_argument("--engine-factory", default=DEFAULT_FACTORY,
                   help="module:function taking an EngineConfig and returning a StreamingEngine")
    m.add_argument("--no-engine-worker", action="store_true",
                   help="run the engine in the server's own process; by default it runs in a worker process "
                        "with its own interpreter lock, so the event loop does not slow its steps down "
                        "(server/runtime/engine_worker.py)")
    n = p.add_argument_group("network")
    n.add_argument("--frontends", type=int_or_auto, default=AUTO,
                   help="gRPC frontend processes sharing the port around one engine process; one process "
                        "answers about 3,000 chunks/s, so serving more than a few hundred streams needs "
                        "several (1: everything in this process); " + FRONTENDS_AUTO_HELP)
    n.add_argument("--frontend-of", default=None, help=argparse.SUPPRESS)   # internal: run as a frontend
    n.add_argument("--frontend-name", default="frontend", help=argparse.SUPPRESS)
    n.add_argument("--host", default="0.0.0.0")
    n.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one")
    n.add_argument("--metrics-host", default="127.0.0.1",
                   help="address of the metrics port (plain HTTP, no authentication): loopback by default; "
                        "0.0.0.0 (or a private interface) for Prometheus and HTTP health checks from elsewhere")
    n.add_argument("--metrics-port", type=int, default=9400,
                   help="HTTP port of /metrics (Prometheus), /health and /ready (JSON); 0 picks a free one")
    n.add_argument("--no-metrics", action="store_true", help="serve no metrics endpoint")
    n.add_argument("--max-connection-age-s", type=float, default=300.0,
                   help="send GOAWAY on a connection after about this long (+-10%% jitter): clients open new "
                        "streams on a new connection, so servers added behind a balancer or a DNS name get "
                        "them, while the streams open on the old one go on (0: never)")
    n.add_argument("--max-connection-age-grace-s", type=float, default=0.0,
                   help="how long streams may go on over a connection after its GOAWAY before it is closed "
                        "under them (0: no limit; streams end at --max-stream-seconds or --idle-timeout-s)")
    n.add_argument("--max-message-mb", type=float, default=32, help="largest request (a whole file for Recognize)")
    n.add_argument("--max-audio-message-kb", type=float, default=1024, help="largest streamed audio message")
    s = p.add_argument_group("scheduling and limits")
    s.add_argument("--batch-wait-ms", type=float, default=5.0, help="deadline to fill a batch after the first ready chunk")
    s.add_argument("--batch-wait-min-chunks", type=float, default=SchedulerConfig.wait_min_arrivals, metavar="N",
                   help="wait --batch-wait-ms for a fuller batch only when the recent load brings at least N chunks "
                        "in that time; at lower load a chunk goes at once (0: always wait)")
    s.add_argument("--overlap-at", type=float, default=SchedulerConfig.overlap_at, metavar="SHARE",
                   help="with the engine in its worker process: send the next step behind a running one once "
                        "that has run this share of the recent steps' time, so the worker prepares it while "
                        "the device works (>= 1: only a full batch goes early)")
    s.add_argument("--idle-timeout-s", type=float, default=45.0,
                   help="end a stream the client sends no audio on for this long (messages without audio, "
                        "keep-alives, do not count); above the 30-35 s after which Pipecat's NVIDIA service "
                        "sends its silence keep-alive")
    s.add_argument("--max-stream-seconds", type=float, default=3600.0,
                   help="a stream is ended with its final result after this much audio or wall time")
    s.add_argument("--response-buffer", type=int, default=32,
                   help="undelivered results per stream; a client that also leaves --max-pending-s of audio "
                        "unprocessed past it gets RESOURCE_EXHAUSTED")
    s.add_argument("--max-pending-s", type=float, default=30.0, help="unprocessed audio per stream before backpressure")
    s.add_argument("--stream-window-kb", type=int, default=256, help="HTTP/2 receive window per stream")
    s.add_argument("--drain-grace-s", type=float, default=30.0, help="SIGTERM: time open streams get to finish")
    s.add_argument("--drain-notice-s", type=float, default=0.0,
                   help="SIGTERM: health NOT_SERVING and /ready 503 at once, but new streams still accepted for "
                        "this long, so balancers that poll /ready stop sending first (deploy/: 3)")
    s.add_argument("--dead-after-failures", type=int, default=3,
                   help="consecutive engine steps of which nothing ran that mark the engine dead")
    s.add_argument("--engine-hang-s", type=float, default=20.0,
                   help="a step submitted and none finished for max(this, --engine-hang-factor x the slowest "
                        "recent step) seconds: the engine is hung and treated as dead (health NOT_SERVING, "
                        f"streams UNAVAILABLE, exit status {EXIT_ENGINE_DEAD}); 0: never")
    s.add_argument("--engine-hang-factor", type=float, default=50.0,
                   help="the hang deadline in multiples of the slowest recent engine step (see --engine-hang-s)")
    s.add_argument("--recognize-max-call-mb", type=float, default=32,
                   help="unary Recognize: the largest request recognized (RESOURCE_EXHAUSTED beyond; 0: no limit)")
    s.add_argument("--recognize-max-client-mb", type=float, default=64,
                   help="unary Recognize: request bytes in flight per client (RESOURCE_EXHAUSTED beyond; counted "
                        "per server process, i.e. per frontend with --frontends; 0: no limit)")
    s.add_argument("--recognize-max-server-mb", type=float, default=128,
                   help="unary Recognize: request bytes in flight per server process (per frontend with "
                        "--frontends); RESOURCE_EXHAUSTED beyond; 0: no limit")
    s.add_argument("--exit-on-engine-death-s", type=float, default=1.0,
                   help=f"once the engine is dead (health NOT_SERVING, streams UNAVAILABLE), exit with status "
                        f"{EXIT_ENGINE_DEAD} after this many seconds so an orchestrator restarts the server; "
                        "negative: never exit")
    e = p.add_argument_group(
        "endpointing (one final per utterance; Riva EndpointingConfig semantics: histories in ms, thresholds in "
        "0..1, acting on each encoder frame's blank probability). These are the defaults a stream's unset "
        "settings take; Riva streams have endpointing on, native streams ask for it in their config")
    d = EndpointingParams()
    e.add_argument("--endpoint-start-history-ms", type=int, default=d.start_history_ms,
                   help="window for the start of an utterance")
    e.add_argument("--endpoint-start-threshold", type=float, default=d.start_threshold,
                   help="share of non-blank in that window that starts an utterance")
    e.add_argument("--endpoint-stop-history-ms", type=int, default=d.stop_history_ms,
                   help="window for the end of an utterance (Pipecat's NVIDIA service asks for 320)")
    e.add_argument("--endpoint-stop-threshold", type=float, default=d.stop_threshold,
                   help="share of blank in that window that ends an utterance")
    e.add_argument("--endpoint-stop-history-eou-ms", type=int, default=d.stop_history_eou_ms,
                   help="models with an end-of-utterance token: window after the token (0: end at the token)")
    e.add_argument("--endpoint-stop-threshold-eou", type=float, default=d.stop_threshold_eou,
                   help="share of blank in that window that ends the utterance after the token")
    e.add_argument("--utterance-reset", default="auto", choices=UTTERANCE_RESETS,
                   help="model state at a new utterance: keep (caches and decoder state carry on), decoder "
                        "(restart the RNNT prediction network), all (as a new stream); auto: the model's own "
                        "(builtin:demo, trained on single utterances: all; others: keep)")
    r = p.add_argument_group("Riva-compatible API (nvidia.riva.asr.RivaSpeechRecognition, on the same port)")
    r.add_argument("--riva-model-punctuates", action="store_true",
                   help="the model's own text carries punctuation: GetRivaSpeechRecognitionConfig says so "
                        "(either way enable_automatic_punctuation is served with the model's text as it is)")
    r.add_argument("--riva-model-written-form", action="store_true",
                   help="the model writes numbers and the like in written form: GetRivaSpeechRecognitionConfig "
                        "says so (either way verbatim_transcripts=false is served with the model's text as it is)")
    add_security_args(p)
    o = p.add_argument_group("operations")
    o.add_argument("--log-level", default="INFO")
    o.add_argument("--log-format", default="text", choices=("text", "json"))
    o.add_argument("--no-uvloop", action="store_true", help="use the default asyncio event loop")
    o.add_argument("--no-gc-freeze", action="store_true",
                   help="leave start-up objects to the garbage collector (by default they are frozen after "
                        "warm-up: a full collection over torch and NeMo stalls every stream for ~0.3 s)")
    o.add_argument("--gc-threshold", default=DEFAULT_GC_THRESHOLD, metavar="G0,G1,G2",
                   help="garbage collector thresholds set after warm-up in every server process (Python's own: "
                        "700,10,10; empty: leave them); on an H100 at 1,024 streams these cut GC pauses from "
                        "780 ms to 45 ms per level and full collections from 11 to 0 (server/runtime/gc_policy.py)")
    o.add_argument("--gil-switch-ms", type=float, default=None,
                   help="Python's thread switch interval (default 5 ms): with --no-engine-worker the event loop "
                        "and the engine thread share one interpreter lock, and a shorter interval bounds how long "
                        "the loop waits for it while the engine thread runs Python")
    return p.parse_args(argv)


def build_settings(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        host=args.host, port=args.port, metrics_host=args.metrics_host,
        metrics_port=None if args.no_metrics else args.metrics_port,
        max_message_bytes=int(args.max_message_mb * (1 << 20)), drain_grace_s=args.drain_grace_s,
        drain_notice_s=args.drain_notice_s,
        stream_window_bytes=args.stream_window_kb * 1024,
        exit_on_engine_death_s=None if args.exit_on_engine_death_s < 0 else args.exit_on_engine_death_s,
        max_connection_age_s=args.max_connection_age_s or None,
        max_connection_age_grace_s=args.max_connection_age_grace_s or None,
        model_aliases=(args.model,), security=security_settings(args), gc_freeze=not args.no_gc_freeze,
        endpointing=EndpointingParams(
            start_history_ms=args.endpoint_start_history_ms, start_threshold=args.endpoint_start_threshold,
            stop_history_ms=args.endpoint_stop_history_ms, stop_threshold=args.endpoint_stop_threshold,
            stop_history_eou_ms=args.endpoint_stop_history_eou_ms, stop_threshold_eou=args.endpoint_stop_threshold_eou),
        gc_threshold=parse_threshold(args.gc_threshold),
        riva=RivaSettings(model_punctuates=args.riva_model_punctuates, model_written_form=args.riva_model_written_form),
        limits=TransportLimits(idle_timeout_s=args.idle_timeout_s,
                               max_audio_message_bytes=int(args.max_audio_message_kb * 1024),
                               recognize=RecognizeLimits(per_call_bytes=int(args.recognize_max_call_mb * (1 << 20)),
                                                         per_client_bytes=int(args.recognize_max_client_mb * (1 << 20)),
                                                         per_server_bytes=int(args.recognize_max_server_mb * (1 << 20)))),
        scheduler=SchedulerConfig(batch_wait_s=args.batch_wait_ms / 1000.0, overlap_at=args.overlap_at,
                                  wait_min_arrivals=args.batch_wait_min_chunks,
                                  max_stream_seconds=args.max_stream_seconds,
                                  response_buffer=args.response_buffer, max_pending_seconds=args.max_pending_s,
                                  stall_timeout_s=max(args.idle_timeout_s, 1.0),
                                  dead_after_failures=args.dead_after_failures,
                                  hang_timeout_s=args.engine_hang_s, hang_step_factor=args.engine_hang_factor),
    )


async def serve(engine: StreamingEngine, settings: ServerSettings, cores: list[tuple[str, StreamingEngine]] | None = None) -> int:
    """`cores`: (device, engine) of every engine core (server.runtime.engine_cores); None: `engine` alone."""
    server = AsrServer(engine, settings, scheduler=engine_cores(cores, settings) if cores else None)
    try:
        await server.start()
    except Exception as exc:  # noqa: BLE001 - a failed warm-up must stop start-up loudly
        log.critical("start-up failed", exc_info=exc)
        print(f"asr-server: start-up failed: {exc}", file=sys.stderr, flush=True)
        await server.stop()
        return 1
    loop = asyncio.get_running_loop()
    drain: list[asyncio.Task] = []

    def on_signal(signame: str) -> None:
        if drain:
            log.warning("second signal: stopping now", extra={"signal": signame})
            loop.create_task(server.stop())
            return
        log.info("signal received, draining", extra={"signal": signame})
        drain.append(loop.create_task(server.drain()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    metrics = f", metrics on http://{settings.metrics_host}:{server.metrics_port}/metrics" if server.metrics_port else ""
    # Scripts and tests wait for this line (it carries the real port when --port 0).
    count = len(cores or ())
    on_cores = f", {count} engine cores" if count > 1 else ""
    print(f"asr-server: listening on {settings.host}:{server.port} (engine {server.scheduler.engine_name}{on_cores})"
          f"{metrics}", flush=True)
    await server.wait_stopped()
    if server.engine_failure is not None:  # with several engine cores: every one of them
        print(f"asr-server: the engine failed ({server.engine_failure}); exiting with status {EXIT_ENGINE_DEAD} "
              "so that a supervisor restarts the server", file=sys.stderr, flush=True)
        return EXIT_ENGINE_DEAD
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    if args.frontends is not None and args.frontends < 1:
        print("asr-server: --frontends must be at least 1", file=sys.stderr)
        return 2
    if args.frontend_of is not None:  # a frontend process of an engine process: no model here
        # The parent's drain notice arrives as SIGUSR1 (server.service.frontends); until the handler is
        # set, it must not end the process.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        try:
            settings = build_settings(args)
        except ValueError as exc:
            print(f"asr-server: {exc}", file=sys.stderr)
            return 2
        _set_switch_interval(args)
        from server.service.frontends import serve_frontend
        return _runner(args)(serve_frontend(settings, args.frontend_of, args.frontend_name))
    if args.gil_switch_ms is not None and args.gil_switch_ms <= 0:
        print("asr-server: --gil-switch-ms must be positive", file=sys.stderr)
        return 2
    try:
        cfg = EngineConfig(model=args.model, engine=args.engine, device=args.device, dtype=args.dtype,
                           lookahead_ms=args.lookahead_ms, **engine_sizing_kwargs(args.max_streams, args.max_batch),
                           fallback_engine=args.fallback_engine, cache_dir=args.cache_dir, seed=args.seed,
                           cudagraph_compile=args.compile, profile_every=args.profile_every,
                           utterance_reset=args.utterance_reset, decode_stream=args.decode_stream,
                           step_kernels=args.step_kernels)
        settings = build_settings(args)
    except ValueError as exc:
        print(f"asr-server: {exc}", file=sys.stderr)
        return 2
    try:
        devices = core_devices(args)
    except ValueError as exc:
        print(f"asr-server: {exc}", file=sys.stderr)
        return 2
    print(f"asr-server: loading model {cfg.model} (engine {cfg.engine}, device {', '.join(devices)}, "
          f"lookahead {cfg.lookahead_ms} ms)", flush=True)
    try:
        cores = start_engines(args, cfg, settings, devices)
    except Exception as exc:  # an engine that cannot start must say why, not dump a traceback
        print(f"asr-server: cannot start: {exc}", file=sys.stderr, flush=True)
        return 1
    engine = cores[0][1]
    try:
        if engine.model_info.random_weights:
            print(f"asr-server: model {engine.model_info.name} has RANDOM weights: its transcripts are meaningless. "
                  "To serve a real model: asr-server --model /path/to/model.nemo", flush=True)
        _set_switch_interval(args)
        frontends, lines = resolve_frontends(args.frontends, engine, args.max_streams is None, args.max_batch is None,
                                             engine_cores=len(cores))
        if len(cores) > 1:  # the sizing line above is the first core's; each core has its own slots
            lines.append("engine cores: " + ", ".join(f"core {i} on {device}: {e.capacity} slots"
                                                      for i, (device, e) in enumerate(cores)))
        for line in lines:
            print(f"asr-server: {line}", flush=True)
        if frontends > 1:
            from server.service.frontends import serve_with_frontends
            return _runner(args)(serve_with_frontends(engine, settings, frontends, argv,
                                                      scheduler=engine_cores(cores, settings)))
        return _runner(args)(serve(engine, settings, cores))
    finally:
        _close_engines([e for _, e in cores])


def core_devices(args: argparse.Namespace) -> list[str]:
    """The device of every engine core: --engine-cores on each of --gpus, or on --device."""
    if args.engine_cores < 1:
        raise ValueError("--engine-cores must be at least 1")
    if args.engine_cores > 1 and args.max_streams is None and args.device != "cpu":
        # `--max-streams auto` sizes an engine's slots from the device memory free after it
        # loaded: cores sharing one GPU would each count the same memory.
        raise ValueError("several engine cores on one device need --max-streams (per core) in place of auto "
                         "(on the CPU: --device cpu)")
    if args.gpus is None:
        return [args.device] * args.engine_cores
    if args.device != "auto":
        raise ValueError("--gpus and --device exclude each other (--gpus names the CUDA devices)")
    visible = visible_gpu_count()
    if args.gpus.strip() == "all":
        indices = list(range(visible))
    else:
        try:
            indices = [int(part) for part in args.gpus.split(",")]
        except ValueError:
            raise ValueError(f"--gpus {args.gpus!r}: expected all or GPU indices such as 0,1") from None
        if len(set(indices)) != len(indices) or min(indices) < 0:
            raise ValueError(f"--gpus {args.gpus!r}: each GPU index once, none negative")
    if not visible:
        raise ValueError(f"--gpus {args.gpus}: no CUDA GPU is visible on this machine (for several engine cores "
                         "on the CPU: --device cpu --engine-cores N)")
    if not indices or max(indices) >= visible:
        raise ValueError(f"--gpus {args.gpus}: {visible} CUDA GPU(s) visible (indices 0-{visible - 1})")
    return [f"cuda:{i}" for i in indices for _ in range(args.engine_cores)]


def visible_gpu_count() -> int:
    """CUDA devices torch sees, asked in a short child process: this one stays free of torch and
    of CUDA state (the engine workers are spawned fresh)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise ValueError(f"--gpus: cannot count the CUDA devices: {out.stderr.strip()[-300:]}")
    return int(out.stdout.strip().splitlines()[-1])


def start_engines(args: argparse.Namespace, cfg: EngineConfig, settings: ServerSettings,
                  devices: list[str]) -> list[tuple[str, StreamingEngine]]:
    """(device, engine) of every core, started at once; if one cannot start, the others are closed."""
    import concurrent.futures
    import dataclasses

    if len(devices) == 1:
        return [(devices[0], start_engine(args, cfg, settings))]
    with concurrent.futures.ThreadPoolExecutor(len(devices)) as pool:
        futures = [pool.submit(start_engine, args, dataclasses.replace(cfg, device=d), settings) for d in devices]
        concurrent.futures.wait(futures)
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:
        _close_engines([f.result() for f in futures if f.exception() is None])
        raise failed[0]
    return [(d, f.result()) for d, f in zip(devices, futures)]


def engine_cores(cores: list[tuple[str, StreamingEngine]], settings: ServerSettings):
    """One scheduler per engine, behind the router (server.runtime.engine_cores)."""
    from server.runtime.engine_cores import EngineCore, EngineCores
    from server.scheduling.scheduler import Scheduler

    return EngineCores([EngineCore(i, device, Scheduler(engine, settings.scheduler))
                        for i, (device, engine) in enumerate(cores)])


def _close_engines(engines: list[StreamingEngine]) -> None:
    for engine in engines:
        close = getattr(engine, "close", None)
        if callable(close):
            close()


def start_engine(args: argparse.Namespace, cfg: EngineConfig, settings: ServerSettings) -> StreamingEngine:
    """The engine, in a worker process (the default) or in this one (--no-engine-worker)."""
    from server.runtime.engine_worker import ChildOptions, EngineWorker
    from server.runtime.worker_process import load_factory

    if args.no_engine_worker:
        return load_factory(args.engine_factory)(cfg)

    engine = EngineWorker.start(args.engine_factory, cfg, ChildOptions(
        log_level=args.log_level, log_format=args.log_format, gc_freeze=settings.gc_freeze,
        gc_threshold=settings.gc_threshold))
    print(f"asr-server: engine worker process {engine.pid} ready ({cfg.device})", flush=True)
    return engine


def _set_switch_interval(args: argparse.Namespace) -> None:
    if args.gil_switch_ms is not None:
        sys.setswitchinterval(args.gil_switch_ms / 1000.0)


def _runner(args: argparse.Namespace):
    if not args.no_uvloop:
        try:
            import uvloop

            return uvloop.run
        except ImportError:
            pass
    return asyncio.run


if __name__ == "__main__":
    sys.exit(main())
