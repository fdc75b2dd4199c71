"""Steps per second of the engine run the way the engine worker runs it, with the decode on a CUDA
stream of its own against one stream, on one engine, alternating.

The worker keeps two steps in flight, each stream in one of them, and begins the next step's
device work behind the current one's (server/runtime/worker_process.py `finish_step`). With one stream
it can do so only once the current step has decoded and committed (DEVICE_DONE): the decode loop
waits for the device every few iterations and the host then reads the results back, so the device
idles between one step's decode and the next step's features. With a decode stream
(StreamingEngine.decode_stream) the next step is begun as soon as the current step's encoder is
queued (QUEUED), and its features, gather and encoder run while the current step decodes.

Here the next step is always at hand (as when the scheduler has sent it in time), so the figure is
what the engine process can carry when the link and the scheduler keep up: steps per second and
rows per second at each batch, per mode. Both modes start the same streams on the same audio, and
their tokens must be equal (checked; a mismatch fails the run). The stepping is the server's own
start-up timing of `--decode-stream auto` (engines.decode_overlap), here at several batches and
with more steps: the streams read 16 distinct speech-like clips (stream i reads clip i % 16).

    python bench/pipeline_bench.py --model builtin:nemotron-0.6b --device cuda --dtype float16 \\
        --engine fast-cudagraph --lookahead 160 --batches 256,512 --steps 40 --repeats 2 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.provenance import describe, source_revision  # noqa: E402
from engines.config import EngineConfig  # noqa: E402
from engines.decode_overlap import time_mode, timing_clips  # noqa: E402
from engines.factory import build_engine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:nemotron-0.6b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--engine", default="fast-cudagraph")
    ap.add_argument("--lookahead", type=int, default=160)
    ap.add_argument("--batches", default="256,512")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per batch and mode (after 4 untimed)")
    ap.add_argument("--repeats", type=int, default=2, help="alternations of the two modes per batch")
    ap.add_argument("--step-kernels", choices=("torch", "triton"), default="torch",
                    help="the fast-cudagraph engine's kernels (asr-server --step-kernels)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cfg = EngineConfig(model=args.model, engine=args.engine, device=args.device, dtype=args.dtype,
                       lookahead_ms=args.lookahead, max_streams=2 * max(batches), max_batch=max(batches), decode_stream="on",
                       step_kernels=args.step_kernels)
    revision = source_revision()  # before the run: the source that runs
    print(f"# source: {describe(revision)}", flush=True)
    t0 = time.perf_counter()
    engine = build_engine(cfg)
    engine.warmup()
    print(f"# {args.model} {engine.dtype} on {engine.device}, encoder engine {engine.encoder_engine.name}, "
          f"ready in {time.perf_counter() - t0:.1f} s; decode stream: {engine.decode_stream is not None}; "
          f"attention: {getattr(engine.encoder_engine, 'attention', 'sdpa')}, "
          f"fused norms: {getattr(getattr(engine.encoder_engine, 'parts', None), 'fused', False)}"
          f"{' (the cache read in the pool)' if engine.cache_in_place else ''}", flush=True)
    if engine.decode_stream is None:  # the CPU: the order of the stages alone (checks this script and the staging)
        print("# no decode stream on this device (CUDA only): both modes run on one stream, the "
              "next step begun at QUEUED or at DEVICE_DONE", flush=True)
    chunk_s = engine.geometry.chunk_samples / engine.geometry.sample_rate
    modes = {"decode stream": True, "one stream": False}
    ring = timing_clips(engine, args.steps + 4)
    rows_out = []
    for batch in batches:
        seconds: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, list[float]] = {m: [] for m in modes}
        tokens: dict[str, list] = {}
        for _ in range(args.repeats):
            for mode, on in modes.items():
                took, used, out = time_mode(engine, ring, batch, on, timed_steps=args.steps, untimed_steps=4)
                seconds[mode].append(took)
                cpu[mode].append(used)
                tokens.setdefault(mode, out)
        same = tokens["decode stream"] == tokens["one stream"]
        decoded = sum(len(t) for step in tokens["one stream"] for t in step)
        row = {"batch": batch, "same_tokens": same, "tokens": decoded}
        for mode in modes:
            ms = 1e3 * min(seconds[mode])
            best = seconds[mode].index(min(seconds[mode]))
            row[mode] = {"step_ms": round(ms, 3), "step_ms_all": [round(1e3 * s, 3) for s in seconds[mode]],
                         "host_cpu_ms": round(1e3 * cpu[mode][best], 3),
                         "rows_per_s": round(batch / ms * 1e3, 1),
                         "realtime_streams": round(batch / ms * 1e3 * chunk_s, 0)}
        row["speedup"] = round(row["one stream"]["step_ms"] / row["decode stream"]["step_ms"], 3)
        rows_out.append(row)
        print(json.dumps(row), flush=True)
        if not same:
            print(f"batch {batch}: the two modes decoded different tokens", file=sys.stderr)
    print("\n| batch | one stream ms/step | decode stream ms/step | speedup | host CPU ms/step (decode stream) | "
          "rows/s (decode stream) | real-time streams at this step rate | tokens equal |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['batch']} | {r['one stream']['step_ms']:.2f} | {r['decode stream']['step_ms']:.2f} | "
              f"{r['speedup']:.2f}x | {r['decode stream']['host_cpu_ms']:.2f} | {r['decode stream']['rows_per_s']:.0f} | "
              f"{r['decode stream']['realtime_streams']:.0f} | {r['same_tokens']} ({r['tokens']} tokens) |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "source_revision": revision, "machine": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "model": args.model, "engine": engine.encoder_engine.name,
            "attention": getattr(engine.encoder_engine, "attention", "sdpa"), "cache_in_place": engine.cache_in_place,
            "dtype": str(engine.dtype), "lookahead_ms": args.lookahead, "steps": args.steps, "repeats": args.repeats,
            "rows": rows_out}, indent=1))
    return 0 if all(r["same_tokens"] for r in rows_out) else 1


if __name__ == "__main__":
    sys.exit(main())
