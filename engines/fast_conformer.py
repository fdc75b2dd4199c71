"""A faster, exact re-implementation of one cache-aware streaming step of NeMo's ConformerEncoder.

Supported: `rel_pos` self-attention with `chunked_limited` context, causal `dw_striding`
subsampling, causal depthwise convolution with `layer_norm` conv norm, macaron feed-forwards,
xscaling. The step uses the NeMo module's own weights (read once, rearranged) and computes what
`encoder.cache_aware_stream_step(..., keep_all_outputs=True)` computes, written from the math:

* **Projected K/V cache.** NeMo's attention cache holds each layer's normalised attention input
  for the last 70 frames, so every step re-projects K and V over 70 + T' frames. Here the cache
  holds the projected K and V themselves (`cache_channel [L, B, 70, 2*d_model]`, K then V), so a
  step projects only its T' new frames. Exact up to rounding (a row-wise linear map commutes
  with "keep the last 70 rows"); masked cache positions are never read, so their contents (zeros
  for a fresh slot, where NeMo would hold bias vectors) do not matter.
* **Relative positions folded into the Q projection.** NeMo's Transformer-XL term is
  `(q_i + pos_bias_v) . P[i - j]` with `P = linear_pos(pos_emb)`; for a fixed chunk geometry
  `pos_emb` is a constant, so `P`, and with it the whole term as a linear function of the layer
  input, is precomputed: extra output columns of the fused Q|K|V GEMM give
  `(q_i + v) . P[c] / sqrt(d_k)` for every needed relative distance `c`, and the rel-shift is a
  strided view of that GEMM output (no gather, no copy). `pos_bias_u` is folded into the Q bias.
  Attention is torch's `scaled_dot_product_attention` with that term (plus each row's
  padding/cache-length mask) as an additive float bias.
* **No concatenations.** The step works in two per-step workspaces: `kv_work [L, B, 70+T', 2d]`
  (the cached K/V, then the new frames' K/V written in place) and
  `conv_work [L, B, (K-1)+T', d]` (the conv cache, then the new GLU outputs). The next caches
  are views of their last 70 / K-1 frames. The depthwise convolution is a multiply-add over an
  `unfold` view of `conv_work` in time-major layout (no cuDNN depthwise conv).
* Everything runs in `[B*T', d]` time-major rows: layer norms are plain last-dim norms and every
  projection is one GEMM over all the batch's new frames. The feed-forwards' 0.5 factor and
  xscale are folded into weights.
* **CUDA-graph capturable**: no host syncs, no data-dependent Python control flow, static
  shapes for a given batch size; every per-row decision (lengths, cache fill) is a tensor mask.

Entry points:
* `FastConformerParams.from_encoder(encoder, device, dtype)`: the prepared weights and
  constants for the encoder's current lookahead.
* `fast_step(params, feats, lengths, kv_work, conv_work, cache_len)`: the pure step over
  caller-owned workspaces (what a graph-capture wrapper captures; see `FastStepBuffers`).
* The engines that run it ("fast", "fast-cudagraph") are engines/fast_engines.py. A graph
  wrapper uses `FastStepBuffers` as its static buffers: copy a batch into `inputs(b)`, capture
  `fast_step(params, *step_args(b), bias_buffer=bias_buffer(b))`.

Padded frames (past a row's valid length) are computed exactly as NeMo computes them too:
attention outputs of padded query frames are zero, and padded frames enter the conv as zeros,
so even the (unusable) next caches after a short last chunk equal NeMo's, projected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engines.encoders import PoolRows
from engines.fused_norms import add_layer_norm, conv_norm_silu, glu_into
from engines.subsampling_kernels import masked_conv, reads_one_channel, relu_mask_pad
from engines.row_gather import gather_rows
from engines.step_attention import MASK_VALUE, CacheTable, StepShape, step_attention


class UnsupportedEncoder(ValueError):
    """The encoder uses a feature the fast step does not implement."""


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Geometry:
    n_layers: int
    d_model: int
    n_heads: int
    d_k: int
    d_ff: int
    n_mels: int
    frames_in: int       # mel frames per step (pre-encode cache + chunk)
    pre_encode: int      # of which cached mel frames
    frames_out: int      # T': encoder frames per step, after dropping the pre-encoded ones
    drop: int            # pre-encoded frames dropped
    cache: int           # attention cache frames (70)
    conv_kernel: int     # depthwise kernel (9); the conv cache holds conv_kernel - 1 frames
    rel: int             # relative distances needed (cache + 2*T' - 1)
    rel_pad: int         # rel rounded up to a multiple of 8 (GEMM alignment)
    qkv_cols: int        # columns of the fused Q|K|V|pos GEMM
    keys_pad: int        # cache + T' rounded up to 16 (aligned SDPA bias rows)
    eps: float

    @property
    def keys(self) -> int:
        return self.cache + self.frames_out

    @property
    def conv_cache(self) -> int:
        return self.conv_kernel - 1


@dataclass
class SubsamplingOp:
    kind: str                      # "conv" or "relu"
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    stride: tuple[int, int] = (1, 1)
    groups: int = 1
    pad: tuple[int, int] = (0, 0)  # (left/top, right/bottom), same on time and frequency
    kernel: int = 1


class FastConformerParams:
    """Weights of one ConformerEncoder rearranged for the fast step, at one lookahead.

    Per layer, three tuples of tensors (the arguments of `_part_a`, `_part_b`, `_part_c`)."""

    def __init__(self, geo: Geometry, sub_ops: list[SubsamplingOp], sub_out_w, sub_out_b, layers,
                 chunk_ok, out_proj, att_context_size, device, dtype):
        self.geo = geo
        self.sub_ops = sub_ops
        self.sub_out_w = sub_out_w
        self.sub_out_b = sub_out_b
        self.layers = layers
        self.chunk_ok = chunk_ok          # [T', N] bool: chunked_limited visibility of the step's queries
        self.out_proj = out_proj          # (W, b) or None
        self.att_context_size = list(att_context_size)
        self.device = device
        self.dtype = dtype
        g = geo
        self.key_index = torch.arange(g.keys, device=device)
        # for the attention kernel (engines/step_attention.py): the chunk visibility as bytes, the shape
        self.chunk_ok_i8 = chunk_ok.to(torch.int8).contiguous()
        self.step_shape = StepShape(frames=g.frames_out, cache=g.cache, d_model=g.d_model, n_heads=g.n_heads,
                                    rel_pad=g.rel_pad)
        self.frame_index = torch.arange(g.frames_out, device=device)
        self.time_index = torch.arange(max(g.frames_in, 1), device=device)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_encoder(cls, encoder: torch.nn.Module, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> "FastConformerParams":
        first = next(encoder.parameters())
        device = torch.device(device) if device is not None else first.device
        dtype = dtype or first.dtype
        _check_supported(encoder)
        cfg = encoder.streaming_cfg
        att = list(encoder.att_context_size)
        layer0 = encoder.layers[0]
        d = encoder.d_model
        H = layer0.self_attn.h
        dk = layer0.self_attn.d_k
        chunk = cfg.chunk_size[1] if isinstance(cfg.chunk_size, list) else cfg.chunk_size
        pre = cfg.pre_encode_cache_size[1] if isinstance(cfg.pre_encode_cache_size, list) else cfg.pre_encode_cache_size
        frames_in = chunk + pre
        sub_ops = _subsampling_ops(encoder.pre_encode)
        t = frames_in
        for op in sub_ops:
            if op.kind == "conv":
                t = (t + op.pad[0] + op.pad[1] - op.kernel) // op.stride[0] + 1
        drop = cfg.drop_extra_pre_encoded
        T = t - drop
        if T < 1:
            raise UnsupportedEncoder(f"a step yields {T} encoder frames")
        C = cfg.last_channel_cache_size
        if C < 1:
            raise UnsupportedEncoder("the fast step needs a limited left attention context (a cache)")
        if cfg.cache_drop_size != 0:
            raise UnsupportedEncoder("cache_drop_size != 0 is not supported")
        N = C + T
        R = N + T - 1
        Rp = -(-R // 8) * 8
        K = layer0.conv.kernel_size
        if encoder.conv_context_size[0] != K - 1 or encoder.conv_context_size[1] != 0:
            raise UnsupportedEncoder(f"conv context {encoder.conv_context_size} is not causal")
        d_ff = layer0.feed_forward1.linear1.out_features
        geo = Geometry(
            n_layers=len(encoder.layers), d_model=d, n_heads=H, d_k=dk, d_ff=d_ff, n_mels=encoder._feat_in,
            frames_in=frames_in, pre_encode=pre, frames_out=T, drop=drop, cache=C, conv_kernel=K, rel=R, rel_pad=Rp,
            qkv_cols=3 * d + H * Rp, keys_pad=-(-N // 16) * 16, eps=layer0.norm_out.eps)

        def cast(t_):
            return None if t_ is None else t_.detach().to(device=device, dtype=dtype).contiguous()

        def f32(t_, n=None):
            # Precomputation in float64 (independent of TF32 settings), cast once at the end.
            if t_ is None:
                return torch.zeros(n, dtype=torch.float64, device=device)
            return t_.detach().to(device=device, dtype=torch.float64)

        # Subsampling: weights as they are; xscale folded into the output projection.
        xscale = float(encoder.pos_enc.xscale) if encoder.pos_enc.xscale else 1.0
        sub_ops = [SubsamplingOp(op.kind, cast(op.weight), cast(op.bias), op.stride, op.groups, op.pad, op.kernel)
                   for op in sub_ops]
        out = encoder.pre_encode.out
        sub_out_w = cast(f32(out.weight) * xscale)
        sub_out_b = cast(f32(out.bias, out.out_features) * xscale)

        # Relative positions: row c of P is the encoding of distance (N - 1 - c), c in [0, R).
        pos = torch.arange(N - 1, N - 1 - R, -1, dtype=torch.float64, device=device)
        pe = _sinusoids(pos, d)                                      # [R, d] fp64
        layers = []
        for layer in encoder.layers:
            att_m = layer.self_attn
            ln = lambda m: (cast(m.weight), cast(m.bias))  # noqa: E731
            # A: FF1 + attention input norm + fused Q|K|V|pos projection
            w2 = cast(f32(layer.feed_forward1.linear2.weight) * layer.fc_factor)
            b2 = cast(f32(layer.feed_forward1.linear2.bias, d) * layer.fc_factor)
            wq, bq = f32(att_m.linear_q.weight), f32(att_m.linear_q.bias, d)
            u, v = f32(att_m.pos_bias_u), f32(att_m.pos_bias_v)
            p = (pe @ f32(att_m.linear_pos.weight).T).view(R, H, dk).transpose(0, 1)     # [H, R, dk]
            m_w = torch.einsum("hrk,hkd->hrd", p, wq.view(H, dk, d)) / math.sqrt(dk)   # [H, R, d]
            m_b = torch.einsum("hrk,hk->hr", p, bq.view(H, dk) + v) / math.sqrt(dk)     # [H, R]
            m_w = F.pad(m_w, (0, 0, 0, Rp - R))
            m_b = F.pad(m_b, (0, Rp - R))
            w_qkv = torch.cat([wq, f32(att_m.linear_k.weight), f32(att_m.linear_v.weight), m_w.reshape(H * Rp, d)])
            b_qkv = torch.cat([bq + u.reshape(-1), f32(att_m.linear_k.bias, d), f32(att_m.linear_v.bias, d),
                               m_b.reshape(-1)])
            part_a = (*ln(layer.norm_feed_forward1), cast(layer.feed_forward1.linear1.weight),
                      cast(layer.feed_forward1.linear1.bias), w2, b2, *ln(layer.norm_self_att),
                      cast(w_qkv), cast(b_qkv))
            # B: attention output + conv module up to the GLU
            conv = layer.conv
            part_b = (cast(att_m.linear_out.weight), cast(att_m.linear_out.bias), *ln(layer.norm_conv),
                      cast(conv.pointwise_conv1.weight.squeeze(-1)), cast(conv.pointwise_conv1.bias))
            # C: depthwise conv, conv norm, FF2, output norm
            w4 = cast(f32(layer.feed_forward2.linear2.weight) * layer.fc_factor)
            b4 = cast(f32(layer.feed_forward2.linear2.bias, d) * layer.fc_factor)
            # the depthwise weight [d, K] stored tap-major (strides (1, d)): each tap's d weights
            # contiguous, as the fused kernel reads them beside the d channels of a frame
            w_dw = cast(conv.depthwise_conv.weight.squeeze(1)).t().contiguous().t()
            part_c = (w_dw, cast(f32(conv.depthwise_conv.bias, d)),
                      *ln(conv.batch_norm), cast(conv.pointwise_conv2.weight.squeeze(-1)),
                      cast(conv.pointwise_conv2.bias), *ln(layer.norm_feed_forward2),
                      cast(layer.feed_forward2.linear1.weight), cast(layer.feed_forward2.linear1.bias), w4, b4,
                      *ln(layer.norm_out))
            layers.append((part_a, part_b, part_c))

        # chunked_limited visibility of this step's query frames (positions C..C+T-1 of N).
        chunk_size = att[1] + 1
        left_chunks = att[0] // chunk_size if att[0] >= 0 else 10000
        idx = torch.arange(N, device=device)
        q_chunk = idx[C:, None] // chunk_size
        diff = q_chunk - idx[None, :] // chunk_size
        chunk_ok = (diff >= 0) & (diff <= left_chunks)
        out_proj = None
        if encoder.out_proj is not None:
            out_proj = (cast(encoder.out_proj.weight), cast(encoder.out_proj.bias))
        return cls(geo, sub_ops, sub_out_w, sub_out_b, layers, chunk_ok, out_proj, att, device, dtype)

    # -- facts -------------------------------------------------------------------------------
    @property
    def cache_channel_shape(self) -> tuple[int, int, int]:
        g = self.geo
        return (g.n_layers, g.cache, 2 * g.d_model)

    def _subsampling_flops(self) -> int:
        g = self.geo
        total = 0
        t, f, ch = g.frames_in, g.n_mels, 1
        for op in self.sub_ops:
            if op.kind != "conv":
                continue
            t = (t + op.pad[0] + op.pad[1] - op.kernel) // op.stride[0] + 1
            f = (f + op.pad[0] + op.pad[1] - op.kernel) // op.stride[1] + 1
            out_ch = op.weight.shape[0]
            total += 2 * out_ch * t * f * (ch // op.groups) * op.kernel * op.kernel
            ch = out_ch
        out = 2 * g.frames_out * self.sub_out_w.shape[1] * g.d_model
        if self.out_proj is not None:
            out += 2 * g.frames_out * g.d_model * self.out_proj[0].shape[0]
        return total + out

    def flops_per_stream(self) -> int:
        """FLOPs (2 per multiply-add) of one fast step for one stream, counted analytically."""
        g = self.geo
        d, T = g.d_model, g.frames_out
        per_frame = (2 * (2 * d * g.d_ff)        # FF1 + FF2: d -> d_ff -> d each
                     + d * g.qkv_cols            # fused Q|K|V|pos (new frames only)
                     + d * d                     # attention output
                     + 3 * d * d                 # pointwise convs (d -> 2d, d -> d)
                     + d * g.conv_kernel         # depthwise
                     + 2 * g.keys * d)           # QK^T and PV over 70 + T' keys
        return self._subsampling_flops() + 2 * per_frame * T * g.n_layers

    def nemo_flops(self, batch: int) -> int:
        """The same count for NeMo's module on `batch` streams: K and V re-projected over all
        70 + T' frames, the positional scores over all 2N-1 relative positions, and linear_pos
        over the 2N-1 positions once per step (its input is batch-independent)."""
        g = self.geo
        d, T, N = g.d_model, g.frames_out, g.keys
        per_layer = (T * (2 * (2 * d * g.d_ff) + d * d + d * d + 3 * d * d + d * g.conv_kernel)  # FFs, q, out, convs
                     + N * 2 * d * d                   # K and V over all frames
                     + T * (2 * N - 1) * d             # matrix_bd
                     + 2 * T * N * d)                  # QK^T and PV
        per_stream = self._subsampling_flops() + 2 * per_layer * g.n_layers
        return batch * per_stream + 2 * (2 * N - 1) * d * d * g.n_layers


def _sinusoids(pos: torch.Tensor, d: int) -> torch.Tensor:
    """Transformer-XL sinusoidal encodings of (possibly negative) positions: [len(pos), d] fp64."""
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float64, device=pos.device) * -(math.log(10000.0) / d))
    pe = torch.zeros(len(pos), d, dtype=torch.float64, device=pos.device)
    pe[:, 0::2] = torch.sin(pos[:, None] * div)
    pe[:, 1::2] = torch.cos(pos[:, None] * div)
    return pe


def _check_supported(encoder) -> None:
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise UnsupportedEncoder(f"the fast step does not support {what}")

    need(getattr(encoder, "self_attention_model", None) == "rel_pos", "attention other than rel_pos")
    need(getattr(encoder, "att_context_style", None) == "chunked_limited", "context styles other than chunked_limited")
    need(encoder.att_context_size[1] >= 0, "unlimited right context")
    need(encoder.att_context_size[0] < 0 or encoder.att_context_size[0] % (encoder.att_context_size[1] + 1) == 0,
         "left context that is not a whole number of chunks")
    need(getattr(encoder, "reduction_position", None) is None, "time reduction inside the encoder")
    need(not isinstance(encoder.pre_encode, torch.nn.Linear), "a linear pre-encoder")
    need(getattr(encoder.pre_encode, "conv2d_subsampling", False), "1-D conv subsampling")
    need(getattr(encoder.pre_encode, "subsampling_conv_chunking_factor", 1) != -1,
         "subsampling_conv_chunking_factor=-1")
    need(not encoder.training, "training mode (dropout)")
    for layer in encoder.layers:
        need(layer.self_attention_model == "rel_pos", "attention other than rel_pos")
        need(layer.conv.norm_type == "layer_norm", f"conv norm {layer.conv.norm_type!r}")
        need(layer.conv.pointwise_activation == "glu_", "conv activations other than GLU")
        need(layer.conv.depthwise_conv.stride[0] == 1 and layer.conv.depthwise_conv.dilation[0] == 1,
             "strided or dilated depthwise conv")
        if hasattr(layer, "is_adapter_available"):
            need(not layer.is_adapter_available(), "adapters")
        for ff in (layer.feed_forward1, layer.feed_forward2):
            need(type(ff.activation).__name__ == "Swish", "feed-forward activations other than Swish")


def _subsampling_ops(pre_encode) -> list[SubsamplingOp]:
    ops = []
    for m in pre_encode.conv:
        if isinstance(m, torch.nn.Conv2d):
            if m.kernel_size[0] != m.kernel_size[1] or m.dilation != (1, 1):
                raise UnsupportedEncoder("non-square or dilated subsampling convs")
            if hasattr(m, "_left_padding"):           # NeMo's CausalConv2D
                pad = (m._left_padding, m._right_padding)
            else:
                if m.padding[0] != m.padding[1]:
                    raise UnsupportedEncoder("asymmetric subsampling conv padding")
                pad = (m.padding[0], m.padding[0])
            ops.append(SubsamplingOp("conv", m.weight, m.bias, tuple(m.stride), m.groups, pad, m.kernel_size[0]))
        elif isinstance(m, torch.nn.ReLU):
            ops.append(SubsamplingOp("relu"))
        else:
            raise UnsupportedEncoder(f"subsampling layer {type(m).__name__}")
    return ops


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------

def _subsample(p: FastConformerParams, feats: torch.Tensor, lengths: torch.Tensor, fused: bool = False,
               masked_convs: bool = True):
    """NeMo's ConvSubsampling with its per-row time masking (a position past a row's length is
    zero before every layer), then the dropped pre-encoded frames are skipped and the output
    projection (with xscale) runs on the kept frames only. Returns rows [B*T', d], lengths.

    `fused` (the Triton kernels, engines/subsampling_kernels.py): the same values, in fewer
    passes over the largest tensors. A strided conv that reads one input channel per output
    channel (the first conv, the depthwise ones) is `masked_conv`: it reads its input with the
    ReLU before it, the mask and the zero padding applied on load, so no padded copy is written.
    Any other strided conv's input is made by `relu_mask_pad` in one pass, where PyTorch's ops run
    the ReLU, zero a padded tensor and multiply into it. A pointwise conv's input is not masked:
    the conv maps each frame to itself, so what it writes at a masked frame stays there, and the
    next strided conv's mask or the last mask zeroes it before anything mixes frames. Equal to
    the PyTorch path up to the order of each conv's float32 sum (masked_conv's).
    `masked_convs=False` (with `fused`): every strided conv by `relu_mask_pad` and cuDNN, equal
    to the PyTorch path bit for bit (the benchmarks' A/B of masked_conv)."""
    g = p.geo
    x = feats.transpose(1, 2).unsqueeze(1)                   # [B, 1, T, F]
    lens = lengths.to(torch.int64)
    B = x.shape[0]
    own = False  # x is an intermediate of ours (safe to modify in place)
    ops = p.sub_ops
    relu_ahead = False  # fused: a ReLU the next strided conv applies as it reads its input
    for i, op in enumerate(ops):
        t_len = x.shape[2]
        if op.kind == "relu":
            if fused and i + 1 < len(ops) and ops[i + 1].kind == "conv" and not _pointwise(ops[i + 1]):
                relu_ahead = True
                continue
            # relu(mask * x) == mask * relu(x): the mask state carries over.
            x = torch.relu_(x) if own else torch.relu(x)
            own = True
            continue
        lp, rp = op.pad
        if fused and _pointwise(op):
            x = F.conv2d(x, op.weight, op.bias, op.stride, 0, 1, op.groups)
            own = True
            continue
        if (fused and masked_convs and op.stride[0] == op.stride[1]
                and reads_one_channel(op.weight, op.groups, x.shape[1])):
            x = masked_conv(x, lens, (lp, rp), relu_ahead, op.weight, op.bias, op.stride[0])
            relu_ahead = False
        elif fused:
            x = F.conv2d(relu_mask_pad(x, lens, (lp, rp), relu_ahead), op.weight, op.bias, op.stride, 0, 1, op.groups)
            relu_ahead = False
        else:
            # NeMo masks before every layer; before a ReLU it is the mask the next conv applies again.
            mask = _time_mask(p, lens, t_len, x.dtype)
            if lp or rp:
                buf = x.new_zeros(B, x.shape[1], t_len + lp + rp, x.shape[3] + lp + rp)
                inner = buf[:, :, lp:lp + t_len, lp:lp + x.shape[3]]
                torch.mul(x, mask, out=inner)
                x = buf
            else:
                x = x * mask
            x = F.conv2d(x, op.weight, op.bias, op.stride, 0, 1, op.groups)
        own = True
        if op.stride[0] != 1:
            lens = (lens + lp + rp - op.kernel) // op.stride[0] + 1
    if relu_ahead:  # not reached: a ReLU is held only when a strided conv follows it
        raise AssertionError("a held ReLU was not applied")
    x = x * _time_mask(p, lens, x.shape[2], x.dtype)
    x = x[:, :, g.drop:]                                     # [B, C, T', F']
    x = x.permute(0, 2, 1, 3).reshape(B * g.frames_out, -1)
    x = F.linear(x, p.sub_out_w, p.sub_out_b)
    enc_len = (lens - g.drop).clamp(min=0)
    return x, enc_len


def _time_mask(p: FastConformerParams, lens: torch.Tensor, frames: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, frames, 1]: 1 where a frame is inside its row's length, else 0 (NeMo's masking)."""
    return (p.time_index[:frames] < lens[:, None]).to(dtype).view(lens.shape[0], 1, frames, 1)


def _pointwise(op: SubsamplingOp) -> bool:
    """A 1x1 conv of stride 1 without padding: each frame's output reads that frame alone."""
    return op.kind == "conv" and op.kernel == 1 and op.stride == (1, 1) and op.pad == (0, 0)


