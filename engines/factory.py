"""Builds a StreamingEngine from an EngineConfig: device and dtype choice, model loading, and
the encoder engine, with no silent fallback.

The configured engine is built and then proven by a start-up self-check (engines.selfcheck):
its execution counter must move and its outputs must match the eager reference. Any failure
refuses to start (EngineStartError) unless `cfg.fallback_engine` names another engine, which
is then built, checked the same way, and reported in `StreamingEngine.startup_report`."""

from __future__ import annotations

import dataclasses
import gc
import logging
from dataclasses import dataclass

import torch

from engines.api import EngineOverloadedError
from engines.capacity import (STEP_BUDGET_FRACTION, BatchSizing, DecodeStreamChoice, StreamSizing, auto_max_batch, batch_limit,
                              batch_memory_limit, choose_max_batch, realtime_cap, streams_for_memory)
from engines.config import EngineConfig
from engines.decode_overlap import measure_decode_stream
from engines.encoders import EagerEncoder, EncoderEngine
from engines.models import LoadedModel, load_model
from engines.selfcheck import SelfCheck, check_encoder_engine
from engines.streaming_engine import StreamingEngine, geometry_of

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available here")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def resolve_engine_name(name: str, device: torch.device) -> str:
    """`auto`: the fastest engine for the device, chosen before anything is built (a choice, not
    a fallback: if it cannot start, the server refuses to start like for any named engine)."""
    if name != "auto":
        return name
    return "fast-cudagraph" if device.type == "cuda" else "eager"


def make_encoder_engine(name: str, model: LoadedModel, cfg: EngineConfig, device: torch.device,
                        dtype: torch.dtype) -> EncoderEngine:
    """The encoder engine called `name`. Raises if it cannot be built here."""
    encoder = model.nemo_model.encoder
    if name == "eager":
        return EagerEncoder(encoder)
    # The accelerated engines live in their own modules: importing them pulls their runtimes.
    if name == "cudagraph":
        from engines.cudagraph_engine import build_cudagraph_encoder
        return build_cudagraph_encoder(model, cfg, device, dtype)
    if name in ("fast", "fast-cudagraph"):
        from engines.fast_engines import build_fast_encoder
        if name == "fast":
            return build_fast_encoder(model, cfg, device, dtype)
        return build_fast_encoder(model, cfg, device, dtype, graphs=True, compile=cfg.cudagraph_compile)
    if name == "onnx":
        from engines.onnx_engine import build_onnx_encoder
        return build_onnx_encoder(model, cfg, device, dtype)
    if name == "tensorrt":
        from engines.tensorrt_engine import build_tensorrt_encoder
        return build_tensorrt_encoder(model, cfg, device, dtype)
    raise ValueError(f"unknown engine {name!r}")


class EngineStartError(RuntimeError):
    """The configured encoder engine cannot serve: it failed to build, to run, or to match the
    eager reference. The server must not start (unless a fallback engine was named)."""


@dataclass(frozen=True)
class StartupReport:
    """What start-up decided, for health, metrics and logs: the engine that was asked for, the
    one that runs (and executed the self-check), and why they differ when they do."""

    configured_engine: str
    engine: str
    fallback_reason: str | None
    self_check: SelfCheck | None
    details: dict
    device: str = ""                 # where the engine runs ("cpu", "cuda:0", ...)
    sizing: dict | None = None       # `--max-streams auto` on a GPU: engines.capacity.StreamSizing.as_dict()
    batch_sizing: dict | None = None  # `--max-batch auto`, measured: engines.capacity.BatchSizing.as_dict()
    decode_stream: dict | None = None  # engines.capacity.DecodeStreamChoice.as_dict()

    @property
    def fell_back(self) -> bool:
        return self.fallback_reason is not None

    def as_dict(self) -> dict:
        return {"configured_engine": self.configured_engine, "engine": self.engine,
                "fallback_reason": self.fallback_reason,
                "self_check": self.self_check.as_dict() if self.self_check else None,
                "details": dict(self.details), "device": self.device,
                "sizing": dict(self.sizing) if self.sizing else None,
                "batch_sizing": dict(self.batch_sizing) if self.batch_sizing else None,
                "decode_stream": dict(self.decode_stream) if self.decode_stream else None}


