"""CUDA-graph encoder engine: NeMo's encoder step captured once per batch-size bucket and
replayed.

Every step has one shape per batch size (NeMo's "pad and drop" chunking), so the whole step,
~6,000 kernel launches for Nemotron-0.6b, can be captured into a CUDA graph and replayed with
one launch. A batch of B chunks runs in the smallest bucket >= B (1, 2, 4, ..., max_batch);
the rows past B are padding: they hold a full-length chunk of finite data with an empty cache,
so every op stays well-defined, and since every op of the encoder in eval mode is row-wise
(attention masks, convolutions and norms act within a row), they cannot change the real rows;
their outputs are discarded.

Static buffers: one set of input buffers sized for the largest bucket; bucket b's graph reads
the first b rows of each. Outputs live in the graphs' memory (one pool shared by all buckets)
and are returned as views, valid until the next step: the streaming step decodes them and
scatters the caches into the slot pool before it runs the encoder again.

All capture happens at construction: warm-up (cuDNN/cuBLAS autotuning, optional torch.compile)
and one capture per bucket, largest first. `captures` counts graph captures; it must stay equal
to the number of buckets for the life of the engine (no recapture in steady state), and
`executions` counts replays.

Options: `compile=True` runs the step through torch.compile (inductor) under the graphs.
`compile_scope="layers"` (default) compiles the Conformer layer's forward once and runs every
layer through it (the 24 layers share one compiled graph: compile time is that of one layer,
and the batch axis goes dynamic after the second bucket, so about three compilations serve all
buckets); `compile_scope="step"` compiles the whole step (one graph, much longer compile). The
compiled code is only swapped in while tracing and capturing: the shared NeMo module, which the
eager reference uses, never runs compiled code. `sdpa=True` switches NeMo's attention to
torch's scaled_dot_product_attention with the relative-position bias as the mask (a property of
the shared module: it changes the eager reference too).

`use_graphs=False` runs the same static-buffer, bucket and padding path without capturing:
this is how the padding logic is tested on machines without CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time

import torch

from engines.encoders import EncoderEngine
from engines.export import EncoderIO, encoder_io

log = logging.getLogger(__name__)


def capture_per_bucket(device: torch.device, buckets, call, warmup_iters: int = 2) -> dict:
    """`call(b)` captured into one CUDA graph per bucket b: each bucket is first run
    `warmup_iters` times (at least once) on a side stream, so lazy initialisation (cuBLAS/cuFFT
    plans, the allocator) happens outside the capture, then captured there. Largest first, in
    one memory pool: smaller buckets reuse the freed intermediates of larger ones. Returns
    {bucket: (graph, what the captured call returned)}; replaying a graph rewrites that output."""
    pool = torch.cuda.graph_pool_handle()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    captured = {}
    for b in sorted(buckets, reverse=True):
        with torch.cuda.stream(side):
            for _ in range(max(warmup_iters, 1)):
                call(b)
        side.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=side):
            out = call(b)
        captured[b] = (graph, out)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    return captured


def batch_buckets(max_batch: int, buckets: list[int] | tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Bucket sizes: powers of two up to 64, then quarter steps between powers of two (64, 80,
    96, 112, 128, 160, ...), and max_batch itself (or the given sizes, with max_batch added when
    missing so every allowed batch has a bucket).

    Why the quarter steps: a batch runs at the price of its bucket, and with powers of two alone
    a batch of 129 paid for 256. On an H100 at about 1,000 streams (160 ms) batches hover around
    128; each that crossed it took ~5 ms longer, the next batch grew by that much, and the
    server tipped from p95 ~110 ms into seconds of queueing (bench/RESULTS.md). Above 64 rows
    a bucket now wastes at most a fifth of its rows."""
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    if buckets:
        out = sorted({int(b) for b in buckets if 1 <= int(b) <= max_batch} | {max_batch})
        return tuple(out)
    out, b = set(), 1
    while b < max_batch:
        out.add(b)
        if b >= 64:
            out.update(x for x in (b + b // 4, b + b // 2, b + 3 * b // 4) if x < max_batch)
        b *= 2
    out.add(max_batch)
    return tuple(sorted(out))


def bucket_for(batch: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if b >= batch:
            return b
    raise ValueError(f"batch {batch} exceeds the largest captured bucket {buckets[-1]}")


def set_sdpa(encoder: torch.nn.Module, enabled: bool) -> None:
    """Switch NeMo's relative-position attention to torch SDPA (or back)."""
    for layer in encoder.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "use_pytorch_sdpa"):
            attn.use_pytorch_sdpa = enabled
    encoder.use_pytorch_sdpa = enabled


class CudaGraphEncoder(EncoderEngine):
    name = "cudagraph"

    def __init__(self, encoder: torch.nn.Module, io: EncoderIO, device: torch.device, dtype: torch.dtype,
                 max_batch: int, buckets: list[int] | None = None, compile: bool = False,
                 compile_mode: str | None = None, compile_scope: str = "layers", sdpa: bool = False,
                 use_graphs: bool = True, warmup_iters: int = 2):
        super().__init__(encoder)
        if use_graphs and device.type != "cuda":
            raise RuntimeError(f"the cudagraph engine needs a CUDA device, not {device}")
        self.io = io
        self.device = device
        self.dtype = dtype
        self.use_graphs = use_graphs
        self.buckets = batch_buckets(max_batch, buckets)
        self.max_batch = self.buckets[-1]
        self.compiled = compile
        self.sdpa = sdpa
        self.captures = 0
        self.capture_seconds = 0.0
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, tuple[torch.Tensor, ...]] = {}
        if sdpa:
            set_sdpa(encoder, True)
        # NeMo's forward grows its positional-encoding table on demand; do it once, here.
        encoder.update_max_seq_length(seq_length=io.frames_in, device=device)
        if compile_scope not in ("layers", "step"):
            raise ValueError(f"compile_scope must be 'layers' or 'step', not {compile_scope!r}")
        self.compile_mode = compile_mode
        self.compile_scope = compile_scope
        self._fn = self._forward
        self._layer_fn = None

        B, L = self.max_batch, io.n_layers
        opts = dict(device=device)
        self.in_feats = torch.zeros((B, io.n_mels, io.frames_in), dtype=dtype, **opts)
        self.in_len = torch.full((B,), io.frames_in, dtype=torch.int64, **opts)
        self.in_cc = torch.zeros((L, B, io.cache_channel, io.d_model), dtype=dtype, **opts)
        self.in_ct = torch.zeros((L, B, io.d_model, io.cache_time), dtype=dtype, **opts)
        self.in_ccl = torch.zeros((B,), dtype=torch.int64, **opts)
        t0 = time.perf_counter()
        with torch.inference_mode():
            self._prepare(warmup_iters)
        self.capture_seconds = time.perf_counter() - t0
        log.info("cudagraph engine: buckets %s, compile=%s, sdpa=%s, prepared in %.1f s", self.buckets,
                 compile, sdpa, self.capture_seconds)

    # -- the computation ---------------------------------------------------------------------
    def _forward(self, feats, lengths, cc, ct, ccl):
        """What NeMo's cache_aware_stream_step computes (keep_all_outputs=True), minus the
        typecheck wrapper and the positional-table resize done at start."""
        enc = self.encoder
        rets = enc.forward_internal(feats, lengths, cache_last_channel=cc, cache_last_time=ct,
                                    cache_last_channel_len=ccl)
        return enc.streaming_post_process(rets, keep_all_outputs=True)

    def _views(self, b: int):
        return (self.in_feats[:b], self.in_len[:b], self.in_cc[:, :b], self.in_ct[:, :b], self.in_ccl[:b])

    def _mark_dynamic(self, views) -> None:
        # Step scope: one compilation for every bucket past 1 (dynamo specialises size 1).
        if not (self.compiled and self.compile_scope == "step") or views[0].shape[0] < 2:
            return
        for t, dim in zip(views, (0, 0, 1, 1, 0)):
            torch._dynamo.mark_dynamic(t, dim, min=2, max=self.max_batch)

    @contextlib.contextmanager
    def _compiled_layers(self):
        """While tracing or capturing: every Conformer layer runs through one compiled function
        (the layers share their code, so dynamo compiles it once, not once per layer). The
        shared module is restored afterwards: the eager reference never runs compiled code."""
        if not (self.compiled and self.compile_scope == "layers"):
            yield
            return
        layers = list(self.encoder.layers)
        for layer in layers:
            layer.forward = functools.partial(self._layer_fn, layer)
        try:
            yield
        finally:
            for layer in layers:
                layer.__dict__.pop("forward", None)

    def _prepare(self, warmup_iters: int) -> None:
        if self.compiled:
            if self.compile_scope == "step":
                self._fn = torch.compile(self._forward, mode=self.compile_mode)
            else:
                layer_type = type(self.encoder.layers[0])
                if any(type(layer) is not layer_type for layer in self.encoder.layers):
                    raise RuntimeError("per-layer compile needs layers of one type; use compile_scope='step'")
                self._layer_fn = torch.compile(layer_type.forward, mode=self.compile_mode)
        if not self.use_graphs:
            with self._compiled_layers():
                for b in sorted(self.buckets, reverse=True):
                    views = self._views(b)
                    self._mark_dynamic(views)
                    self._fn(*views)
            return
        def call(b: int):
            views = self._views(b)
            self._mark_dynamic(views)
            return self._fn(*views)

        with self._compiled_layers():
            for b, (graph, out) in capture_per_bucket(self.device, self.buckets, call, warmup_iters).items():
                self._graphs[b] = graph
                self._outputs[b] = tuple(out)
                self.captures += 1

    # -- a step ------------------------------------------------------------------------------
    def _run(self, feats, lengths, cache_channel, cache_time, cache_len):
        n = feats.shape[0]
        b = bucket_for(n, self.buckets)
        with torch.inference_mode():
            self.in_feats[:n].copy_(feats)
            self.in_len[:n].copy_(lengths)
            self.in_cc[:, :n].copy_(cache_channel)
            self.in_ct[:, :n].copy_(cache_time)
            self.in_ccl[:n].copy_(cache_len)
            if b > n:
                # Padding rows: a full chunk over an empty cache. Their features and caches keep
                # whatever finite values earlier steps left there; rows are independent.
                self.in_len[n:b].fill_(self.io.frames_in)
                self.in_ccl[n:b].zero_()
            if self.use_graphs:
                self._graphs[b].replay()
                out = self._outputs[b]
            else:
                with self._compiled_layers():
                    out = self._fn(*self._views(b))
        self._count()
        enc, enc_len, cc, ct, ccl = out
        return enc[:n], enc_len[:n], cc[:, :n], ct[:, :n], ccl[:n]

    def describe(self) -> dict:
        return {"engine": self.name, "buckets": list(self.buckets), "captures": self.captures,
                "compile": self.compile_scope if self.compiled else False, "sdpa": self.sdpa, "graphs": self.use_graphs,
                "prepare_seconds": round(self.capture_seconds, 2)}


def _flag(cfg, name: str, env: str) -> bool:
    value = getattr(cfg, name, None)
    if value is None:
        value = os.environ.get(env, "").strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def build_cudagraph_encoder(model, cfg, device: torch.device, dtype: torch.dtype, **overrides) -> CudaGraphEncoder:
    """The factory's entry. torch.compile and SDPA come from EngineConfig fields
    `cudagraph_compile` / `cudagraph_sdpa` when it has them, else from the environment
    (NEMO_STREAM_CUDAGRAPH_COMPILE=1, NEMO_STREAM_CUDAGRAPH_SDPA=1); keyword overrides win."""
    if device.type != "cuda" and overrides.get("use_graphs", True):
        raise RuntimeError(f"the cudagraph engine needs a CUDA device; this engine runs on {device}")
    options = dict(compile=_flag(cfg, "cudagraph_compile", "NEMO_STREAM_CUDAGRAPH_COMPILE"),
                   sdpa=_flag(cfg, "cudagraph_sdpa", "NEMO_STREAM_CUDAGRAPH_SDPA"))
    options.update(overrides)
    return CudaGraphEncoder(model.nemo_model.encoder, encoder_io(model), device, dtype, cfg.max_batch, **options)