def _part_a(x, geo: Geometry, ln1_w, ln1_b, w1, b1, w2, b2, lna_w, lna_b, w_qkv, b_qkv):
    """FF1 (half-step residual) and the fused Q|K|V|pos projection of the normalised input."""
    d = geo.d_model
    h = F.layer_norm(x, (d,), ln1_w, ln1_b, geo.eps)
    h = F.silu(F.linear(h, w1, b1))
    x = x + F.linear(h, w2, b2)
    a = F.layer_norm(x, (d,), lna_w, lna_b, geo.eps)
    return x, F.linear(a, w_qkv, b_qkv)


def _attention_bias(qkv, mask_bias, geo: Geometry, out=None):
    """The additive SDPA bias: the relative-position term (a strided view of the fused GEMM's
    positional columns: query i, key j reads column T'-1-i+j) plus the row's mask."""
    T, N, H = geo.frames_out, geo.keys, geo.n_heads
    B = qkv.shape[0] // T
    C = geo.qkv_cols
    bd = qkv.as_strided((B, H, T, N), (T * C, geo.rel_pad, C - 1, 1),
                        qkv.storage_offset() + 3 * geo.d_model + T - 1)
    if out is None:
        return bd + mask_bias
    return torch.add(bd, mask_bias, out=out)