def start_encoder_engine(name: str, model: LoadedModel, cfg: EngineConfig, device: torch.device,
                         dtype: torch.dtype) -> tuple[EncoderEngine, SelfCheck | None]:
    """Build engine `name` and prove it: one self-check against the eager reference (the eager
    engine is the reference itself, so it is not compared with itself). Raises EngineStartError.

    An engine built with the Triton step kernels (`cfg.step_kernels` triton or auto) that fails
    its self-check is built again with PyTorch's kernels and checked again, with a warning: the
    kernels are a speed-up of the same engine, and a server that can serve correctly without
    them should (as where they fail to build, engines.fast_engines.build_fast_encoder)."""
    encoder, check, failure = _build_and_check(name, model, cfg, device, dtype)
    if failure is not None and getattr(encoder, "attention", None) == "kernel" and cfg.step_kernels != "torch":
        log.warning("encoder engine %r with the Triton step kernels %s: building it with PyTorch's kernels",
                    name, failure)
        del encoder, check
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        encoder, check, failure = _build_and_check(name, model, dataclasses.replace(cfg, step_kernels="torch"),
                                                   device, dtype)
    if failure is not None:
        raise EngineStartError(f"encoder engine {name!r} {failure}")
    if check is not None:
        log.info("encoder engine %r passed its self-check: %s", name, check.detail)
    return encoder, check


def _build_and_check(name: str, model: LoadedModel, cfg: EngineConfig, device: torch.device,
                     dtype: torch.dtype) -> tuple[EncoderEngine | None, SelfCheck | None, str | None]:
    """(the engine, its self-check, None) or, where it fails its self-check, (the engine, the
    check, why). Raises EngineStartError where it cannot be built at all."""
    try:
        encoder = make_encoder_engine(name, model, cfg, device, dtype)
    except Exception as e:
        raise EngineStartError(f"encoder engine {name!r} cannot be built: {type(e).__name__}: {e}") from e
    if name == "eager" and type(encoder) is EagerEncoder:
        return encoder, None, None
    try:
        check = check_encoder_engine(encoder, model, device, dtype, cfg.max_batch)
    except Exception as e:
        return encoder, None, f"failed its start-up self-check: {type(e).__name__}: {e}"
    if not check.passed:
        return encoder, check, f"failed its start-up self-check: {check.detail}"
    return encoder, check, None


def start_with_fallback(engine_name: str, model: LoadedModel, cfg: EngineConfig, device: torch.device,
                        dtype: torch.dtype) -> tuple[EncoderEngine, SelfCheck | None, str, str | None]:
    """The configured encoder engine, or the named fallback if it cannot start: (encoder, its
    self-check, the name it was started by, why it fell back or None)."""
    try:
        encoder, check = start_encoder_engine(engine_name, model, cfg, device, dtype)
        return encoder, check, engine_name, None
    except EngineStartError as e:
        if cfg.fallback_engine is None or cfg.fallback_engine == engine_name:
            raise EngineStartError(f"{e}. Refusing to start on another engine; name a fallback engine "
                                   f"explicitly to allow one.") from e
        log.error("%s; starting on the named fallback engine %r", e, cfg.fallback_engine)
        try:
            encoder, check = start_encoder_engine(cfg.fallback_engine, model, cfg, device, dtype)
        except EngineStartError as e2:
            raise EngineStartError(f"{e}; the fallback engine failed too: {e2}") from e2
        return encoder, check, cfg.fallback_engine, str(e)


