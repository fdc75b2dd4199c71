"""ONNX Runtime encoder engine: NeMo's exported streaming encoder graph run by ONNX Runtime.

The graph comes from engines.export (cached on disk). It plugs into the streaming step through
TRTEncoderWrapper (the same path the TensorRT engine takes): the wrapper defines
`cache_aware_stream_step` itself, so NeMo's PyTorch forward can never run in its place, and the
runner counts an execution only after ONNX Runtime has returned.

Providers: CUDA when the engine's device is a GPU and onnxruntime-gpu offers it (inputs and
outputs bound to torch's device memory by address through I/O binding, no host round trip),
else the CPU provider (torch CPU tensors are handed over as zero-copy numpy views). A CUDA
device without the CUDA provider is an error, never a silent move to the CPU.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from engines.encoders import CountingRunner, WrappedGraphEncoder
from engines.export import INPUT_NAMES, OUTPUT_NAMES, EncoderIO, export_encoder_onnx

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
    "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool,
}
_NP_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
             torch.int32: np.int32, torch.bool: np.bool_}


def ort_providers(device: torch.device) -> list:
    """The execution providers for `device`; raises when the device's provider is missing."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(
                "the onnx engine on a CUDA device needs onnxruntime-gpu (CUDAExecutionProvider); "
                f"this onnxruntime {ort.__version__} offers only {', '.join(available)}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    if device.type != "cpu":
        raise RuntimeError(f"the onnx engine does not support device {device}")
    return ["CPUExecutionProvider"]


class OnnxRunner(CountingRunner):
    """Runs the exported graph; inputs and outputs are torch tensors, caches batch-first."""

    def __init__(self, onnx_path: str, io: EncoderIO, device: torch.device, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        self.path = onnx_path
        self.io = io
        self.device = device
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(onnx_path, sess_options=opts, providers=ort_providers(device))
        self.providers = tuple(self.session.get_providers())
        names_in = tuple(i.name for i in self.session.get_inputs())
        names_out = tuple(o.name for o in self.session.get_outputs())
        if names_in != INPUT_NAMES or names_out != OUTPUT_NAMES:
            raise RuntimeError(f"{onnx_path}: unexpected graph I/O {names_in} -> {names_out}")
        self.input_dtypes = {i.name: _ORT_TYPES[i.type] for i in self.session.get_inputs()}
        self.output_dtypes = {o.name: _ORT_TYPES[o.type] for o in self.session.get_outputs()}
        self.on_cuda = device.type == "cuda"
        if self.on_cuda and self.providers[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"onnxruntime did not enable the CUDA provider (got {self.providers})")

    def output_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        io = self.io
        return {
            "outputs": (batch, io.d_model, io.frames_out),
            "encoded_lengths": (batch,),
            "cache_last_channel_next": (batch, io.n_layers, io.cache_channel, io.d_model),
            "cache_last_time_next": (batch, io.n_layers, io.d_model, io.cache_time),
            "cache_last_channel_next_len": (batch,),
        }

    def _inputs(self, tensors) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in zip(INPUT_NAMES, tensors):
            want = self.input_dtypes[name]
            if t.device.type != self.device.type:
                raise RuntimeError(f"input {name} is on {t.device}; the onnx engine runs on {self.device}")
            out[name] = t.to(dtype=want).contiguous()
        return out

    def execute(self, audio_signal, length, cache_last_channel, cache_last_time, cache_last_channel_len):
        feeds = self._inputs((audio_signal, length, cache_last_channel, cache_last_time, cache_last_channel_len))
        if self.on_cuda:
            return self._execute_cuda(feeds)
        result = self.session.run(list(OUTPUT_NAMES), {k: v.numpy() for k, v in feeds.items()})
        return tuple(torch.from_numpy(np.ascontiguousarray(r)) for r in result)

    def _execute_cuda(self, feeds: dict[str, torch.Tensor]):
        batch = feeds["audio_signal"].shape[0]
        dev = feeds["audio_signal"].device
        binding = self.session.io_binding()
        for name, t in feeds.items():
            binding.bind_input(name, "cuda", dev.index or 0, _NP_TYPES[t.dtype], tuple(t.shape), t.data_ptr())
        outputs = {}
        for name, shape in self.output_shapes(batch).items():
            t = torch.empty(shape, dtype=self.output_dtypes[name], device=dev)
            binding.bind_output(name, "cuda", dev.index or 0, _NP_TYPES[t.dtype], shape, t.data_ptr())
            outputs[name] = t
        # ONNX Runtime runs on its own stream: the inputs torch produced must be ready first.
        torch.cuda.current_stream(dev).synchronize()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # the outputs are complete before torch reads them
        return tuple(outputs[n] for n in OUTPUT_NAMES)


class OnnxEncoder(WrappedGraphEncoder):
    def __init__(self, encoder, runner: OnnxRunner, export_key: str, cache_hit: bool):
        super().__init__(encoder, runner, "onnx")
        self.export_key = export_key
        self.export_cache_hit = cache_hit

    def describe(self) -> dict:
        return {"engine": self.name, "providers": list(self.runner.providers), "onnx": self.runner.path,
                "export_cache_hit": self.export_cache_hit}


def build_onnx_encoder(model, cfg, device: torch.device, dtype: torch.dtype) -> OnnxEncoder:
    if device.type == "cpu" and dtype != torch.float32:
        raise RuntimeError(f"the onnx engine on the CPU needs float32 (ONNX Runtime's CPU provider lacks "
                           f"{dtype} kernels for this graph); pass dtype float32")
    ort_providers(device)  # fail before a long export when the provider is missing
    exported = export_encoder_onnx(model, cfg.lookahead_ms, cfg.cache_dir)
    runner = OnnxRunner(exported.path, exported.io, device)
    log.info("onnx engine: %s on %s (export %s)", exported.path, runner.providers[0],
             "cached" if exported.cache_hit else "new")
    return OnnxEncoder(model.nemo_model.encoder, runner, exported.key, exported.cache_hit)
