"""Encoder-engine benchmark and parity check: every encoder engine against NeMo's eager module.

Per lookahead, variant and batch: ms per encoder step (median of steady-state steps, input
copies included, device synchronised around each step), achieved TFLOP/s (FLOPs of the step
counted once per batch with torch.utils.flop_counter on the eager module), max abs / rel error
of the encoder outputs and next caches vs eager on the same inputs, and memory. Per lookahead
and variant: token agreement with eager over many streams (full StreamingEngine steps: features,
encoder, RNNT decoding, streams at different positions), and graph capture / compile time.

On an H100 (what the lead runs; no network needed, builtin models have random weights):

  python bench/encoder_bench.py --model builtin:nemotron-0.6b --device cuda --dtype float16 \\
      --lookaheads 560,160 --batches 1,16,64,256,1024 --out bench/results/encoder_h100.json

Quick CPU check of the script itself:

  python bench/encoder_bench.py --device cpu --model builtin:tiny --batches 1,2 --out /tmp/enc.json

Variants (--variants, default: all that can run on the device). CUDA: eager (NeMo's module, the
reference), cudagraph (engines/cudagraph_engine.py), cudagraph+sdpa (torch SDPA attention),
fast-cudagraph (engines/fast_conformer.py, projected K/V cache, when present), cudagraph+compile
and fast-cudagraph+compile (torch.compile under the graphs), onnx-cuda (needs onnxruntime-gpu),
tensorrt (needs TensorRT); on request also cudagraph+compile+sdpa and cudagraph+compile-step
(whole-step compile: slow to build). CPU: eager, cudagraph-nograph (the CUDA-graph engine's
bucket/padding path without capture), fast, onnx. Variants that cannot run here are listed as
skipped with the reason. Engines with their own cache layout (fast-*) are timed on zero caches
of that layout; their parity comes from the self-check (streams at different positions, each
engine carrying its own caches) and the token agreement, not from the per-batch error columns.

Work runs in priority order (cheap and important first) within --time-budget seconds; what is
left when the budget is spent is reported as skipped. The JSON file is rewritten after every
measurement, so an interrupted run still leaves its results.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engines.api import ChunkWork, StepPlan  # noqa: E402
from engines.config import LOOKAHEAD_TO_RIGHT_CONTEXT  # noqa: E402
from engines.cudagraph_engine import CudaGraphEncoder, set_sdpa  # noqa: E402
from engines.encoders import EagerEncoder  # noqa: E402
from engines.export import encoder_io  # noqa: E402
from engines.factory import resolve_device, resolve_dtype  # noqa: E402
from engines.models import load_model, speechlike_audio  # noqa: E402
from engines.streaming_engine import StreamingEngine  # noqa: E402

CUDA_VARIANTS = ("eager", "cudagraph", "cudagraph+sdpa", "fast-cudagraph", "cudagraph+compile",
                 "fast-cudagraph+compile", "onnx-cuda", "tensorrt")
CPU_VARIANTS = ("eager", "cudagraph-nograph", "fast", "onnx")
ALL_VARIANTS = tuple(dict.fromkeys(CUDA_VARIANTS + CPU_VARIANTS + ("cudagraph+compile+sdpa", "cudagraph+compile-step",
                                                                   "fast")))
# Seconds of budget a variant needs left before it starts (compilation and exports are slow).
RESERVE_S = {"compile": 150.0, "onnx": 90.0, "tensorrt": 150.0}


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def set_lookahead(model, lookahead_ms: int) -> None:
    enc = model.nemo_model.encoder
    right = LOOKAHEAD_TO_RIGHT_CONTEXT[lookahead_ms]
    ctx = next(c for c in enc.att_context_size_all if c[1] == right)
    enc.set_default_att_context_size(list(ctx))


def mem_allocated(dev) -> int:
    return torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0


def free(dev) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()


# -- inputs -------------------------------------------------------------------------------------
class Inputs:
    """Steady-state encoder inputs for up to max_batch rows: log-mel windows of speech-like
    audio and caches made by two eager steps, with a quarter of the rows fresh (caches at
    different fill levels). Each batch takes the first `b` rows, made contiguous."""

    @torch.inference_mode()
    def __init__(self, model, max_batch: int, dev, dtype, seed: int = 0):
        enc = model.nemo_model.encoder
        io = encoder_io(model)
        self.io = io
        audio = torch.from_numpy(speechlike_audio(12.0, seed=seed))[None].to(dev)
        with torch.inference_mode():
            mel, _ = model.nemo_model.preprocessor(input_signal=audio,
                                                   length=torch.tensor([audio.shape[1]], device=dev))
        mel = mel[0].float()
        n = mel.shape[1] - io.frames_in - 1
        g = torch.Generator().manual_seed(seed)
        eager = EagerEncoder(enc)
        cc, ct, ccl = enc.get_initial_cache_state(batch_size=max_batch, dtype=dtype, device=dev)
        fresh = torch.arange(max_batch, device=dev) % 4 == 3
        for step in range(3):
            offs = torch.randint(0, n, (max_batch,), generator=g).tolist()
            feats = torch.stack([mel[:, o:o + io.frames_in] for o in offs]).to(dtype)
            lengths = torch.full((max_batch,), io.frames_in, dtype=torch.int64, device=dev)
            if step < 2:
                _, _, cc, ct, ccl = (t.clone() for t in eager.step(feats, lengths, cc, ct, ccl))
                if step == 0:
                    cc[:, fresh] = 0
                    ct[:, fresh] = 0
                    ccl[fresh] = 0
        self.full = (feats, lengths, cc, ct, ccl)

    def batch(self, b: int, channel_shape=None):
        """The first b rows. `channel_shape` ([L, C, D] without the batch): an engine's own
        attention-cache layout, given as zeros (timing only: no step has data-dependent work)."""
        feats, lengths, cc, ct, ccl = self.full
        if channel_shape is not None and tuple(channel_shape) != (cc.shape[0], *cc.shape[2:]):
            cc_b = cc.new_zeros((channel_shape[0], b, *channel_shape[1:]))
        else:
            cc_b = cc[:, :b].contiguous()
        return (feats[:b].contiguous(), lengths[:b].contiguous(), cc_b, ct[:, :b].contiguous(),
                ccl[:b].contiguous())


# -- measurements -------------------------------------------------------------------------------
def count_flops(model, inputs) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    eager = EagerEncoder(model.nemo_model.encoder)
    with FlopCounterMode(display=False) as fc:
        eager.step(*inputs)
    return int(fc.get_total_flops())


def time_steps(engine, inputs, dev, target_s: float, max_iters: int) -> dict:
    times = []
    for _ in range(2):  # warm-up
        sync(dev)
        t0 = time.perf_counter()
        engine.step(*inputs)
        sync(dev)
        times.append(time.perf_counter() - t0)
    est = max(min(times), 1e-5)
    iters = int(min(max_iters, max(3, target_s / est)))
    times = []
    for _ in range(iters):
        sync(dev)
        t0 = time.perf_counter()
        engine.step(*inputs)
        sync(dev)
        times.append(1e3 * (time.perf_counter() - t0))
    times.sort()
    return {"ms": statistics.median(times), "ms_p10": times[len(times) // 10],
            "ms_p90": times[min(len(times) - 1, (9 * len(times)) // 10)], "iters": iters}


def errors(model, engine, inputs) -> dict:
    eager = EagerEncoder(model.nemo_model.encoder)
    with torch.inference_mode():
        ref = [t.clone() for t in eager.step(*inputs)]
        got = [t.clone() for t in engine.step(*inputs)]
    n = int(ref[1].max())
    mask = (torch.arange(n, device=ref[0].device)[None, None, :] < ref[1][:, None, None]).to(ref[0].dtype)
    out = {"lengths_equal": bool(torch.equal(got[1].long(), ref[1].long()) and torch.equal(got[4].long(), ref[4].long()))}
    for name, a, b in (("enc", got[0][..., :n] * mask, ref[0][..., :n] * mask), ("cache_channel", got[2], ref[2]),
                       ("cache_time", got[3], ref[3])):
        if a.shape != b.shape:
            out[f"{name}_abs"] = out[f"{name}_rel"] = None
            continue
        d = (a.float() - b.float()).abs().max().item()
        out[f"{name}_abs"] = d
        out[f"{name}_rel"] = d / max(b.float().abs().max().item(), 1e-12)
    out["max_abs"] = max(v for k, v in out.items() if k.endswith("_abs") and v is not None)
    out["max_rel"] = max(v for k, v in out.items() if k.endswith("_rel") and v is not None)
    return out


def levenshtein(a: list[int], b: list[int]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


_AUDIO: dict = {}


def _audios(streams: int, seconds: float) -> list[np.ndarray]:
    key = (streams, seconds)
    if key not in _AUDIO:
        _AUDIO[key] = [speechlike_audio(seconds * (0.6 + 0.4 * ((i * 7) % 10) / 9), seed=100 + i)
                       for i in range(streams)]
    return _AUDIO[key]


def run_streams(model, encoder, lookahead, streams: int, seconds: float, dev, dtype) -> tuple[dict, int]:
    """All streams through StreamingEngine.step, streams joining at staggered steps (mixed
    positions, varying batch sizes)."""
    engine = StreamingEngine(model, encoder, lookahead, capacity=streams, max_batch=streams, device=dev, dtype=dtype)
    g = engine.geometry
    audios = _audios(streams, seconds)
    slots = [engine.acquire_slot() for _ in range(streams)]
    k = [0] * streams
    done = [False] * streams
    tokens: dict[str, list[int]] = {f"s{i}": [] for i in range(streams)}
    step = 0
    try:
        while not all(done):
            chunks = []
            for i, a in enumerate(audios):
                if done[i] or step < i % 4:
                    continue
                lo, hi = g.chunk_span(k[i], a.size, True)
                # The last chunk ends the stream even when a few trailing samples make no frame.
                last = hi == a.size or k[i] == g.total_chunks(a.size) - 1
                chunks.append(ChunkWork(f"s{i}", slots[i], a[lo:hi], first=k[i] == 0, audio_ended=last))
            step += 1
            if not chunks:
                continue
            for u in engine.step(StepPlan(tuple(chunks))).updates:
                i = int(u.stream_id[1:])
                tokens[u.stream_id] += [t.token_id for t in u.tokens]
                k[i] += 1
                done[i] = u.is_final
    finally:
        for s in slots:
            engine.release_slot(s)
    return tokens, engine.pool.bytes_per_slot()


def agreement(ref: dict[str, list[int]], got: dict[str, list[int]]) -> dict:
    dist = sum(levenshtein(ref[s], got[s]) for s in ref)
    total = sum(len(v) for v in ref.values())
    same = sum(ref[s] == got[s] for s in ref)
    return {"streams": len(ref), "streams_identical": same, "ref_tokens": total,
            "token_edit_distance": dist, "token_agreement": 1.0 - dist / max(total, 1)}


# -- variants -----------------------------------------------------------------------------------
def variant_reason(name: str, dev) -> str | None:
    """Why a variant cannot run here, or None."""
    if name not in ALL_VARIANTS:
        return f"unknown variant (choose from {', '.join(ALL_VARIANTS)})"
    if dev.type == "cuda" and name in ("cudagraph-nograph", "onnx"):
        return "CPU-only variant"
    if dev.type != "cuda" and name.startswith(("cudagraph", "onnx-cuda", "tensorrt", "fast-cudagraph")) \
            and name != "cudagraph-nograph":
        return "needs CUDA"
    if name.startswith("fast"):
        try:
            import engines.fast_conformer  # noqa: F401
        except Exception as e:
            return f"engines.fast_conformer is not importable ({type(e).__name__}: {e})"
        if dev.type != "cuda" and name != "fast":
            return "needs CUDA"
    if name.startswith("onnx"):
        try:
            import onnxruntime as ort
        except Exception as e:
            return f"onnxruntime is not importable ({e})"
        if name == "onnx-cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (needs onnxruntime-gpu)"
    if name == "tensorrt":
        from engines.tensorrt_engine import tensorrt_available
        ok, why = tensorrt_available()
        if not ok:
            return why
    return None


def build_variant(name: str, model, lookahead: int, dev, dtype, buckets: list[int], cache_dir: str):
    enc = model.nemo_model.encoder
    io = encoder_io(model)
    if name == "eager":
        return EagerEncoder(enc)
    if name.startswith("fast"):
        from engines.fast_engines import build_fast_encoder
        cfg = SimpleNamespace(max_batch=max(buckets), lookahead_ms=lookahead, cache_dir=cache_dir)
        options = {"compile": True} if "compile" in name else {}
        if "compile" in name:
            torch._dynamo.reset()
        if "cudagraph" in name:
            options["buckets"] = tuple(buckets)
            return build_fast_encoder(model, cfg, dev, dtype, graphs=True, **options)
        return build_fast_encoder(model, cfg, dev, dtype, graphs=False, **options)
    if name == "cudagraph-nograph":
        return CudaGraphEncoder(enc, io, dev, dtype, max(buckets), buckets=buckets, use_graphs=False)
    if name.startswith("cudagraph"):
        compile_ = "compile" in name
        sdpa = "sdpa" in name
        scope = "step" if "compile-step" in name else "layers"
        if compile_:
            torch._dynamo.reset()
        try:
            return CudaGraphEncoder(enc, io, dev, dtype, max(buckets), buckets=buckets, compile=compile_,
                                    compile_scope=scope, sdpa=sdpa)
        finally:
            if sdpa:  # the captured graphs keep SDPA; the shared module (eager reference) goes back
                set_sdpa(enc, False)
    if name.startswith("onnx"):
        from engines.export import export_encoder_onnx
        from engines.onnx_engine import OnnxEncoder, OnnxRunner
        exported = export_encoder_onnx(model, lookahead, cache_dir)
        return OnnxEncoder(enc, OnnxRunner(exported.path, exported.io, dev), exported.key, exported.cache_hit)
    if name == "tensorrt":
        from engines.tensorrt_engine import build_tensorrt_encoder
        cfg = SimpleNamespace(max_batch=max(buckets), lookahead_ms=lookahead, cache_dir=cache_dir)
        return build_tensorrt_encoder(model, cfg, dev, dtype)
    raise ValueError(name)


# -- report -------------------------------------------------------------------------------------
def write_json(path: str | None, report: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(tmp, path)


def fmt(v, spec=".2f", none="-"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def markdown(report: dict) -> str:
    m = report["meta"]
    lines = [f"{m['model']} {m['dtype']} on {m['device_name']} (torch {m['torch']}, NeMo {m['nemo']}); "
             f"ms/step = median of steady-state encoder steps incl. input copies; errors vs eager on the same inputs",
             "", "| lookahead | variant | batch | ms/step | TFLOP/s | max abs err | max rel err | step extra MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['lookahead_ms']} | {r['variant']} | {r['batch']} | {fmt(r.get('ms'))} | "
                     f"{fmt(r.get('tflops'), '.3g')} | {fmt(r.get('max_abs'), '.2e')} | {fmt(r.get('max_rel'), '.2e')} | "
                     f"{fmt(r.get('step_extra_mib'), '.0f')} |")
    if report["variants"]:
        lines += ["", "| lookahead | variant | prepare s | engine MiB | MiB/slot (state + engine/max batch) | "
                  "self-check rel err | streams identical | token agreement | recaptures |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for v in report["variants"]:
            a = v.get("agreement") or {}
            ident = f"{a['streams_identical']}/{a['streams']}" if a else "-"
            chk = v.get("selfcheck") or {}
            rel = fmt(chk.get("max_rel_error"), ".2e") + ("" if chk.get("passed", True) else " FAIL")
            recap = "-" if "captures" not in v else ("none" if v.get("no_recapture") else f"{v['captures']} captures")
            lines.append(f"| {v['lookahead_ms']} | {v['variant']} | {fmt(v.get('prepare_s'), '.1f')} | "
                         f"{fmt(v.get('engine_mib'), '.0f')} | {fmt(v.get('mib_per_slot'), '.2f')} | {rel} | {ident} | "
                         f"{fmt(a.get('token_agreement'), '.4f')} | {recap} |")
    if report["skipped"]:
        lines += ["", "Skipped:"] + [f"- {s['lookahead_ms']} ms {s['variant']}: {s['reason']}" for s in report["skipped"]]
    if report["errors"]:
        lines += ["", "Errors:"] + [f"- {e['lookahead_ms']} ms {e['variant']}: {e['error']}" for e in report["errors"]]
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default="builtin:nemotron-0.6b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--lookaheads", default="560,160")
    ap.add_argument("--batches", default="1,16,64,256,1024")
    ap.add_argument("--variants", default=None, help="comma-separated; default: every variant for the device")
    ap.add_argument("--streams", type=int, default=None,
                    help="streams for token agreement (default 64 on CUDA, 4 on CPU; 0 skips it)")
    ap.add_argument("--stream-seconds", type=float, default=None, help="audio per stream (default 4 on CUDA, 1.5 on CPU)")
    ap.add_argument("--target-seconds", type=float, default=0.5, help="timed seconds per (variant, batch)")
    ap.add_argument("--max-iters", type=int, default=50)
    ap.add_argument("--time-budget", type=float, default=420.0, help="start no new work after this many seconds")
    ap.add_argument("--cache-dir", default=None, help="ONNX/TensorRT cache (default: a temporary directory)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the JSON report here")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    dev = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, dev)
    lookaheads = [int(v) for v in args.lookaheads.split(",") if v]
    batches = sorted({int(b) for b in args.batches.split(",") if b})
    cuda = dev.type == "cuda"
    streams = args.streams if args.streams is not None else (64 if cuda else 4)
    seconds = args.stream_seconds or (4.0 if cuda else 1.5)
    buckets = sorted(set(batches) | ({streams} if streams else set()))
    variants = args.variants.split(",") if args.variants else list(CUDA_VARIANTS if cuda else CPU_VARIANTS)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="encoder-bench-")
    if not cuda:
        torch.set_flush_denormal(True)  # random-weight caches decay into denormals: slow on CPUs

    import nemo
    report = {"meta": {"model": args.model, "dtype": str(dtype).replace("torch.", ""), "device": str(dev),
                       "device_name": torch.cuda.get_device_name(dev) if cuda else (platform.processor() or "cpu"),
                       "torch": torch.__version__, "nemo": nemo.__version__, "batches": batches,
                       "lookaheads_ms": lookaheads, "variants": variants, "streams": streams,
                       "stream_seconds": seconds, "argv": sys.argv[1:], "complete": False},
              "results": [], "variants": [], "skipped": [], "errors": []}

    def over_budget(reserve: float = 0.0) -> bool:
        return time.perf_counter() - t_start > args.time_budget - reserve

    log(f"# loading {args.model} ...")
    t = time.perf_counter()
    model = load_model(args.model, lookaheads[0], seed=args.seed)
    model.nemo_model.to(device=dev, dtype=dtype if dtype != torch.float32 else None)
    model.nemo_model.preprocessor.to(dtype=torch.float32)
    model.nemo_model.eval()
    report["meta"]["load_s"] = round(time.perf_counter() - t, 1)
    log(f"# loaded in {report['meta']['load_s']} s")

    # Priority order: cheap variants at every lookahead first, then compile, then ONNX/TensorRT.
    cheap = [v for v in variants if "compile" not in v and not v.startswith(("onnx", "tensorrt"))]
    costly = [v for v in variants if v not in cheap]
    tasks = [(la, v) for la in lookaheads for v in cheap] + [(la, v) for la in lookaheads for v in costly]
    inputs_cache: dict[int, Inputs] = {}
    flops_cache: dict[tuple[int, int], int] = {}
    eager_tokens: dict[int, dict] = {}
    state_bytes: dict[int, int] = {}

    for la, name in tasks:
        reason = variant_reason(name, dev)
        reserve = max([v for k, v in RESERVE_S.items() if k in name] or [0.0])
        if reason is None and over_budget(reserve):
            reason = (f"time budget: {time.perf_counter() - t_start:.0f} s of {args.time_budget:.0f} s spent, "
                      f"this variant needs ~{reserve:.0f} s")
        if reason:
            report["skipped"].append({"lookahead_ms": la, "variant": name, "reason": reason})
            log(f"# skip {la} ms {name}: {reason}")
            write_json(args.out, report)
            continue
        set_lookahead(model, la)
        engine = None
        try:
            if la not in inputs_cache:
                inputs_cache.clear()
                free(dev)
                inputs_cache[la] = Inputs(model, max(batches), dev, dtype, seed=args.seed)
            inp = inputs_cache[la]
            free(dev)
            m0 = mem_allocated(dev)
            t = time.perf_counter()
            engine = build_variant(name, model, la, dev, dtype, buckets, cache_dir)
            sync(dev)
            prepare_s = time.perf_counter() - t
            engine_bytes = mem_allocated(dev) - m0
            log(f"# {la} ms {name}: prepared in {prepare_s:.1f} s, {engine_bytes / 2**20:.0f} MiB")
            vrow = {"lookahead_ms": la, "variant": name, "prepare_s": prepare_s, "engine_mib": engine_bytes / 2**20}
            describe = getattr(engine, "describe", None)
            if callable(describe):
                vrow["engine"] = describe()
            channel_shape = getattr(engine, "cache_channel_shape", None)
            if name != "eager":
                # Parity the way the server's start-up self-check sees it: streams at different
                # positions, several steps, each engine carrying its own caches.
                from engines.selfcheck import check_encoder_engine
                chk = check_encoder_engine(engine, model, dev, dtype, max(buckets))
                vrow["selfcheck"] = chk.as_dict()
                log(f"  self-check: {chk.detail}")
            step_extra_max = 0
            for b in batches:
                if over_budget() and b != batches[0]:
                    report["skipped"].append({"lookahead_ms": la, "variant": f"{name} batch {b}",
                                              "reason": "time budget spent"})
                    continue
                if (la, b) not in flops_cache:
                    flops_cache[(la, b)] = count_flops(model, inp.batch(b))
                x = inp.batch(b, channel_shape)
                row = {"lookahead_ms": la, "variant": name, "batch": b, "flops": flops_cache[(la, b)]}
                if cuda:
                    torch.cuda.reset_peak_memory_stats(dev)
                before = mem_allocated(dev)
                row.update(time_steps(engine, x, dev, args.target_seconds, args.max_iters))
                if cuda:
                    row["step_extra_mib"] = (torch.cuda.max_memory_allocated(dev) - before) / 2**20
                    step_extra_max = max(step_extra_max, row["step_extra_mib"] * 2**20)
                # Effective TFLOP/s: the eager module's FLOPs for this step over this variant's time
                # (a variant that does less arithmetic for the same result scores higher).
                row["tflops"] = row["flops"] / (row["ms"] * 1e-3) / 1e12
                params = getattr(engine, "params", None)
                if params is not None and hasattr(params, "flops_per_stream"):
                    row["own_flops"] = int(params.flops_per_stream()) * b
                    row["own_tflops"] = row["own_flops"] / (row["ms"] * 1e-3) / 1e12
                if name != "eager" and channel_shape is None:
                    row.update(errors(model, engine, x))
                report["results"].append(row)
                log(f"  batch {b}: {row['ms']:.2f} ms/step, {row['tflops']:.3g} TFLOP/s"
                    + (f", max rel err {row['max_rel']:.2e}" if "max_rel" in row else ""))
                del x
                write_json(args.out, report)
            # token agreement over many streams, full streaming steps
            if args.streams != 0 and not over_budget():
                if la not in eager_tokens:
                    eager_tokens[la], state_bytes[la] = run_streams(model, EagerEncoder(model.nemo_model.encoder), la,
                                                                    streams, seconds, dev, dtype)
                if name == "eager":
                    vrow["agreement"] = agreement(eager_tokens[la], eager_tokens[la])
                else:
                    tok, _ = run_streams(model, engine, la, streams, seconds, dev, dtype)
                    vrow["agreement"] = agreement(eager_tokens[la], tok)
                log(f"  tokens: {vrow['agreement']}")
            if la in state_bytes:
                vrow["state_bytes_per_slot"] = state_bytes[la]
                vrow["mib_per_slot"] = (state_bytes[la] + (engine_bytes + step_extra_max) / max(buckets)) / 2**20
            if hasattr(engine, "captures"):
                # captured once per bucket at construction; steady-state steps must add none
                vrow["captures"] = engine.captures
                vrow["buckets"] = list(engine.buckets)
                vrow["no_recapture"] = engine.captures == (len(engine.buckets) if engine.use_graphs else 0)
            vrow["executions"] = engine.executions
            report["variants"].append(vrow)
        except Exception as e:
            report["errors"].append({"lookahead_ms": la, "variant": name, "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc(limit=8)})
            log(f"# {la} ms {name} failed: {type(e).__name__}: {e}")
        finally:
            del engine
            free(dev)
            write_json(args.out, report)

    report["meta"]["complete"] = True
    report["meta"]["total_s"] = round(time.perf_counter() - t_start, 1)
    write_json(args.out, report)
    print(markdown(report))
    log(f"# done in {report['meta']['total_s']} s" + (f"; JSON: {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