def _attend_sdpa(qkv, kv, bias, geo: Geometry):
    """Attention over [cached K/V; new K/V] (`kv [B, 70 + T', 2d]`, the workspace) with the
    bias, by PyTorch's SDPA: [B*T', d]."""
    d, T, H, dk, N = geo.d_model, geo.frames_out, geo.n_heads, geo.d_k, geo.keys
    B = qkv.shape[0] // T
    q = qkv[:, :d].view(B, T, H, dk).transpose(1, 2)
    k = kv[:, :, :d].view(B, N, H, dk).transpose(1, 2)
    v = kv[:, :, d:].view(B, N, H, dk).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return o.transpose(1, 2).reshape(B * T, d)


def _attend_kernel(p: "FastConformerParams", qkv, kv, cache: "KernelCache", layer: int, heads, cache_len, enc_len):
    """The same attention by engines/step_attention.py's kernel, which makes the bias itself
    (positional term, masks, the ring's order) and zeroes padded query frames: the cached K/V
    read where `cache.table` says they lie (the slot pool, or the workspace), the new frames'
    from the workspace: [B*T', d]."""
    g = p.geo
    B = qkv.shape[0] // g.frames_out
    return step_attention(qkv, kv[:, kv.shape[1] - g.frames_out:], cache.table, layer, cache.slots[:B], heads,
                          cache_len, enc_len,
                          p.chunk_ok_i8, p.step_shape)


