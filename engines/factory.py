"""Builds a StreamingEngine from an EngineConfig: device and dtype choice, model loading, and
the encoder engine, with no silent fallback."""

from __future__ import annotations

import logging

import torch

from engines.config import EngineConfig
from engines.encoders import EagerEncoder, EncoderEngine
from engines.models import LoadedModel, load_model
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
    if name == "onnx":
        from engines.onnx_engine import build_onnx_encoder
        return build_onnx_encoder(model, cfg, device, dtype)
    if name == "tensorrt":
        from engines.tensorrt_engine import build_tensorrt_encoder
        return build_tensorrt_encoder(model, cfg, device, dtype)
    raise ValueError(f"unknown engine {name!r}")


def build_engine(cfg: EngineConfig) -> StreamingEngine:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model = load_model(cfg.model, cfg.lookahead_ms, seed=cfg.seed)
    model.nemo_model.to(device=device, dtype=dtype if dtype != torch.float32 else None)
    # The preprocessor's constants stay float32 whatever the model runs in.
    model.nemo_model.preprocessor.to(dtype=torch.float32)
    model.nemo_model.eval()
    try:
        encoder = make_encoder_engine(cfg.engine, model, cfg, device, dtype)
    except Exception as e:
        if cfg.fallback_engine is None:
            raise RuntimeError(f"encoder engine {cfg.engine!r} cannot start: {e}. "
                               f"Refusing to start on another engine; pass a fallback engine "
                               f"explicitly to allow one.") from e
        log.error("encoder engine %r cannot start (%s); starting on the named fallback %r",
                  cfg.engine, e, cfg.fallback_engine)
        encoder = make_encoder_engine(cfg.fallback_engine, model, cfg, device, dtype)
    return StreamingEngine(model, encoder, cfg.lookahead_ms, cfg.max_streams, cfg.max_batch, device, dtype)
