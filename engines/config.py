"""The engine layer's one frozen configuration, validated on construction. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass

# "auto" picks before anything is built: fast-cudagraph on a GPU, eager on the CPU.
ENGINE_NAMES = ("auto", "eager", "fast", "cudagraph", "fast-cudagraph", "onnx", "tensorrt")
DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")
# Lookahead (ms) -> NeMo att_context_size right context, for models with 8x subsampling and a
# 10 ms hop: (right + 1) * 80 ms of audio per step.
LOOKAHEAD_TO_RIGHT_CONTEXT = {80: 0, 160: 1, 560: 6, 1120: 13}
UTTERANCE_RESETS = ("auto", "keep", "decoder", "all")
DECODE_STREAM_MODES = ("auto", "on", "off")
STEP_KERNELS = ("torch", "triton", "auto")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "builtin:tiny"   # "builtin:<name>" or a path to a .nemo file
    engine: str = "eager"         # see ENGINE_NAMES; "fast*" use the projected-K/V encoder step
    device: str = "auto"          # "auto" (cuda when present), "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"           # "auto": float16 on cuda, float32 on cpu
    lookahead_ms: int = 160
    max_streams: int = 64         # cache slots; the admission limit
    max_batch: int = 32           # chunks per step
    # "auto" (asr-server's defaults): on a GPU the factory sizes these from the device
    # (engines.capacity: slots from free memory, the batch cap from the step's measured time); on the CPU,
    # or with a factory that does not know them, max_streams and max_batch above hold.
    auto_max_streams: bool = False
    auto_max_batch: bool = False
    fallback_engine: str | None = None  # engine to start on if `engine` cannot load (reported)
    cache_dir: str | None = None  # exported graphs / built plans; default ~/.cache/nemo-stream
    seed: int = 0                 # builtin models' random weights
    # Frame each stream after a few ms of silence so a chunk is complete at the end of its own
    # audio (see engines.geometry); False frames the raw audio exactly as NeMo does.
    align_chunks: bool = True
    cudagraph_compile: bool = False  # torch.compile under the CUDA graphs (slower start, faster small batches)
    cudagraph_sdpa: bool = False     # NeMo module's attention through SDPA (cudagraph engine)
    # Every Nth step synchronizes the device at each phase boundary, so its StepTimings hold the
    # GPU's time per phase (metrics: asr_engine_phase_seconds); 0: never. One step in 100 costs
    # a few syncs, well under 1% of the engine's time.
    profile_every: int = 100
    # What a stream's model state does when one utterance ends and the next begins (endpointing):
    # "keep" carries the encoder caches and decoder state on (a model trained on long-form
    # audio), "decoder" restarts the RNNT prediction network (Riva's "decoder will be reset"),
    # "all" restarts the encoder caches too, as for a new stream (a model trained on single
    # utterances only); "auto": the model's own setting (builtin:demo: all; others: keep).
    utterance_reset: str = "auto"
    # On a GPU, a step's decode and commit on a CUDA stream of their own, so the next step's
    # encoder runs beside them (engines.streaming_engine: decode_stream): "on", "off", or "auto"
    # (asr-server's default): start-up times the engine's steps both ways at its max batch and
    # keeps the faster (engines.decode_overlap). On an H100 the stream made the steps 1.17x as
    # frequent at 160 ms and 256 rows but 0.58x at 560 ms (bench/RESULTS.md, run 36). Off here,
    # for the factory's other callers (tests, benchmarks), which choose.
    decode_stream: str = "off"
    # The fast-cudagraph engine's kernels (engines.fast_engines): "torch", PyTorch's operations
    # (SDPA over a copy of each row's attention cache gathered into the encoder's workspace), or
    # "triton": the attention by engines/step_attention.py, which reads each row's cache in the
    # slot pool itself (the step copies no cache: 7 MB a stream for the 0.6B model), and each
    # layer's element-wise chains fused (engines/fused_norms.py: fewer launches, fewer passes).
    # Needs Triton (PyTorch's CUDA wheels bring it); where it cannot run the engine keeps "torch"
    # and says so. "auto": "triton" where Triton can serve (a CUDA device, Triton installed),
    # else "torch" without a warning (a CPU). "torch" here for the factory's other callers.
    step_kernels: str = "torch"

    def __post_init__(self) -> None:
        if self.utterance_reset not in UTTERANCE_RESETS:
            raise ValueError(f"unknown utterance_reset {self.utterance_reset!r}; choose one of "
                             f"{', '.join(UTTERANCE_RESETS)}")
        if self.decode_stream not in DECODE_STREAM_MODES:
            raise ValueError(f"unknown decode_stream {self.decode_stream!r}; choose one of "
                             f"{', '.join(DECODE_STREAM_MODES)}")
        if self.step_kernels not in STEP_KERNELS:
            raise ValueError(f"unknown step_kernels {self.step_kernels!r}; choose one of {', '.join(STEP_KERNELS)}")
        if self.engine not in ENGINE_NAMES:
            raise ValueError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINE_NAMES)}")
        if self.fallback_engine is not None and self.fallback_engine not in ENGINE_NAMES[1:]:
            raise ValueError(f"unknown fallback engine {self.fallback_engine!r}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
        if self.lookahead_ms not in LOOKAHEAD_TO_RIGHT_CONTEXT:
            allowed = ", ".join(str(k) for k in LOOKAHEAD_TO_RIGHT_CONTEXT)
            raise ValueError(f"lookahead_ms {self.lookahead_ms} not supported; choose one of {allowed}")
        if self.max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        if not 1 <= self.max_batch:
            raise ValueError("max_batch must be at least 1")
        if self.profile_every < 0:
            raise ValueError("profile_every must be >= 0")
        if not self.model:
            raise ValueError("model must name a builtin model or a .nemo path")