@dataclass
class KernelCache:
    """Where the attention kernel reads each row's cached K/V: the table (a layer's base address
    and the slot stride) and each row's slot in it."""

    table: CacheTable
    slots: torch.Tensor  # int64 [max rows]


def _part_b(x, o, valid, geo: Geometry, w_o, b_o, lnc_w, lnc_b, w_p1, b_p1):
    """The attention's output projection (padded query frames contribute zero, as in NeMo; valid
    None: the attention zeroed them already); the conv module's first pointwise conv (GLU input)."""
    d = geo.d_model
    if valid is not None:
        o = o * valid
    x = x + F.linear(o, w_o, b_o)
    c = F.layer_norm(x, (d,), lnc_w, lnc_b, geo.eps)
    return x, F.linear(c, w_p1, b_p1)


def _part_c(x, conv, geo: Geometry, w_dw, b_dw, lnn_w, lnn_b, w_p2, b_p2, ln2_w, ln2_b, w3, b3, w4, b4,
            lno_w, lno_b):
    """Causal depthwise conv over [conv cache; GLU outputs], conv norm, Swish, pointwise conv,
    FF2 (half-step residual), output norm."""
    d = geo.d_model
    y = (conv.unfold(1, geo.conv_kernel, 1) * w_dw).sum(-1) + b_dw      # [B, T', d]
    y = F.silu(F.layer_norm(y, (d,), lnn_w, lnn_b, geo.eps)).view(-1, d)
    x = x + F.linear(y, w_p2, b_p2)
    h = F.layer_norm(x, (d,), ln2_w, ln2_b, geo.eps)
    h = F.silu(F.linear(h, w3, b3))
    x = x + F.linear(h, w4, b4)
    return F.layer_norm(x, (d,), lno_w, lno_b, geo.eps)


