"""TensorRT encoder engine: a plan built from the exported ONNX graph, run through the TensorRT
Python API on torch's current CUDA stream, plugged in through TRTEncoderWrapper.

Build: the ONNX graph from engines.export (exported on the GPU in the engine's dtype), one
optimization profile over the batch axis (min 1, opt and max the server's max batch; every
other axis is fixed by the chunk geometry), FP16 kernels allowed, a persistent timing cache.
The serialized plan is cached on disk under a key covering the weights (model checksum), the
lookahead, the dtype, the profile, the TensorRT version and the GPU, and is written atomically.

Run: tensor-address API. Input shapes are set per call, every input and output is bound by
the data_ptr of a torch tensor, and `execute_async_v3` is enqueued on torch's current stream,
so no synchronisation and no host copies are needed around it. The runner counts an execution
only after TensorRT accepted the enqueue.

This module imports `tensorrt` only inside functions: importing it where TensorRT is missing
is fine; building an engine there raises a clear error (and the factory refuses to start).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch

from engines.encoders import CountingRunner, WrappedGraphEncoder
from engines.export import (INPUT_NAMES, OUTPUT_NAMES, EncoderIO, default_cache_dir, dtype_name,
                            export_encoder_onnx)

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_BYTES = 8 << 30
PLAN_FILE = "encoder.plan"


def tensorrt_available() -> tuple[bool, str]:
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising OSError on its libraries
        return False, f"tensorrt is not installed on this machine ({type(e).__name__}: {e})"
    return True, ""


# -- the profile --------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchProfile:
    """One optimization profile: batch in [min_batch, max_batch], tuned for opt_batch."""

    min_batch: int
    opt_batch: int
    max_batch: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"profile needs 1 <= min <= opt <= max, got {self}")

    def shapes(self, io: EncoderIO) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """input name -> (min, opt, max) shapes, batch-first as the exported graph takes them."""
        lo, opt, hi = io.input_shapes(self.min_batch), io.input_shapes(self.opt_batch), io.input_shapes(self.max_batch)
        return {name: (lo[name], opt[name], hi[name]) for name in INPUT_NAMES}

    def check(self, batch: int) -> None:
        if not self.min_batch <= batch <= self.max_batch:
            raise ValueError(f"batch {batch} outside the TensorRT profile [{self.min_batch}, {self.max_batch}]")


def batch_profile(max_batch: int, opt_batch: int | None = None) -> BatchProfile:
    """The server's profile: any batch from 1 to max_batch, kernels tuned for a full batch
    (the step that decides throughput) unless told otherwise."""
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    opt = max_batch if opt_batch is None else min(max(opt_batch, 1), max_batch)
    return BatchProfile(1, opt, max_batch)


# -- the plan cache -----------------------------------------------------------------------------
def gpu_identity(device: torch.device) -> str:
    """GPU name and compute capability: a plan is only valid on the GPU model it was built for."""
    props = torch.cuda.get_device_properties(device)
    return f"{props.name} sm{props.major}{props.minor}"


def plan_key(checksum: str, lookahead_ms: int, dtype: torch.dtype, profile: BatchProfile,
             trt_version: str, gpu: str, onnx_key: str = "") -> str:
    parts = {"checksum": checksum, "lookahead_ms": int(lookahead_ms), "dtype": dtype_name(dtype),
             "profile": [profile.min_batch, profile.opt_batch, profile.max_batch],
             "tensorrt": trt_version, "gpu": gpu, "onnx": onnx_key}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return f"{checksum}-la{int(lookahead_ms)}-{dtype_name(dtype)}-b{profile.max_batch}-trt{trt_version}-{digest}"


def timing_cache_path(cache_dir: str, trt_version: str, gpu: str) -> str:
    safe = "".join(c if c.isalnum() else "_" for c in gpu)
    return os.path.join(cache_dir, "tensorrt", f"timing-{trt_version}-{safe}.cache")


def atomic_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# -- build --------------------------------------------------------------------------------------
_LOGGER = None


def _logger():
    """One logger for every builder and runtime (TensorRT keeps the first one it is given)."""
    global _LOGGER
    if _LOGGER is None:
        import tensorrt as trt

        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def build_plan(onnx_path: str, io: EncoderIO, profile: BatchProfile, fp16: bool, timing_cache: str | None,
               workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> bytes:
    """Build a serialized TensorRT plan from the exported graph."""
    import tensorrt as trt

    logger = _logger()
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # explicit batch is the only mode from 10 on
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):  # reads external weight files next to the graph
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.shapes(io).items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    cache_bytes = b""
    if timing_cache and os.path.isfile(timing_cache):
        with open(timing_cache, "rb") as f:
            cache_bytes = f.read()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    log.info("built the TensorRT plan in %.1f s", time.perf_counter() - t0)
    if timing_cache:
        atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def load_or_build_plan(onnx_path: str, onnx_key: str, io: EncoderIO, checksum: str, lookahead_ms: int,
                       dtype: torch.dtype, profile: BatchProfile, device: torch.device,
                       cache_dir: str | None = None) -> tuple[bytes, str, bool]:
    """(plan bytes, plan path, cache hit)."""
    import tensorrt as trt

    root = default_cache_dir(cache_dir)
    gpu = gpu_identity(device)
    key = plan_key(checksum, lookahead_ms, dtype, profile, trt.__version__, gpu, onnx_key)
    path = os.path.join(root, "tensorrt", key, PLAN_FILE)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return f.read(), path, True
    plan = build_plan(onnx_path, io, profile, fp16=dtype != torch.float32,
                      timing_cache=timing_cache_path(root, trt.__version__, gpu))
    atomic_write(path, plan)
    atomic_write(os.path.join(os.path.dirname(path), "meta.json"), json.dumps(
        {"key": key, "onnx": onnx_path, "gpu": gpu, "tensorrt": trt.__version__,
         "profile": profile.__dict__, "dtype": dtype_name(dtype)}, indent=1).encode())
    return plan, path, False


# -- run ----------------------------------------------------------------------------------------
def torch_dtype_of(trt_dtype) -> torch.dtype:
    import tensorrt as trt

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
             trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool, trt.DataType.INT8: torch.int8}
    for name, td in (("INT64", torch.int64), ("BF16", torch.bfloat16)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = td
    if trt_dtype not in table:
        raise RuntimeError(f"unsupported TensorRT tensor type {trt_dtype}")
    return table[trt_dtype]


def current_stream_handle() -> int:
    return torch.cuda.current_stream().cuda_stream


class TensorRTRunner(CountingRunner):
    """Runs a deserialized engine with the tensor-address API.

    `engine` and `context` are TensorRT objects (ICudaEngine, IExecutionContext);
    `dtype_of` maps a TensorRT tensor type to a torch dtype and `stream` returns the CUDA stream
    handle to enqueue on (torch's current stream). Both are injectable so the binding logic can
    be exercised without TensorRT.
    """

    def __init__(self, engine, context, profile: BatchProfile, dtype_of: Callable = torch_dtype_of,
                 stream: Callable[[], int] = current_stream_handle, is_input: Callable | None = None):
        super().__init__()
        self.engine = engine
        self.context = context
        self.profile = profile
        self.stream = stream
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if is_input is None:
            import tensorrt as trt

            def is_input(name):
                return engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        inputs = tuple(n for n in names if is_input(n))
        outputs = tuple(n for n in names if not is_input(n))
        if set(inputs) != set(INPUT_NAMES) or set(outputs) != set(OUTPUT_NAMES):
            raise RuntimeError(f"the TensorRT plan has I/O {inputs} -> {outputs}; expected {INPUT_NAMES} -> {OUTPUT_NAMES}")
        self.dtypes = {n: dtype_of(engine.get_tensor_dtype(n)) for n in names}

    def execute(self, audio_signal, length, cache_last_channel, cache_last_time, cache_last_channel_len):
        tensors = dict(zip(INPUT_NAMES, (audio_signal, length, cache_last_channel, cache_last_time,
                                         cache_last_channel_len)))
        batch = audio_signal.shape[0]
        self.profile.check(batch)
        ctx = self.context
        keep = []  # inputs converted here must outlive the enqueued work: held until return
        for name in INPUT_NAMES:
            t = tensors[name]
            want = self.dtypes[name]
            if t.dtype != want or not t.is_contiguous():
                t = t.to(dtype=want).contiguous()
            keep.append(t)
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise RuntimeError(f"TensorRT rejected shape {tuple(t.shape)} for input {name}")
            if not ctx.set_tensor_address(name, t.data_ptr()):
                raise RuntimeError(f"TensorRT rejected the address of input {name}")
        outputs = {}
        device = audio_signal.device
        for name in OUTPUT_NAMES:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"TensorRT could not infer the shape of output {name}: {shape}")
            out = torch.empty(shape, dtype=self.dtypes[name], device=device)
            if not ctx.set_tensor_address(name, out.data_ptr()):
                raise RuntimeError(f"TensorRT rejected the address of output {name}")
            outputs[name] = out
        if not ctx.execute_async_v3(self.stream()):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        # Work is ordered on torch's stream: consumers on that stream see finished outputs. The
        # converted inputs in `keep` are freed to torch's caching allocator, which only reuses
        # them for work on the same stream, i.e. after this enqueue.
        del keep
        result = tuple(outputs[n] for n in OUTPUT_NAMES)
        # Lengths come back int32 from plans that could not keep int64; the step wants int64.
        return tuple(r.long() if r.dtype == torch.int32 else r for r in result)


class TensorRTEncoder(WrappedGraphEncoder):
    def __init__(self, encoder, runner: TensorRTRunner, plan_path: str, cache_hit: bool):
        super().__init__(encoder, runner, "tensorrt")
        self.plan_path = plan_path
        self.plan_cache_hit = cache_hit

    def describe(self) -> dict:
        return {"engine": self.name, "plan": self.plan_path, "plan_cache_hit": self.plan_cache_hit,
                "profile": self.runner.profile.__dict__}


def build_tensorrt_encoder(model, cfg, device: torch.device, dtype: torch.dtype) -> TensorRTEncoder:
    ok, reason = tensorrt_available()
    if not ok:
        raise RuntimeError(reason)
    if device.type != "cuda":
        raise RuntimeError(f"the tensorrt engine needs a CUDA device, not {device}")
    import tensorrt as trt

    profile = batch_profile(cfg.max_batch)
    with torch.cuda.device(device):
        exported = export_encoder_onnx(model, cfg.lookahead_ms, cfg.cache_dir)
        plan, path, hit = load_or_build_plan(exported.path, exported.key, exported.io, model.checksum,
                                             cfg.lookahead_ms, dtype, profile, device, cfg.cache_dir)
        runtime = trt.Runtime(_logger())
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {path}; delete it to rebuild")
        context = engine.create_execution_context()
        if context is None:
            raise RuntimeError("TensorRT could not create an execution context (out of GPU memory?)")
    runner = TensorRTRunner(engine, context, profile)
    runner.runtime = runtime  # the runtime must outlive the engine
    log.info("tensorrt engine: %s (%s)", path, "cached plan" if hit else "new build")
    return TensorRTEncoder(model.nemo_model.encoder, runner, path, hit)