# Engines whose start-up cost grows with the largest batch far beyond a few steps: TensorRT builds
# a plan for its batch profile (minutes, cached per largest batch), so `--max-batch auto` keeps
# the fixed default there instead of building plans to measure.
UNMEASURED_BATCH_ENGINES = ("tensorrt",)
# On the CPU `--max-batch auto` keeps the fixed default, unmeasured: a CPU step's time grows about
# linearly with its rows (no idle parallel width for more rows to fill), so a larger batch adds no
# capacity, only latency; and a CPU shared with other work times far too noisily to choose by
# (the tiny model on a loaded 2-core host: 32 rows from 64 to 2,260 ms, 1 row from 95 to 805 ms
# within a minute), so the batch would change from one start to the next. Tests turn it on to run
# the measuring path, which is the same code on either device.
MEASURE_BATCH_ON_CPU = False
# On the CPU `--decode-stream auto` is off, unmeasured: there is no CUDA stream to decode on.
# Tests turn this on to run the measuring path (on the CPU its "on" only begins the next step
# earlier: StreamingEngine.set_decode_stream).
MEASURE_DECODE_STREAM_ON_CPU = False
# A timed step over this many chunk periods ends the measurement of its batch at once: it does
# not fit the step budget (a fraction of one period) whatever the other steps take.
STEP_GIVE_UP = 1.0


# torch's intra-op threads in a process whose engine runs on a GPU.
GPU_HOST_THREADS = 1


def build_engine(cfg: EngineConfig) -> StreamingEngine:
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        # Random-weight caches decay into denormal floats, which the CPU handles up to ~4x
        # slower; flushing them changes nothing a model could notice.
        torch.set_flush_denormal(True)
    else:
        # On a GPU the host's tensor work is small copies and index arithmetic: a pool of
        # intra-op threads only spins beside the serving processes (run 24 on the H200: the
        # engine process used 5.6 cores at 1,536 streams, 0.9 in run 23).
        torch.set_num_threads(GPU_HOST_THREADS)
    dtype = resolve_dtype(cfg.dtype, device)
    engine_name = resolve_engine_name(cfg.engine, device)
    step_measurable = not {engine_name, cfg.fallback_engine} & set(UNMEASURED_BATCH_ENGINES)
    measure_batch = step_measurable and cfg.auto_max_batch and (device.type == "cuda" or MEASURE_BATCH_ON_CPU)
    # A named batch with automatic slots on a GPU: its step measured once, for the slot sizing.
    measure_named = step_measurable and not cfg.auto_max_batch and cfg.auto_max_streams and device.type == "cuda"
    # The slot count when it is known now: explicit, or the CPU's fixed one (a GPU's automatic one
    # comes from the memory left after the batch is chosen).
    streams = None if cfg.auto_max_streams and device.type == "cuda" else cfg.max_streams
    default_batch = cfg.max_batch
    if cfg.auto_max_batch:  # before the encoder engine: its CUDA graphs are captured per bucket up to it
        default_batch = auto_max_batch(device.type == "cuda", cfg.max_batch, streams)
        cfg = dataclasses.replace(cfg, max_batch=default_batch)
    model = load_model(cfg.model, cfg.lookahead_ms, seed=cfg.seed)
    model.nemo_model.to(device=device, dtype=dtype if dtype != torch.float32 else None)
    # The preprocessor's constants stay float32 whatever the model runs in.
    model.nemo_model.preprocessor.to(dtype=torch.float32)
    model.nemo_model.eval()
    batch_sizing = None
    if measure_batch:
        # The encoder is built for the largest batch tried (its graphs captured for every bucket up
        # to it), the step timed at the candidates, and the encoder rebuilt for the choice when
        # that is smaller, so it ends as `--max-batch <choice>` would have built it. Memory is
        # sized afterwards, with the chosen batch in its headroom.
        cfg = dataclasses.replace(cfg, max_batch=batch_limit(
            default_batch, streams, memory_batch_limit(model, cfg, device, dtype) if streams is None else None))
    encoder, check, started_name, fallback_reason = start_with_fallback(engine_name, model, cfg, device, dtype)
    if measure_batch:
        batch_sizing = measure_max_batch(model, encoder, cfg, device, dtype, default_batch)
        log.info("max batch (auto): %s", batch_sizing.describe(), extra={"batch_sizing": batch_sizing.as_dict()})
        if batch_sizing.max_batch != cfg.max_batch:
            cfg = dataclasses.replace(cfg, max_batch=batch_sizing.max_batch)
            if getattr(encoder, "max_batch", None) is not None:  # graph buckets up to the old limit
                del encoder
                _free_device_memory(device)
                encoder, check = start_encoder_engine(started_name, model, cfg, device, dtype)
    elif measure_named:
        batch_sizing = measure_named_batch(model, encoder, cfg, device, dtype)
        log.info("max batch: %s", batch_sizing.describe(), extra={"batch_sizing": batch_sizing.as_dict()})
    utterance_reset = model.utterance_reset if cfg.utterance_reset == "auto" else cfg.utterance_reset
    sizing = None
    capacity = cfg.max_streams
    if cfg.auto_max_streams and device.type == "cuda":
        sizing = size_slots_for_device(model, encoder, cfg, device, dtype, batch_sizing)
        log.info("max streams (auto): %s", sizing.describe(), extra={"sizing": sizing.as_dict()})
        if sizing.max_streams < 1:
            raise EngineStartError(f"not one stream's state fits in the free device memory: {sizing.describe()}. "
                                   "Free the device, or name --max-streams explicitly")
        capacity = sizing.max_streams
    engine = StreamingEngine(model, encoder, cfg.lookahead_ms, capacity, cfg.max_batch, device, dtype,
                             align_chunks=cfg.align_chunks, utterance_reset=utterance_reset,
                             decode_stream=cfg.decode_stream != "off")
    decode_choice = choose_decode_stream(engine, cfg.decode_stream)
    log.info("decode stream: %s", decode_choice.describe(), extra={"decode_stream": decode_choice.as_dict()})
    engine.profile_every = cfg.profile_every
    describe = getattr(encoder, "describe", None)
    engine.startup_report = StartupReport(
        configured_engine=engine_name, engine=encoder.name, fallback_reason=fallback_reason, self_check=check,
        details=describe() if callable(describe) else {"engine": encoder.name}, device=str(device),
        sizing=sizing.as_dict() if sizing else None,
        batch_sizing=batch_sizing.as_dict() if batch_sizing else None, decode_stream=decode_choice.as_dict())
    return engine