def _part_a_fused(x, geo: Geometry, ln1_w, ln1_b, w1, b1, w2, b2, lna_w, lna_b, w_qkv, b_qkv):
    """_part_a with the residual add and the attention's norm in one kernel (engines/fused_norms.py)."""
    d = geo.d_model
    h = F.layer_norm(x, (d,), ln1_w, ln1_b, geo.eps)
    h = F.silu(F.linear(h, w1, b1))
    x, a = add_layer_norm(x, F.linear(h, w2, b2), lna_w, lna_b, geo.eps)
    return x, F.linear(a, w_qkv, b_qkv)


def _part_b_fused(x, o, valid, geo: Geometry, w_o, b_o, lnc_w, lnc_b, w_p1, b_p1):
    """_part_b with the residual add and the conv module's norm in one kernel."""
    x, c = add_layer_norm(x, F.linear(o if valid is None else o * valid, w_o, b_o), lnc_w, lnc_b, geo.eps)
    return x, F.linear(c, w_p1, b_p1)


def _part_c_fused(x, conv, geo: Geometry, w_dw, b_dw, lnn_w, lnn_b, w_p2, b_p2, ln2_w, ln2_b, w3, b3, w4, b4,
                  lno_w, lno_b):
    """_part_c with the depthwise conv, its bias, norm and Swish in one kernel, and each residual
    add with the norm after it in one."""
    y = conv_norm_silu(conv, w_dw, b_dw, lnn_w, lnn_b, geo.eps)
    x, h = add_layer_norm(x, F.linear(y, w_p2, b_p2), ln2_w, ln2_b, geo.eps)
    h = F.silu(F.linear(h, w3, b3))
    return add_layer_norm(x, F.linear(h, w4, b4), lno_w, lno_b, geo.eps, keep_sum=False)[1]  # the sum: not read


