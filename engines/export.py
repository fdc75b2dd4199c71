"""ONNX export of the streaming encoder step, cached on disk.

The exported graph is NeMo's own (`set_export_config({'cache_support': 'True'})`, then
`encoder.export`): inputs `audio_signal [B, n_mels, T]`, `length [B]`, `cache_last_channel
[B, L, C, d]`, `cache_last_time [B, L, d, k]`, `cache_last_channel_len [B]`; outputs `outputs
[B, d, T']`, `encoded_lengths`, `cache_last_channel_next`, `cache_last_time_next`,
`cache_last_channel_next_len`. Caches are batch-first, unlike the PyTorch module. Only the
batch axis is dynamic: every step has one shape (NeMo's "pad and drop" chunking), which is
what lets TensorRT build one optimization profile over the batch.

Cache layout: `<cache_dir>/onnx/<key>/encoder.onnx` (+ external weight files for models over
2 GB) and `meta.json`, written into a temporary directory first and renamed into place, so a
reader never sees a half-written export and concurrent exporters do not clobber each other.
The key covers the weights (LoadedModel.checksum), the lookahead, the dtype, and the versions
of the exporter stack.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch

from engines.models import LoadedModel

log = logging.getLogger(__name__)

INPUT_NAMES = ("audio_signal", "length", "cache_last_channel", "cache_last_time", "cache_last_channel_len")
OUTPUT_NAMES = ("outputs", "encoded_lengths", "cache_last_channel_next", "cache_last_time_next",
                "cache_last_channel_next_len")
ONNX_FILE = "encoder.onnx"
META_FILE = "meta.json"
OPSET = 17
# Bump when the export procedure changes in a way that changes the graph.
EXPORT_FORMAT_VERSION = 1


def default_cache_dir(configured: str | None = None) -> str:
    if configured:
        return os.path.abspath(os.path.expanduser(configured))
    env = os.environ.get("NEMO_STREAM_CACHE")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    return os.path.join(os.path.expanduser("~"), ".cache", "nemo-stream")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class EncoderIO:
    """The step's fixed shapes (everything but the batch)."""

    n_mels: int
    frames_in: int        # pre-encode cache + chunk mel frames
    n_layers: int
    d_model: int
    cache_channel: int    # last_channel_cache_size (70)
    cache_time: int       # conv context (8)
    frames_out: int       # encoder frames per step (valid_out_len)

    def input_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Batch-first shapes, as the exported graph takes them."""
        return {
            "audio_signal": (batch, self.n_mels, self.frames_in),
            "length": (batch,),
            "cache_last_channel": (batch, self.n_layers, self.cache_channel, self.d_model),
            "cache_last_time": (batch, self.n_layers, self.d_model, self.cache_time),
            "cache_last_channel_len": (batch,),
        }


def encoder_io(model: LoadedModel) -> EncoderIO:
    enc = model.nemo_model.encoder
    cfg = enc.streaming_cfg
    chunk = cfg.chunk_size[1] if isinstance(cfg.chunk_size, list) else cfg.chunk_size
    pre = cfg.pre_encode_cache_size[1] if isinstance(cfg.pre_encode_cache_size, list) else cfg.pre_encode_cache_size
    return EncoderIO(n_mels=enc._feat_in, frames_in=chunk + pre, n_layers=len(enc.layers), d_model=enc.d_model,
                     cache_channel=cfg.last_channel_cache_size, cache_time=enc.conv_context_size[0],
                     frames_out=cfg.valid_out_len)


def export_key(checksum: str, lookahead_ms: int, dtype: torch.dtype) -> str:
    """Directory name for one export: readable parts plus a hash of everything that matters."""
    import onnx

    import nemo

    parts = {
        "checksum": checksum, "lookahead_ms": int(lookahead_ms), "dtype": dtype_name(dtype),
        "format": EXPORT_FORMAT_VERSION, "opset": OPSET, "torch": torch.__version__.split("+")[0],
        "nemo": nemo.__version__, "onnx": onnx.__version__,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
    return f"{checksum}-la{int(lookahead_ms)}-{dtype_name(dtype)}-{digest}"


@dataclass(frozen=True)
class ExportedEncoder:
    path: str          # the .onnx file
    key: str
    cache_hit: bool    # True when an earlier export was reused
    io: EncoderIO


def _model_dtype_device(module: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(module.parameters())
    return p.dtype, p.device


def example_inputs(io: EncoderIO, batch: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Batch-first example inputs, rows at different cache fill levels (non-trivial values, so
    tracing cannot fold anything data-dependent into constants)."""
    g = torch.Generator().manual_seed(seed)
    shapes = io.input_shapes(batch)
    feats = torch.randn(shapes["audio_signal"], generator=g)
    length = torch.full((batch,), io.frames_in, dtype=torch.int64)
    length[-1] = max(io.frames_in - 3, 1)
    cc = torch.randn(shapes["cache_last_channel"], generator=g)
    ct = torch.randn(shapes["cache_last_time"], generator=g)
    ccl = torch.randint(0, io.cache_channel + 1, (batch,), generator=g, dtype=torch.int64)
    return (feats.to(device, dtype), length.to(device), cc.to(device, dtype), ct.to(device, dtype), ccl.to(device))


