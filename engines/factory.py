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

from engines.capacity import StreamSizing, auto_max_batch, streams_for_memory
from engines.config import EngineConfig
from engines.encoders import EagerEncoder, EncoderEngine
from engines.models import LoadedModel, load_model
from engines.selfcheck import SelfCheck, check_encoder_engine
from engines.streaming_engine import StreamingEngine

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
        from engines.fast_conformer import build_fast_encoder
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

    @property
    def fell_back(self) -> bool:
        return self.fallback_reason is not None

    def as_dict(self) -> dict:
        return {"configured_engine": self.configured_engine, "engine": self.engine,
                "fallback_reason": self.fallback_reason,
                "self_check": self.self_check.as_dict() if self.self_check else None,
                "details": dict(self.details), "device": self.device,
                "sizing": dict(self.sizing) if self.sizing else None}


def start_encoder_engine(name: str, model: LoadedModel, cfg: EngineConfig, device: torch.device,
                         dtype: torch.dtype) -> tuple[EncoderEngine, SelfCheck | None]:
    """Build engine `name` and prove it: one self-check against the eager reference (the eager
    engine is the reference itself, so it is not compared with itself). Raises EngineStartError."""
    try:
        encoder = make_encoder_engine(name, model, cfg, device, dtype)
    except Exception as e:
        raise EngineStartError(f"encoder engine {name!r} cannot be built: {type(e).__name__}: {e}") from e
    if name == "eager" and type(encoder) is EagerEncoder:
        return encoder, None
    try:
        check = check_encoder_engine(encoder, model, device, dtype, cfg.max_batch)
    except Exception as e:
        raise EngineStartError(f"encoder engine {name!r} failed its start-up self-check: "
                               f"{type(e).__name__}: {e}") from e
    if not check.passed:
        raise EngineStartError(f"encoder engine {name!r} failed its start-up self-check: {check.detail}")
    log.info("encoder engine %r passed its self-check: %s", name, check.detail)
    return encoder, check


def build_engine(cfg: EngineConfig) -> StreamingEngine:
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        # Random-weight caches decay into denormal floats, which the CPU handles up to ~4x
        # slower; flushing them changes nothing a model could notice.
        torch.set_flush_denormal(True)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.auto_max_batch:  # before the encoder engine: its CUDA graphs are captured per bucket up to it
        cfg = dataclasses.replace(cfg, max_batch=auto_max_batch(
            device.type == "cuda", cfg.max_batch, None if cfg.auto_max_streams else cfg.max_streams))
    model = load_model(cfg.model, cfg.lookahead_ms, seed=cfg.seed)
    model.nemo_model.to(device=device, dtype=dtype if dtype != torch.float32 else None)
    # The preprocessor's constants stay float32 whatever the model runs in.
    model.nemo_model.preprocessor.to(dtype=torch.float32)
    model.nemo_model.eval()
    fallback_reason = None
    engine_name = resolve_engine_name(cfg.engine, device)
    try:
        encoder, check = start_encoder_engine(engine_name, model, cfg, device, dtype)
    except EngineStartError as e:
        if cfg.fallback_engine is None or cfg.fallback_engine == engine_name:
            raise EngineStartError(f"{e}. Refusing to start on another engine; name a fallback engine "
                                   f"explicitly to allow one.") from e
        fallback_reason = str(e)
        log.error("%s; starting on the named fallback engine %r", e, cfg.fallback_engine)
        try:
            encoder, check = start_encoder_engine(cfg.fallback_engine, model, cfg, device, dtype)
        except EngineStartError as e2:
            raise EngineStartError(f"{e}; the fallback engine failed too: {e2}") from e2
    utterance_reset = model.utterance_reset if cfg.utterance_reset == "auto" else cfg.utterance_reset
    sizing = None
    capacity = cfg.max_streams
    if cfg.auto_max_streams and device.type == "cuda":
        sizing = size_slots_for_device(model, encoder, cfg, device, dtype)
        log.info("max streams (auto): %s", sizing.describe(), extra={"sizing": sizing.as_dict()})
        if sizing.max_streams < 1:
            raise EngineStartError(f"not one stream's state fits in the free device memory: {sizing.describe()}. "
                                   "Free the device, or name --max-streams explicitly")
        capacity = sizing.max_streams
    engine = StreamingEngine(model, encoder, cfg.lookahead_ms, capacity, cfg.max_batch, device, dtype,
                             align_chunks=cfg.align_chunks, utterance_reset=utterance_reset)
    engine.profile_every = cfg.profile_every
    describe = getattr(encoder, "describe", None)
    engine.startup_report = StartupReport(
        configured_engine=engine_name, engine=encoder.name, fallback_reason=fallback_reason, self_check=check,
        details=describe() if callable(describe) else {"engine": encoder.name}, device=str(device),
        sizing=sizing.as_dict() if sizing else None)
    return engine


def per_stream_state_bytes(model: LoadedModel, encoder: EncoderEngine, cfg: EngineConfig, device: torch.device,
                           dtype: torch.dtype) -> int:
    """Device bytes of one cache slot, as the slot pool lays it out for this model and encoder
    engine (the fast engines keep a projected K/V cache, twice NeMo's): measured on an engine
    of one slot, which is then dropped."""
    probe = StreamingEngine(model, encoder, cfg.lookahead_ms, 1, cfg.max_batch, device, dtype,
                            align_chunks=cfg.align_chunks)
    try:
        return probe.pool.bytes_per_slot()
    finally:
        del probe


def size_slots_for_device(model: LoadedModel, encoder: EncoderEngine, cfg: EngineConfig, device: torch.device,
                          dtype: torch.dtype) -> StreamSizing:
    """`--max-streams auto` on a GPU, once the model and the encoder engine are loaded (the graph
    engines have captured every batch bucket by then, so what their graphs hold is no longer
    free; what the warm-up captures later is in the headroom, engines.capacity)."""
    per_stream = per_stream_state_bytes(model, encoder, cfg, device, dtype)
    gc.collect()
    free, total = torch.cuda.mem_get_info(device)
    # Memory torch's caching allocator holds but no tensor uses is free for the pool too.
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return streams_for_memory(int(free + cached), int(total), per_stream, cfg.max_batch)
