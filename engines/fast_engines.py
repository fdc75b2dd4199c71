"""The fast encoder step (engines/fast_conformer.py) as encoder engines: "fast", the step run
eagerly behind NeMo's engine interface, and "fast-cudagraph", the step captured once per batch
bucket and replayed on static buffers (`FastStepBuffers`), with PyTorch's kernels or the
Triton ones (`--step-kernels triton`: the attention reading each row's cache in the slot pool,
engines/step_attention.py; the fused element-wise chains, engines/fused_norms.py).

Plugging in (engines/factory.py, EngineConfig.engine names): `build_fast_encoder(model, cfg,
device, dtype)` returns the eager engine ("fast"), `build_fast_encoder(..., graphs=True)` the
graph engine ("fast-cudagraph", buckets up to cfg.max_batch; `compile=True` adds torch.compile of
the per-layer pieces). StreamingEngine needs nothing else: it sizes the slot pool from
`cache_channel_shape`.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from engines.cudagraph_engine import batch_buckets, capture_per_bucket
from engines.encoders import EncoderEngine, PoolRows
from engines.fast_conformer import (_EAGER_PARTS, FastConformerParams, FastStepBuffers, StepParts, UnsupportedEncoder,
                                    fast_step)
from engines.step_attention import supports as step_attention_supports
from engines.step_attention import tuning_for

log = logging.getLogger(__name__)

ATTENTION_CHOICES = ("sdpa", "kernel")


class FastConformerEncoder(EncoderEngine):
    """The fast step, eagerly, behind the encoder-engine interface. Its attention cache is the
    projected K|V (`cache_channel_shape`), not NeMo's normalised inputs: StreamingEngine sizes
    the slot pool from that attribute."""

    name = "fast"

    def __init__(self, encoder: torch.nn.Module, device=None, dtype=None, compile: bool = False,
                 compile_mode: str | None = None):
        super().__init__(encoder)
        self.params = FastConformerParams.from_encoder(encoder, device, dtype)
        self.parts = StepParts(compile, compile_mode) if compile else _EAGER_PARTS
        self.cache_channel_shape = self.params.cache_channel_shape
        # The next attention cache is the last 70 frames of [cache; this step's T' frames]
        # (fast_step's cc_next), so the slot pool can keep it as a ring and commit T' frames.
        self.cache_shift_frames = self.params.geo.frames_out

    def _check_lookahead(self) -> None:
        if list(self.encoder.att_context_size) != self.params.att_context_size:
            raise RuntimeError(f"the encoder's att_context_size changed to {self.encoder.att_context_size} after "
                               f"the fast step was prepared for {self.params.att_context_size}")

    def _run(self, feats, lengths, cache_channel, cache_time, cache_len):
        self._check_lookahead()
        p, g = self.params, self.params.geo
        B = feats.shape[0]
        with torch.inference_mode():
            kv_work = feats.new_empty(g.n_layers, B, g.keys, 2 * g.d_model)
            kv_work[:, :, :g.cache].copy_(cache_channel)
            conv_work = feats.new_empty(g.n_layers, B, g.conv_cache + g.frames_out, g.d_model)
            conv_work[:, :, :g.conv_cache].copy_(cache_time.transpose(2, 3))
            bias = None
            if feats.is_cuda:
                bias = feats.new_empty(B, g.n_heads, g.frames_out, g.keys_pad)
            out = fast_step(p, feats, lengths.to(torch.int64), kv_work, conv_work, cache_len, self.parts, bias)
        self._count()
        return out


class FastCudaGraphEncoder(FastConformerEncoder):
    """The fast step captured into one CUDA graph per batch bucket (1, 2, 4, ..., max_batch),
    replayed on static buffers (`FastStepBuffers`). A batch of n rows runs in the smallest
    bucket >= n; padding rows hold a full chunk over an empty cache (finite, row-independent)
    and their outputs are discarded. Outputs are views into graph memory and the workspaces,
    valid until the next step. `use_graphs=False` runs the same static-buffer path without
    capturing (tests on CPU). `captures` must stay equal to the number of buckets."""

    name = "fast-cudagraph"

    def __init__(self, encoder: torch.nn.Module, max_batch: int, device=None, dtype=None, compile: bool = False,
                 compile_mode: str | None = None, use_graphs: bool = True, warmup_iters: int = 2,
                 buckets: tuple[int, ...] | None = None, attention: str = "sdpa", fused_norms: bool = False,
                 workspace_cache: bool | None = None, masked_convs: bool = True):
        super().__init__(encoder, device, dtype, compile, compile_mode)
        p = self.params
        # attention: "sdpa" (PyTorch's, over the workspace the pool's rows are gathered into) or
        # "kernel" (engines/step_attention.py, reading the cache in the pool: no gather);
        # fused_norms: each layer's element-wise chains in Triton kernels (engines/fused_norms.py)
        if attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, not {attention!r}")
        if fused_norms and compile:
            raise ValueError("torch.compile and the fused kernels are two ways to fuse the same chains: choose one")
        if attention == "kernel" or fused_norms:
            why = step_attention_supports(p.geo.d_k, p.dtype, p.device)
            if why is not None:
                what = "the attention kernel" if attention == "kernel" else "the fused kernels"
                raise UnsupportedEncoder(f"{what} cannot serve: {why}")
        if fused_norms:  # masked_convs=False: the subsampling's convs by cuDNN (the benchmarks' A/B)
            self.parts = StepParts(fused=True, masked_convs=masked_convs)
        if use_graphs and p.device.type != "cuda":
            raise RuntimeError(f"the fast-cudagraph engine needs a CUDA device, not {p.device}")
        self.attention = attention
        self.reads_cache_in_place = attention == "kernel"
        # workspace_cache: room in the workspace for each row's gathered attention cache. SDPA
        # needs it; the kernel reads the pool's ring in place and needs none (None: as the
        # attention needs), unless a caller gathers the cache for it (ring_cache off: the A/B).
        self.workspace_cache = attention != "kernel" if workspace_cache is None else workspace_cache
        if not self.workspace_cache and attention != "kernel":
            raise ValueError("SDPA attends over the cache in the workspace: workspace_cache must be on")
        self.use_graphs = use_graphs
        self.buckets = tuple(sorted(set(buckets) | {max_batch})) if buckets else batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.buffers = FastStepBuffers(p, self.max_batch, cache_in_workspace=self.workspace_cache)
        self.captures = 0
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, tuple] = {}
        t0 = time.perf_counter()
        with torch.inference_mode():
            self._prepare(warmup_iters)
        self.prepare_seconds = time.perf_counter() - t0
        log.info("fast-cudagraph engine: buckets %s, compile=%s, prepared in %.1f s", self.buckets, compile,
                 self.prepare_seconds)

    def _call(self, b: int):
        return fast_step(self.params, *self.buffers.step_args(b), parts=self.parts,
                         bias_buffer=self.buffers.bias_buffer(b) if self.params.device.type == "cuda" else None,
                         cache_head=self.buffers.cache_head[:b],
                         kernel_cache=self.buffers.kernel_cache if self.attention == "kernel" else None)

    @property
    def needs_cache_in_place(self) -> bool:
        """No room for a gathered cache: StreamingEngine must not gather for this engine."""
        return not self.workspace_cache

    # The slot pool may gather a batch's attention caches straight into the static buffer, in its
    # ring order, and pass each row's head (StreamingEngine does, with ring_cache).
    accepts_ring_order = True

    def cache_channel_buffer(self, n: int) -> torch.Tensor:
        return self.buffers.cache_channel(n)

    def _prepare(self, warmup_iters: int) -> None:
        if self.attention == "kernel":
            self.buffers.read_cache_from_workspace(self.max_batch)  # what warm-up and capture read
        if not self.use_graphs:
            return
        for b, (graph, out) in capture_per_bucket(self.params.device, self.buckets, self._call, warmup_iters).items():
            self._graphs[b] = graph
            self._outputs[b] = tuple(out)
            self.captures += 1

    def _run(self, feats, lengths, cache_channel, cache_time, cache_len, cache_head=None):
        self._check_lookahead()
        n = feats.shape[0]
        b = next((x for x in self.buckets if x >= n), None)
        if b is None:
            raise ValueError(f"batch {n} exceeds the largest bucket {self.buckets[-1]}")
        g = self.params.geo
        with torch.inference_mode():
            i_feats, i_len, i_cc, i_ct, i_ccl = self.buffers.inputs(b)
            i_head = self.buffers.cache_head
            i_feats[:n].copy_(feats)
            i_len[:n].copy_(lengths)
            if isinstance(cache_channel, PoolRows):  # the kernel reads the pool's rows in place
                if cache_head is None:
                    raise ValueError("an attention cache read in the pool comes in its ring order: cache_head is needed")
                self.buffers.read_cache_from_pool(cache_channel, b)
            else:
                if i_cc is None:
                    raise ValueError("this engine has no workspace for the attention cache: it reads each row's "
                                     "cache in the slot pool (PoolRows), with the pool's ring")
                if self.attention == "kernel":
                    self.buffers.read_cache_from_workspace(b)
                if not _same_view(cache_channel, i_cc[:, :n]):  # gathered elsewhere: copy it in
                    i_cc[:, :n].copy_(cache_channel)
            i_ct[:, :n].copy_(cache_time)
            i_ccl[:n].copy_(cache_len)
            if cache_head is None:
                i_head[:b].zero_()
            else:
                i_head[:n].copy_(cache_head)
                i_head[n:b].zero_()
            if b > n:
                i_len[n:].fill_(g.frames_in)
                i_ccl[n:].zero_()
            if self.use_graphs:
                self._graphs[b].replay()
                out = self._outputs[b]
            else:
                out = self._call(b)
        self._count()
        enc, enc_len, cc, ct, ccl = out
        return enc[:n], enc_len[:n], cc[:, :n], ct[:, :n], ccl[:n]

    def describe(self) -> dict:
        return {"engine": self.name, "buckets": list(self.buckets), "captures": self.captures,
                "compile": self.parts.compiled, "graphs": self.use_graphs, "attention": self.attention,
                "fused_norms": self.parts.fused, "masked_convs": self.parts.masked_convs,
                "workspace_cache": self.workspace_cache,
                **({"attention_launch": dataclasses.asdict(tuning_for(self.params.geo.frames_out))}
                   if self.attention == "kernel" else {}),
                "prepare_seconds": round(self.prepare_seconds, 2)}


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def build_fast_encoder(model, cfg, device: torch.device, dtype: torch.dtype, graphs: bool = False, **options):
    """Factory entry: `graphs=False` -> FastConformerEncoder ("fast"), `graphs=True` ->
    FastCudaGraphEncoder ("fast-cudagraph", buckets up to cfg.max_batch).

    With `cfg.step_kernels` "triton" (or "auto") the graph engine gets the Triton kernels (the attention
    reading the pool; the fused chains unless torch.compile fuses them). Where Triton cannot
    serve, or building with the kernels fails (a compiler or driver problem at the warm-up), the
    engine is built with PyTorch's kernels and the reason is logged (a warning, except for "auto"
    where Triton cannot serve at all); its
    `describe()` (the start-up report) says which ran. Options naming the kernels (`attention`,
    `fused_norms`: the benchmarks' A/B) are taken as given, and a failure is raised."""
    encoder = model.nemo_model.encoder
    if not graphs:
        return FastConformerEncoder(encoder, device, dtype, **options)
    if "attention" in options or "fused_norms" in options:
        return FastCudaGraphEncoder(encoder, cfg.max_batch, device, dtype, **options)
    kernels = getattr(cfg, "step_kernels", "torch")
    if kernels in ("triton", "auto"):
        why = step_attention_supports(encoder.layers[0].self_attn.d_k, dtype, device)
        asked = kernels == "triton"  # "auto" where Triton cannot serve (a CPU) is no surprise
        if why is None:
            asked = True  # a failure to build is, either way
            try:
                return FastCudaGraphEncoder(encoder, cfg.max_batch, device, dtype, attention="kernel",
                                            fused_norms=not options.get("compile"), **options)
            except Exception as exc:  # noqa: BLE001 - a compiler or driver problem: PyTorch's kernels serve
                why = f"building with them failed: {type(exc).__name__}: {exc}"[:500]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        (log.warning if asked else log.info)("the Triton kernels cannot serve here (%s): the step keeps PyTorch's",
                                             why)
    return FastCudaGraphEncoder(encoder, cfg.max_batch, device, dtype, **options)