class StepParts:
    """The three per-layer pieces of the step: eager, torch.compiled, or with their element-wise
    chains fused into Triton kernels (engines/fused_norms.py). Writes into the workspaces (the
    new K/V frames, the GLU outputs) stay outside them, so a compiled piece never mutates one
    of its inputs."""

    def __init__(self, compile: bool = False, compile_mode: str | None = None, dynamic: bool | None = None,
                 fused: bool = False, masked_convs: bool = True):
        # dynamic=None: dynamo's automatic dynamic shapes (a second batch size recompiles once
        # with a symbolic batch, later ones reuse it); dynamic=False: one compilation per batch.
        if compile and fused:
            raise ValueError("torch.compile and the fused kernels are two ways to fuse the same chains: choose one")
        self.compiled = compile
        self.fused = fused
        # fused: the subsampling's one-channel convs by engines/subsampling_kernels.masked_conv
        # (False: its padded copy and cuDNN's conv, the benchmarks' A/B)
        self.masked_convs = fused and masked_convs
        if fused:
            self.a, self.b, self.c = _part_a_fused, _part_b_fused, _part_c_fused
        elif compile:
            self.a = torch.compile(_part_a, mode=compile_mode, dynamic=dynamic)
            self.b = torch.compile(_part_b, mode=compile_mode, dynamic=dynamic)
            self.c = torch.compile(_part_c, mode=compile_mode, dynamic=dynamic)
        else:
            self.a, self.b, self.c = _part_a, _part_b, _part_c


_EAGER_PARTS = StepParts()


def step_masks(p: FastConformerParams, enc_len: torch.Tensor, cache_len: torch.Tensor, bias: bool = True):
    """Per-row masks of one step: `mask_bias [B, 1, T', N]` (0 where query frame t may attend
    key j: cached frames the row really has, new frames within its length, chunk visibility;
    MASK_VALUE elsewhere; None with bias=False, for the attention kernel, which masks itself)
    and `valid [B*T', 1]` (1 for the row's real new frames)."""
    g = p.geo
    valid = (p.frame_index[None, :] < enc_len[:, None]).to(p.dtype).reshape(-1, 1)
    if not bias:
        return None, valid
    j = p.key_index
    key_ok = (j[None, :] >= (g.cache - cache_len)[:, None]) & (j[None, :] < (g.cache + enc_len)[:, None])
    ok = key_ok[:, None, None, :] & p.chunk_ok[None, None]
    mask_bias = torch.where(ok, 0.0, MASK_VALUE).to(p.dtype)
    return mask_bias, valid


def ring_key_order(p: FastConformerParams, cache_head: torch.Tensor) -> torch.Tensor:
    """[B, N] int64: the time index of the key at each position of a row whose first 70
    positions hold its attention cache as the slot pool's ring (position q holds the frame of
    time (q - head) mod 70, the oldest at the head); the new frames follow in order."""
    C = p.geo.cache
    j = p.key_index[None, :]
    return torch.where(j < C, (j - cache_head[:, None]) % C, j)