def choose_decode_stream(engine: StreamingEngine, mode: str) -> DecodeStreamChoice:
    """`--decode-stream`: "on" and "off" as asked (on the CPU there is no stream to decode on);
    "auto" on a GPU times the engine's pipelined steps both ways at its max batch (or half its
    slots, when fewer: two steps in flight hold different streams) and keeps the faster
    (engines.decode_overlap). Leaves the engine in the mode returned."""
    cuda = engine.device.type == "cuda"
    if mode != "auto":
        reason = f"--decode-stream {mode}"
        if mode == "on" and not cuda:
            reason += ": no CUDA device, one stream"
        return DecodeStreamChoice(on=engine.decode_stream is not None, reason=reason)
    if not cuda and not MEASURE_DECODE_STREAM_ON_CPU:
        engine.set_decode_stream(False)
        return DecodeStreamChoice(on=False, reason="auto: no CUDA device, one stream")
    rows = min(engine.max_batch, engine.capacity // 2)
    if rows < 1:
        engine.set_decode_stream(False)
        return DecodeStreamChoice(on=False, reason="auto: one slot, nothing to time two steps with")
    try:
        return measure_decode_stream(engine, rows)
    except (EngineOverloadedError, torch.cuda.OutOfMemoryError) as exc:
        # measure_decode_stream left one stream; serving goes on in the mode that needs no timing
        log.warning("decode stream: timing %d rows failed, one stream kept: %s", rows, exc)
        _free_device_memory(engine.device)
        return DecodeStreamChoice(on=False, reason=f"auto: timing {rows} rows failed ({type(exc).__name__}), one stream")


def measure_max_batch(model: LoadedModel, encoder: EncoderEngine, cfg: EngineConfig, device: torch.device,
                      dtype: torch.dtype, default: int) -> BatchSizing:
    """`--max-batch auto`: the whole step timed at the candidate batches (engines.capacity
    .choose_max_batch) up to cfg.max_batch, which the encoder was built for. Each batch runs on
    a probe engine of exactly that many slots, dropped after: a batch the device memory cannot
    take counts as not fitting. On a GPU each probe's device memory is measured too: the most it
    held at once beyond its slots (BatchSizing.engine_bytes, the slot sizing's headroom); with
    `--max-streams auto` that gives each batch's slots, and a batch whose headroom would leave
    the server fewer streams than the batch below it is not taken (choose_max_batch's
    `slots_at`). The slots are counted in the memory free with the encoder built for the largest
    batch tried, a little less than the server's own sizing finds after a rebuild for a smaller
    choice: the same for every batch compared."""
    chunk_ms = geometry_of(model, cfg.lookahead_ms, cfg.align_chunks).chunk_ms
    give_up_ms = STEP_GIVE_UP * chunk_ms
    held: dict[int, int] = {}

    def step_ms(rows: int) -> float | None:
        ms, engine_bytes = _probe_step(model, encoder, cfg, device, dtype, rows, give_up_ms)
        if engine_bytes is not None:
            held[rows] = engine_bytes
        return ms

    memory: list[tuple[int, int, int]] = []  # (free, total, per-slot bytes), read once, after the first probe

    def slots_at(rows: int) -> int | None:
        if rows not in held:  # nothing measured of the device's memory (the CPU)
            return None
        if not memory:
            memory.append((*free_device_memory(device), per_stream_state_bytes(model, encoder, cfg, device, dtype)))
        free, total, per_stream = memory[0]
        return streams_for_memory(free, total, per_stream, rows, engine_bytes=held[rows]).fits_in_memory

    sizing = choose_max_batch(default, cfg.max_batch, chunk_ms, step_ms,
                              slots_at=slots_at if cfg.auto_max_streams else None)
    return dataclasses.replace(sizing, engine_bytes=tuple(sorted(held.items())))


def measure_named_batch(model: LoadedModel, encoder: EncoderEngine, cfg: EngineConfig, device: torch.device,
                        dtype: torch.dtype) -> BatchSizing:
    """`--max-batch N` named beside `--max-streams auto` on a GPU: N is kept, and its step timed and
    its device memory measured on one probe engine of N rows, as `--max-batch auto` measures its
    candidates, so the slots get the measured step's cap and headroom rather than the fixed cap
    and the copies rule (engines/capacity.py)."""
    chunk_ms = geometry_of(model, cfg.lookahead_ms, cfg.align_chunks).chunk_ms
    rows = cfg.max_batch
    ms, engine_bytes = _probe_step(model, encoder, cfg, device, dtype, rows, STEP_GIVE_UP * chunk_ms)
    return BatchSizing(max_batch=rows, default=rows, limit=rows, chunk_ms=float(chunk_ms),
                       budget_ms=STEP_BUDGET_FRACTION * chunk_ms, measured=((rows, ms),),
                       engine_bytes=() if engine_bytes is None else ((rows, engine_bytes),), named=True)


def _probe_step(model: LoadedModel, encoder: EncoderEngine, cfg: EngineConfig, device: torch.device,
                dtype: torch.dtype, rows: int, give_up_ms: float) -> tuple[float | None, int | None]:
    """One probe engine of exactly `rows` slots, stepped full and dropped: (its step time in ms,
    the most device memory it held at once beyond its slots). (None, None) when the device memory
    cannot take it; the bytes are None off a GPU."""
    probe = None
    try:
        before = _reset_peak(device)
        probe = StreamingEngine(model, encoder, cfg.lookahead_ms, rows, rows, device, dtype,
                                align_chunks=cfg.align_chunks)
        ms = probe.measure_step_ms(rows, give_up_ms=give_up_ms)
        held = None
        if before is not None:
            peak = torch.cuda.max_memory_allocated(device)
            held = max(0, peak - before - rows * probe.pool.bytes_per_slot())
        return ms, held
    except (EngineOverloadedError, torch.cuda.OutOfMemoryError) as exc:
        log.info("a step of %d rows does not fit in device memory: %s", rows, exc)
        return None, None
    finally:
        del probe
        _free_device_memory(device)


def _reset_peak(device: torch.device) -> int | None:
    """On a CUDA device: the bytes allocated now, with the peak counter reset to them (what a
    probe engine then holds at most is the peak less this). None elsewhere."""
    if device.type != "cuda":
        return None
    _free_device_memory(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def memory_batch_limit(model: LoadedModel, cfg: EngineConfig, device: torch.device, dtype: torch.dtype) -> int | None:
    """With `--max-streams auto` on a GPU: the largest batch whose step headroom still leaves
    the device memory slots for a full batch (engines.capacity.batch_memory_limit), from the
    memory free before the encoder engine is built (its graphs then take some of it: the
    streams are sized again after, with the batch chosen). None on the CPU."""
    if device.type != "cuda":
        return None
    # A slot as the eager engine lays it out, doubled: no engine's slot is larger (the fast
    # engines keep a projected K/V channel cache, twice NeMo's; the other state is the same).
    per_stream = 2 * per_stream_state_bytes(model, EagerEncoder(model.nemo_model.encoder), cfg, device, dtype)
    free, total = free_device_memory(device)
    return batch_memory_limit(free, total, per_stream)


def _free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def per_stream_state_bytes(model: LoadedModel, encoder: EncoderEngine, cfg: EngineConfig, device: torch.device,
                           dtype: torch.dtype) -> int:
    """Device bytes of one cache slot, as the slot pool lays it out for this model and encoder
    engine (the fast engines keep a projected K/V cache, twice NeMo's): measured on an engine
    of one slot, which is then dropped."""
    probe = StreamingEngine(model, encoder, cfg.lookahead_ms, 1, cfg.max_batch, device, dtype,
                            align_chunks=cfg.align_chunks, feature_graphs=False)  # it never steps
    try:
        return probe.pool.bytes_per_slot()
    finally:
        del probe


def size_slots_for_device(model: LoadedModel, encoder: EncoderEngine, cfg: EngineConfig, device: torch.device,
                          dtype: torch.dtype, batch_sizing: BatchSizing | None = None) -> StreamSizing:
    """`--max-streams auto` on a GPU, once the model and the encoder engine are loaded (the graph
    engines have captured every batch bucket by then, so what their graphs hold is no longer
    free; what the warm-up captures later is in the headroom, engines.capacity), capped by what
    the measured step carries (engines.capacity.realtime_cap)."""
    per_stream = per_stream_state_bytes(model, encoder, cfg, device, dtype)
    free, total = free_device_memory(device)
    cap, why = realtime_cap(batch_sizing)
    engine_bytes = batch_sizing.engine_bytes_at(cfg.max_batch) if batch_sizing is not None else None
    return streams_for_memory(free, total, per_stream, cfg.max_batch, cap=cap, cap_reason=why,
                              engine_bytes=engine_bytes)


def free_device_memory(device: torch.device) -> tuple[int, int]:
    """(bytes free for us, total bytes) of a CUDA device."""
    gc.collect()
    free, total = torch.cuda.mem_get_info(device)
    # Memory torch's caching allocator holds but no tensor uses is free for the pool too.
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + cached), int(total)