@contextlib.contextmanager
def _cache_support_enabled(model: LoadedModel):
    """NeMo's export switch, undone afterwards so the live model's behaviour is unchanged."""
    nemo = model.nemo_model
    enc = nemo.encoder
    prev_flag = getattr(enc, "export_cache_support", False)
    prev_cfg = dict(getattr(nemo, "export_config", {}) or {})
    nemo.set_export_config({"cache_support": "True"})
    try:
        yield
    finally:
        enc.export_cache_support = prev_flag
        nemo.export_config = prev_cfg
        enc.setup_streaming_params()


def _read_meta(directory: str) -> dict | None:
    try:
        with open(os.path.join(directory, META_FILE)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if not os.path.isfile(os.path.join(directory, ONNX_FILE)):
        return None
    return meta


def export_encoder_onnx(model: LoadedModel, lookahead_ms: int, cache_dir: str | None = None,
                        force: bool = False) -> ExportedEncoder:
    """The ONNX graph of `model`'s encoder step at its current lookahead, dtype and device,
    exported once and then reused from the cache."""
    enc = model.nemo_model.encoder
    dtype, device = _model_dtype_device(enc)
    io = encoder_io(model)
    key = export_key(model.checksum, lookahead_ms, dtype)
    root = os.path.join(default_cache_dir(cache_dir), "onnx")
    final = os.path.join(root, key)
    if not force and _read_meta(final) is not None:
        log.info("ONNX export cache hit: %s", final)
        return ExportedEncoder(os.path.join(final, ONNX_FILE), key, True, io)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root)
    try:
        t0 = time.perf_counter()
        path = os.path.join(tmp, ONNX_FILE)
        example = example_inputs(io, 2, dtype, device)
        dynamic_axes = {name: {0: "batch"} for name in INPUT_NAMES + OUTPUT_NAMES}
        with _cache_support_enabled(model):
            enc.export(path, input_example=example, dynamic_axes=dynamic_axes, onnx_opset_version=OPSET,
                       check_trace=False)
        _check_io_names(path)
        meta = {"key": key, "checksum": model.checksum, "lookahead_ms": lookahead_ms,
                "dtype": dtype_name(dtype), "model": model.name, "io": io.__dict__,
                "exported_on": str(device), "seconds": round(time.perf_counter() - t0, 2)}
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        if force and os.path.isdir(final):
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same export first: use theirs.
            if _read_meta(final) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("exported the encoder to ONNX in %.1f s: %s", time.perf_counter() - t0, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportedEncoder(os.path.join(final, ONNX_FILE), key, False, io)


def _check_io_names(path: str) -> None:
    import onnx

    m = onnx.load(path, load_external_data=False)
    inputs = tuple(i.name for i in m.graph.input)
    outputs = tuple(o.name for o in m.graph.output)
    if inputs != INPUT_NAMES or outputs != OUTPUT_NAMES:
        raise RuntimeError(f"unexpected exported encoder I/O: inputs {inputs}, outputs {outputs}")