def fast_step(p: FastConformerParams, feats: torch.Tensor, lengths: torch.Tensor, kv_work: torch.Tensor,
              conv_work: torch.Tensor, cache_len: torch.Tensor, parts: StepParts | None = None,
              bias_buffer: torch.Tensor | None = None, cache_head: torch.Tensor | None = None,
              kernel_cache: KernelCache | None = None):
    """One streaming encoder step over caller-owned workspaces.

    Inputs: `feats [B, n_mels, frames_in]` (model dtype), `lengths [B]` valid mel frames,
    `kv_work [L, B, 70 + T', 2d]` whose first 70 frames hold the projected K|V cache,
    `conv_work [L, B, K-1 + T', d]` whose first K-1 frames hold the conv cache (time-major:
    NeMo's `cache_last_time[l, b].T`), `cache_len [B]` int64.
    The step writes the new frames' K|V and GLU outputs into the workspaces' last T' frames.

    Returns NeMo's `(encoded [B, d, T'], encoded_len [B], cache_channel_next [L, B, 70, 2d],
    cache_time_next [L, B, d, K-1], cache_len_next [B])`; the caches are views of the
    workspaces (valid until they are written again).
    `bias_buffer`, optional `[B, H, T', keys_pad]`, receives each layer's attention bias
    (16-aligned rows, so SDPA's memory-efficient kernel takes it without padding it).
    `cache_head`, optional `[B]` int64: the cache frames in `kv_work` are in the slot pool's
    ring order, the oldest at that position (the pool's rows copied as stored, with no
    rotation: one copy fewer). Attention does not care where a key sits once its bias follows
    it, so each layer's bias, computed in time order, is permuted to the ring's order. The
    returned `cc_next` is then time-ordered only in its last T' frames (the new ones, all a
    ring's commit writes) and for rows whose cache was empty.
    `kernel_cache`, optional: attention by engines/step_attention.py's kernel, which reads the
    cached K/V where its table says (the slot pool itself, in its ring order with `cache_head`:
    then `kv_work`'s first 70 frames are neither read nor written, and `cc_next` holds the new
    frames only in its last T'), instead of SDPA over `kv_work`. With the kernel, `kv_work` may
    be `[L, B, T', 2d]`, the new frames only (FastStepBuffers without a workspace for the cache:
    for the 0.6B model 3.6 GB less at 512 rows); `cc_next` is then those T' frames."""
    g = p.geo
    parts = parts or _EAGER_PARTS
    T, C, K1 = g.frames_out, g.cache, g.conv_cache
    x, enc_len = _subsample(p, feats, lengths, fused=parts.fused, masked_convs=parts.masked_convs)
    B = feats.shape[0]
    # where the new frames' K|V go: after the cache's 70, or first in a workspace without room for
    # the cache (the kernel reads it in the pool; only a ring's T' new frames are committed)
    new_at = kv_work.shape[2] - T
    if new_at not in (0, C) or (new_at == 0 and kernel_cache is None):
        raise ValueError(f"kv_work holds {kv_work.shape[2]} frames a row: {C + T} (cache and new frames), or {T} "
                         f"(new frames only, with the attention kernel reading the cache where it lies)")
    mask_bias, valid = step_masks(p, enc_len, cache_len, bias=kernel_cache is None)
    valid3 = valid.view(B, T, 1)
    bias_out = None if bias_buffer is None else bias_buffer[..., :g.keys]
    order = heads = None
    if kernel_cache is not None:  # the kernel makes its own bias, in the ring's order
        heads = cache_head if cache_head is not None else torch.zeros_like(cache_len)
    elif cache_head is not None:
        order = ring_key_order(p, cache_head)[:, None, None, :].expand(B, g.n_heads, T, g.keys)
    # With the kernel and a workspace of new frames only, each layer's new K|V rows go into it as
    # a block copy (engines/row_gather.py, the identity as index): PyTorch's copy of the GEMM's
    # strided column block takes its generic element-wise path (run 45's profile: about 27
    # launches, 0.7-1.0 ms a step, as a layer's copy each would be).
    kv_rows = torch.arange(B * T, device=x.device) if kernel_cache is not None and new_at == 0 else None
    for l, (wa, wb, wc) in enumerate(p.layers):
        x, qkv = parts.a(x, g, *wa)
        kv = kv_work[l]
        new_kv = qkv[:, g.d_model:3 * g.d_model]
        if (kv_rows is None or not kv.is_contiguous()
                or not gather_rows(new_kv.unsqueeze(0), kv_rows, kv.view(1, B * T, 2 * g.d_model))):
            kv[:, new_at:].copy_(new_kv.view(B, T, 2 * g.d_model))
        if kernel_cache is not None:
            o = _attend_kernel(p, qkv, kv, kernel_cache, l, heads, cache_len, enc_len)
            x, pre_glu = parts.b(x, o, None, g, *wb)
        else:
            if order is None:
                bias = _attention_bias(qkv, mask_bias, g, out=bias_out)
            else:
                bias = torch.gather(_attention_bias(qkv, mask_bias, g), 3, order, out=bias_out)
            o = _attend_sdpa(qkv, kv, bias, g)
            x, pre_glu = parts.b(x, o, valid, g, *wb)
        conv = conv_work[l]
        # GLU straight into the conv workspace; padded frames enter the conv as zeros (NeMo).
        new = conv[:, K1:]
        if parts.fused:
            glu_into(pre_glu, enc_len, new)
        else:
            torch._C._nn.glu(pre_glu.view(B, T, 2 * g.d_model), -1, out=new)
            new.mul_(valid3)
        x = parts.c(x, conv, g, *wc)
    if p.out_proj is not None:
        x = F.linear(x, *p.out_proj)
    encoded = x.view(B, T, -1).transpose(1, 2)
    cc_next = kv_work[:, :, T:] if new_at else kv_work  # the window's last 70 frames, or the new T' alone
    ct_next = conv_work[:, :, T:].transpose(2, 3)
    ccl_next = (cache_len + T).clamp(max=C)
    return encoded, enc_len, cc_next, ct_next, ccl_next


