"""Time one batched streaming step (features + encoder + RNNT decode) of StreamingEngine, beside
NeMo's own `conformer_stream_step` (encoder + NeMo greedy decoding with partial hypotheses) on
the same model, batch and device.

  python bench/step_bench.py --model builtin:nemotron-0.6b --device cuda --dtype float16 \
      --lookaheads 160,560 --batches 1,16,64,256 --out bench/results/step_h100.json

Streams are in steady state (caches full after warm-up steps); each figure is the median of
--iters steps. Also reports the slot pool's bytes per stream and the step's phases (timed with a
device sync at each boundary, in separate steps). `--ring both` times the attention cache kept as a
ring (the commit writes a step's new frames) against whole windows, alternating on each batch:

  python bench/step_bench.py --model builtin:nemotron-0.6b --device cuda --dtype float16 \
      --engine fast-cudagraph --lookaheads 160,560 --batches 64,256,512 --ring both --repeats 3 --no-nemo

`--feature-graphs both` does the same for the features' CUDA graphs (engines/features.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from engines.api import STEP_PHASES, ChunkWork, StepPlan
from engines.config import EngineConfig
from engines.encoders import EagerEncoder
from engines.factory import make_encoder_engine, resolve_device, resolve_dtype
from engines.models import load_model, speechlike_audio
from engines.streaming_engine import StreamingEngine


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench_ours(engine: StreamingEngine, batch: int, iters: int, warm: int) -> dict:
    g = engine.geometry
    dev = engine.device
    slots = [engine.acquire_slot() for _ in range(batch)]
    audio = speechlike_audio(g.samples_needed(warm + iters + 2) / g.sample_rate + 1, seed=1)
    totals, phases = [], []
    try:
        for k in range(warm + iters):
            chunks = []
            for i, s in enumerate(slots):
                a, b = g.chunk_span(k, len(audio), False)
                chunks.append(ChunkWork(f"s{i}", s, audio[a:b], k == 0, False))
            plan = StepPlan(tuple(chunks))
            _sync(dev)
            t0 = time.perf_counter()
            res = engine.step(plan)
            _sync(dev)
            if k >= warm:
                totals.append(1e3 * (time.perf_counter() - t0))
                phases.append(res.timings)
    finally:
        for s in slots:
            engine.release_slot(s)
    out = {"step_ms": statistics.median(totals)}
    for name in PHASES:
        out[f"{name}_ms"] = statistics.median(p.phases()[name] for p in phases)
    return out


# the step's phases (engines.api.StepTimings.phases: `features` without the assemble and gather
# before it; until 2026-12-07 this script's features column included both), each timed to the
# device's end of its work when the engine synchronizes at phase boundaries (sync_timings)
PHASES = STEP_PHASES


def profile_steps(engine: StreamingEngine, batch: int, steps: int, warm: int, label: str, top: int = 22,
                  trace: str | None = None) -> None:
    """torch.profiler over `steps` steady-state steps: the operators by the host's own time and by
    the device's, per step, so it shows which of the step's host work leaves the device waiting.
    `trace`: also the whole timeline as a Chrome trace there (every kernel, and the gaps between)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        bench_ours(engine, batch, steps, warm)
    if trace:
        prof.export_chrome_trace(trace)
    events = prof.key_averages()
    device_key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    n = steps + warm
    # The device's time is the kernels' (and copies') own events: an operator's self device time is
    # its kernels' again, so a sum over every event counts each kernel twice (until 2026-12-07 this
    # line did: run 51's "35.94 ms of kernel time" a step was about 24 ms of device time).
    device_ms = sum(getattr(e, device_key, 0) for e in events if e.device_type != DeviceType.CPU) / n / 1e3
    print(f"\n## profile: {label}; {n} steps (per step: host {sum(e.self_cpu_time_total for e in events) / n / 1e3:.2f} ms of "
          f"operator time, device {device_ms:.2f} ms of kernel time)")
    for key, what in (("self_cpu_time_total", "host"), (device_key, "device")):
        print(f"### by {what} time, ms per step: operator, host self, device self, calls per step")
        for e in sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:top]:
            print(f"  {e.key[:60]:60s} {e.self_cpu_time_total / n / 1e3:7.3f} {getattr(e, device_key, 0) / n / 1e3:7.3f} "
                  f"{e.count / n:7.1f}")
    sys.stdout.flush()


def bench_nemo(model, batch: int, iters: int, warm: int, dev, dtype) -> dict:
    enc = model.encoder
    cfg = enc.streaming_cfg
    T = cfg.chunk_size[1] + cfg.pre_encode_cache_size[1]
    x = torch.randn(batch, enc._feat_in, T, device=dev, dtype=dtype)
    lengths = torch.full((batch,), T, dtype=torch.long, device=dev)
    cc, ct, ccl = enc.get_initial_cache_state(batch_size=batch, dtype=dtype, device=dev)
    hyps = None
    times = []
    with torch.inference_mode():
        for k in range(warm + iters):
            _sync(dev)
            t0 = time.perf_counter()
            out = model.conformer_stream_step(processed_signal=x, processed_signal_length=lengths,
                                              cache_last_channel=cc, cache_last_time=ct, cache_last_channel_len=ccl,
                                              keep_all_outputs=False, previous_hypotheses=hyps,
                                              return_transcription=True)
            hyps, cc, ct, ccl = out[1], out[2], out[3], out[4]
            _sync(dev)
            if k >= warm:
                times.append(1e3 * (time.perf_counter() - t0))
    return {"nemo_step_ms": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:nemotron-0.6b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--lookaheads", default="160,560")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warm", type=int, default=4)
    ap.add_argument("--no-nemo", action="store_true", help="skip NeMo's own step")
    ap.add_argument("--engine", default="eager", help="encoder engine (engines.config.ENGINE_NAMES)")
    ap.add_argument("--ring", choices=("on", "off", "both"), default="on",
                    help="the attention cache as a ring in the slot pool (engines with cache_shift_frames); "
                         "both: A/B, the two engines alternating on each batch")
    ap.add_argument("--encoder-graphs", choices=("on", "off"), default="on",
                    help="off: the Triton kernel sets' encoder runs its ops one by one, not from CUDA graphs "
                         "(slower; with --profile every kernel is then counted under the operator that "
                         "launched it, where a graph's kernels show by kernel name only)")
    ap.add_argument("--feature-graphs", choices=("on", "off", "both"), default="on",
                    help="the features in a CUDA graph per batch bucket (engines/features.py FeatureGraphs; GPU and a "
                         "bucketed encoder only); both: A/B, as --ring")
    ap.add_argument("--kernels", default="torch",
                    help="comma-separated kernel sets of the fast-cudagraph engine, an A/B when several: torch "
                         "(PyTorch's: SDPA over the gathered cache), attention (engines/step_attention.py reading the "
                         "cache in the slot pool, no gather), fused (engines/fused_norms.py and "
                         "engines/subsampling_kernels.py), triton (both), triton-cudnnconv (triton with the "
                         "subsampling's convs by cuDNN over a padded copy: the A/B of masked_conv)")
    ap.add_argument("--repeats", type=int, default=1, help="alternations per batch with an A/B (--ring or --feature-graphs both)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="also run STEPS steps per batch under torch.profiler and print the top operators")
    ap.add_argument("--profile-top", type=int, default=22, help="operators listed by each of the profile's orders")
    ap.add_argument("--profile-trace", default=None, metavar="PREFIX",
                    help="also write each profile's timeline as a Chrome trace, PREFIX_<lookahead>_<batch>_<kernels>.json")
    ap.add_argument("--attention-tuning", default="",
                    help="the attention kernel's launch, as engines.step_attention.parse_tuning reads it "
                         "(bench/attention_bench.py --tuning-out writes the measured best); default: "
                         "step_attention.TUNING")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.attention_tuning:
        from engines import step_attention
        step_attention.TUNING.update(step_attention.parse_tuning(args.attention_tuning))
        print(f"# attention tuning: {step_attention.TUNING}", flush=True)

    dev = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, dev)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for la in [int(v) for v in args.lookaheads.split(",")]:
        t = time.time()
        model = load_model(args.model, la)
        nemo = model.nemo_model.to(device=dev, dtype=dtype if dtype != torch.float32 else None)
        nemo.preprocessor.to(dtype=torch.float32)
        nemo.eval()
        print(f"# loaded {args.model} at {la} ms in {time.time() - t:.1f} s", flush=True)
        kernel_sets = [k.strip() for k in args.kernels.split(",") if k.strip()]
        unknown = set(kernel_sets) - {"torch", "attention", "fused", "triton", "triton-cudnnconv"}
        if unknown or not kernel_sets:
            ap.error(f"--kernels: unknown kernel sets {sorted(unknown)}")
        encoders = {}
        cfg = EngineConfig(model=args.model, engine=args.engine, lookahead_ms=la, max_streams=max(batches),
                           max_batch=max(batches))
        for kernels in kernel_sets:
            if args.engine == "eager":
                encoders[kernels] = EagerEncoder(nemo.encoder)
            elif kernels == "torch":
                encoders[kernels] = make_encoder_engine(args.engine, model, cfg, dev, dtype)
            else:  # the Triton kernels, one set or both (fast-cudagraph only)
                from engines.fast_engines import build_fast_encoder
                reads_pool = kernels in ("attention", "triton", "triton-cudnnconv")
                encoders[kernels] = build_fast_encoder(
                    model, cfg, dev, dtype, graphs=True, attention="kernel" if reads_pool else "sdpa",
                    fused_norms=kernels != "attention", use_graphs=args.encoder_graphs == "on",
                    masked_convs=kernels != "triton-cudnnconv",
                    # whole windows (ring off) gather the cache into the workspace, for the kernel too
                    **({"workspace_cache": True} if args.ring != "on" and reads_pool else {}))
        choice = {"on": [True], "off": [False], "both": [False, True]}
        # (kernel set, ring cache, feature graphs) of each engine; an A/B alternates them on each batch
        variants = [(a, ring, fg) for a in kernel_sets for ring in choice[args.ring] for fg in choice[args.feature_graphs]]
        engines = {v: StreamingEngine(model, encoders[v[0]], la, capacity=max(batches), max_batch=max(batches),
                                      device=dev, dtype=dtype, ring_cache=v[1], feature_graphs=v[2]) for v in variants}
        for b in batches:
            runs: dict[tuple, list[dict]] = {v: [] for v in variants}
            for _ in range(args.repeats if len(variants) > 1 else 1):
                for variant, engine in engines.items():
                    engine.sync_timings = True
                    phases = bench_ours(engine, b, max(3, args.iters // 2), args.warm)
                    engine.sync_timings = False
                    run = bench_ours(engine, b, args.iters, args.warm)
                    # unsynchronized, a phase's time is the host's (launches, numpy, Python) up to
                    # the first implicit wait for the device (the decode's lengths copy)
                    run = {"step_ms": run["step_ms"], **{f"host_{k}": v for k, v in run.items() if k != "step_ms"}}
                    run.update({k: v for k, v in phases.items() if k != "step_ms"})
                    runs[variant].append(run)
            if args.profile:
                for (kernels, ring, fg), engine in engines.items():
                    profile_steps(engine, b, args.profile, args.warm, f"{la} ms, batch {b}, kernels {kernels}, "
                                                                      f"ring {'on' if ring else 'off'}, "
                                                                      f"feature graphs {'on' if fg else 'off'}",
                                  top=args.profile_top,
                                  trace=args.profile_trace and f"{args.profile_trace}_{la}_{b}_{kernels}.json")
            nemo_ms = {} if args.no_nemo else bench_nemo(nemo, b, args.iters, args.warm, dev, dtype)
            for variant, engine in engines.items():
                ran = engine.encoder_engine  # what really runs (a kernel set named here is built as named, or fails)
                row = {"lookahead_ms": la, "batch": b, "kernels": variant[0], "cache_in_place": engine.cache_in_place,
                       "attention": getattr(ran, "attention", "sdpa"),
                       "fused_norms": bool(getattr(getattr(ran, "parts", None), "fused", False)),
                       "ring_cache": engine.ring_cache,
                       "feature_graphs": engine.featurizer.graphs is not None}
                row.update({k: statistics.median(r[k] for r in runs[variant]) for k in runs[variant][0]})
                row.update(nemo_ms)
                row["pool_bytes_per_slot"] = engine.pool.bytes_per_slot()
                rows.append(row)
                print(json.dumps(row), flush=True)
        del engines, encoders, nemo, model
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    print(f"\n{args.model} {dtype} on {gpu}, encoder engine {args.engine}; median of {args.iters} steady-state steps\n")
    print("| lookahead | batch | kernels | ring | feature graphs | our step ms | " + " | ".join(PHASES)
          + " | NeMo conformer_stream_step ms | slot MB |")
    print("|---|---|---|---|---|---|" + "---|" * len(PHASES) + "---|---|")
    for r in rows:
        print(f"| {r['lookahead_ms']} | {r['batch']} | {r['kernels']}{' (cache read in the pool)' if r['cache_in_place'] else ''} | "
              f"{'on' if r['ring_cache'] else 'off'} | "
              f"{'on' if r['feature_graphs'] else 'off'} | {r['step_ms']:.2f} | "
              + " | ".join(f"{r[f'{n}_ms']:.2f}" for n in PHASES)
              + f" | {r.get('nemo_step_ms', float('nan')):.1f} | {r['pool_bytes_per_slot'] / 2**20:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "engine": args.engine, "dtype": str(dtype), "device": gpu, "torch": torch.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