class FastStepBuffers:
    """Static buffers for `fast_step` at up to `max_batch` rows, as a graph-capture wrapper
    needs them. `inputs(b)` are views in the engine interface's layout to copy a batch into
    (feats, lengths, cache_channel [L,b,70,2d], cache_time [L,b,d,K-1], cache_len);
    `step_args(b)` are the matching arguments of `fast_step` (the cache views alias the
    workspaces, so copying into `inputs(b)` is the only copy a step needs)."""

    def __init__(self, p: FastConformerParams, max_batch: int, device=None, cache_in_workspace: bool = True):
        g = p.geo
        device = device or p.device
        self.max_batch = max_batch
        self.feats = torch.zeros(max_batch, g.n_mels, g.frames_in, dtype=p.dtype, device=device)
        self.lengths = torch.full((max_batch,), g.frames_in, dtype=torch.int64, device=device)
        # cache_in_workspace False: the attention kernel reads every row's cache in the slot pool,
        # so the workspace keeps the new frames only (the cache part would be 7 MB a row unused)
        self.cache_in_workspace = cache_in_workspace
        frames = g.keys if cache_in_workspace else g.frames_out
        self.kv_work = torch.zeros(g.n_layers, max_batch, frames, 2 * g.d_model, dtype=p.dtype, device=device)
        # what the kernel reads while warming up and capturing, without a workspace for the cache:
        # one empty slot (the rows' empty caches mask it); a step then names the pool
        self.scratch_cache = None if cache_in_workspace else torch.zeros(g.n_layers, 1, g.cache, 2 * g.d_model,
                                                                        dtype=p.dtype, device=device)
        self.conv_work = torch.zeros(g.n_layers, max_batch, g.conv_cache + g.frames_out, g.d_model, dtype=p.dtype,
                                     device=device)
        self.cache_len = torch.zeros(max_batch, dtype=torch.int64, device=device)
        # each row's ring head when its cache frames come in the slot pool's ring order (0: time order)
        self.cache_head = torch.zeros(max_batch, dtype=torch.int64, device=device)
        # for the attention kernel (engines/step_attention.py): where the cached K/V lie (the
        # workspace itself, whose row r is "slot" r, or a slot pool) and each row's slot there
        self.kernel_cache = KernelCache(CacheTable.empty(g.n_layers, device),
                                        torch.arange(max_batch, dtype=torch.int64, device=device))
        self.workspace_slots = torch.arange(max_batch, dtype=torch.int64, device=device)
        self.bias = torch.zeros(max_batch, g.n_heads, g.frames_out, g.keys_pad, dtype=p.dtype, device=device)
        self.geo = g

    def inputs(self, b: int):
        """(feats, lengths, cache_channel or None without a workspace for it, cache_time, cache_len)"""
        g = self.geo
        return (self.feats[:b], self.lengths[:b], self.kv_work[:, :b, :g.cache] if self.cache_in_workspace else None,
                self.conv_work[:, :b, :g.conv_cache].transpose(2, 3), self.cache_len[:b])

    def step_args(self, b: int):
        return (self.feats[:b], self.lengths[:b], self.kv_work[:, :b], self.conv_work[:, :b], self.cache_len[:b])

    def cache_channel(self, n: int) -> torch.Tensor:
        """The first n rows' attention-cache frames [L, n, 70, 2d]: a caller may gather its rows
        straight into them (engines/slot_pool.py `gather(into=...)`), saving the copy in."""
        if not self.cache_in_workspace:
            raise ValueError("this workspace has no room for the attention cache: the kernel reads it in the pool")
        return self.kv_work[:, :n, :self.geo.cache]

    def bias_buffer(self, b: int):
        return self.bias[:b]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.feats, self.lengths, self.kv_work, self.conv_work, self.cache_len, self.cache_head, self.bias,
                    self.kernel_cache.table.table, self.kernel_cache.slots, self.workspace_slots)
                   + (() if self.cache_in_workspace else (self.scratch_cache,)))

    def read_cache_from_workspace(self, b: int) -> None:
        """The kernel's rows 0..b-1 read their cache from the workspace (what a gather filled);
        without a workspace for the cache, from the scratch slot (warm-up and capture)."""
        if not self.cache_in_workspace:
            self.kernel_cache.table.point_at(self.scratch_cache)
            self.kernel_cache.slots[:b].zero_()
            return
        self.kernel_cache.table.point_at(self.kv_work)
        self.kernel_cache.slots[:b].copy_(self.workspace_slots[:b])

    def read_cache_from_pool(self, rows: PoolRows, b: int) -> None:
        """The kernel's rows read their cache from the slot pool: the batch's slots, then padding
        rows (up to the bucket b) on slot 0, whose frames their empty cache masks."""
        n = rows.slots.numel()
        self.kernel_cache.table.point_at(rows.pool)
        self.kernel_cache.slots[:n].copy_(rows.slots)
        self.kernel_cache.slots[n:b].zero_()
