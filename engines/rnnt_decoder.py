"""Batched greedy RNNT decoding, each stream carrying its own prediction-network state.

Per-stream decoder state lives in the slot pool: the prediction network's output for the last
emitted label and its LSTM state after it. A step decodes only the step's new encoder frames,
so the cost per step does not grow with the stream's length, and no history is re-decoded.

The loop is the label-looping form of greedy search over the whole batch at once: every
iteration runs the joint for each row's current frame; rows that emit a label advance their
prediction network, rows that emit blank (or reach `max_symbols` labels on one frame) move to
the next frame. It yields the same labels as NeMo's greedy_batch decoding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeOutput:
    """The new labels as columns: every row's labels in emission order, the rows one after
    another (`label_counts` per row), so no list is made per row."""

    label_ids: np.ndarray     # [labels] int64
    label_frames: np.ndarray  # [labels] int64, the chunk-relative encoder frame of each label
    label_counts: np.ndarray  # [B] int64, labels per row
    state: dict[str, torch.Tensor]  # new per-row decoder state (pred_out, h, c)
    # [B, T] on the device, for endpointing: each frame's non-blank probability at its first
    # joint evaluation, and (models with an end-of-utterance token) whether it emitted that token.
    nonblank: torch.Tensor | None = None
    eou: torch.Tensor | None = None


class GreedyRNNTDecoder:
    def __init__(self, decoder, joint, blank_id: int, max_symbols: int = 10, eou_id: int | None = None):
        self.decoder = decoder
        self.joint = joint
        self.blank_id = blank_id
        self.eou_id = eou_id
        self.max_symbols = max_symbols
        self.pred_hidden = decoder.pred_hidden
        self.pred_layers = decoder.pred_rnn_layers
        self.sync_every = 4
        # On CUDA the loop's block of iterations runs as one captured graph per batch bucket:
        # the loop is dozens of small kernels per iteration, bound by launch overhead.
        self.use_graphs = True
        self._graphs: dict = {}
        # The blocks a T-frame decode needs at least are queued before the first termination
        # test (decode_projected); False tests after every block (A/B, tests).
        self.queue_min_blocks = True
        # Blocks run and termination tests made (each a device-to-host wait), since built.
        self.blocks_run = 0
        self.termination_tests = 0

    def state_shapes(self) -> dict[str, tuple[tuple[int, ...], int]]:
        """name -> (shape without slot dim, slot dim) for the slot pool."""
        return {
            "dec_out": ((self.pred_hidden,), 0),
            "dec_h": ((self.pred_layers, self.pred_hidden), 1),
            "dec_c": ((self.pred_layers, self.pred_hidden), 1),
        }

    def _predict(self, labels: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        g, (h2, c2) = self.decoder.predict(labels[:, None], (h, c), add_sos=False, batch_size=labels.shape[0])
        return g[:, 0, :], h2, c2

    @torch.inference_mode()
    def start_state(self, fresh: torch.Tensor, any_fresh: bool,
                    state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """For rows starting a stream, the state after the start-of-sequence (blank) label."""
        if not any_fresh:
            return state
        B = fresh.shape[0]
        blank = torch.full((B,), self.blank_id, dtype=torch.long, device=fresh.device)
        zeros = torch.zeros_like(state["dec_h"])
        g0, h0, c0 = self._predict(blank, zeros, zeros.clone())
        m = fresh[:, None]
        return {
            "dec_out": torch.where(m, g0.to(state["dec_out"].dtype), state["dec_out"]),
            "dec_h": torch.where(m[None], h0.to(state["dec_h"].dtype), state["dec_h"]),
            "dec_c": torch.where(m[None], c0.to(state["dec_c"].dtype), state["dec_c"]),
        }

    # -- the loop ---------------------------------------------------------------------------
    def _new_loop(self, B: int, T: int, H: int, like: torch.Tensor, state: dict[str, torch.Tensor]) -> "_Loop":
        dev = like.device
        return _Loop(
            f=torch.zeros(B, T, H, device=dev, dtype=like.dtype),
            lengths=torch.zeros(B, dtype=torch.long, device=dev),
            g=torch.zeros_like(state["dec_out"][:1]).expand(B, -1).contiguous(),
            h=torch.zeros(state["dec_h"].shape[0], B, state["dec_h"].shape[2], device=dev, dtype=state["dec_h"].dtype),
            c=torch.zeros(state["dec_c"].shape[0], B, state["dec_c"].shape[2], device=dev, dtype=state["dec_c"].dtype),
            t=torch.zeros(B, dtype=torch.long, device=dev),
            symbols=torch.zeros(B, dtype=torch.long, device=dev),
            active=torch.zeros(B, dtype=torch.bool, device=dev),
            out_k=torch.zeros(self.sync_every, B, dtype=torch.long, device=dev),
            out_t=torch.zeros(self.sync_every, B, dtype=torch.long, device=dev),
            out_m=torch.zeros(self.sync_every, B, dtype=torch.bool, device=dev),
            rows=torch.arange(B, device=dev),
            blank=torch.full((B,), self.blank_id, dtype=torch.long, device=dev),
            nonblank=torch.zeros(B, T, dtype=torch.float32, device=dev),
            eou=torch.zeros(B, T, dtype=torch.bool, device=dev))

    def _block(self, L: "_Loop") -> None:
        """`sync_every` iterations, in place on L (so a CUDA graph can replay them). Rows that
        emit a label advance their prediction network; rows that emit blank, or reach
        max_symbols labels on one frame, move to the next frame."""
        T = L.f.shape[1]
        for i in range(self.sync_every):
            ft = L.f[L.rows, L.t.clamp(max=T - 1)]  # [B, H]
            logits = self.joint.joint_after_projection(ft[:, None, :], self.joint.project_prednet(L.g)[:, None, :])
            scores = logits[:, 0, 0, :]
            k = scores.argmax(dim=-1)
            emit = L.active & (k != self.blank_id)
            # Endpointing's signal: at a frame's first visit (no label emitted on it yet), the
            # probability that it holds anything but blank.
            tc = L.t.clamp(max=T - 1)
            first_visit = L.active & (L.symbols == 0)
            scores32 = scores.float()
            p_nonblank = 1.0 - torch.exp(scores32[:, self.blank_id] - torch.logsumexp(scores32, dim=-1))
            L.nonblank[L.rows, tc] = torch.where(first_visit, p_nonblank, L.nonblank[L.rows, tc])
            if self.eou_id is not None:
                L.eou[L.rows, tc] = L.eou[L.rows, tc] | (emit & (k == self.eou_id))
            L.out_k[i].copy_(k)
            L.out_t[i].copy_(L.t)
            L.out_m[i].copy_(emit)
            g2, h2, c2 = self._predict(torch.where(emit, k, L.blank), L.h, L.c)
            m = emit[:, None]
            L.g.copy_(torch.where(m, g2.to(L.g.dtype), L.g))
            L.h.copy_(torch.where(m[None], h2.to(L.h.dtype), L.h))
            L.c.copy_(torch.where(m[None], c2.to(L.c.dtype), L.c))
            symbols = L.symbols + emit.long()
            advance = L.active & (~emit | (symbols >= self.max_symbols))
            L.t.add_(advance.long())
            L.symbols.copy_(torch.where(advance, torch.zeros_like(symbols), symbols))
            L.active.copy_(L.t < L.lengths)

    def _graphed_loop(self, B: int, T: int, H: int, like: torch.Tensor, state) -> tuple["_Loop", object]:
        """The loop state of the smallest captured bucket that fits B rows, and its graph;
        captured on first use (the engine's warm-up step captures the buckets it meets)."""
        bucket = 1
        while bucket < B:
            bucket *= 2
        key = (bucket, T, H, like.dtype)
        if key not in self._graphs:
            loop = self._new_loop(bucket, T, H, like, state)
            side = torch.cuda.Stream(device=like.device)
            side.wait_stream(torch.cuda.current_stream(like.device))
            with torch.cuda.stream(side):
                self._block(loop)  # warm-up outside the capture
            torch.cuda.current_stream(like.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._block(loop)
            self._graphs[key] = (loop, graph)
        return self._graphs[key]

    @torch.inference_mode()
    def project(self, encoded: torch.Tensor) -> torch.Tensor:
        """The joint's projection of the encoder frames, [B, D, T] (NeMo's encoder layout) ->
        [B, T, H]: a tensor of its own, so the decode (`decode_projected`) no longer reads
        `encoded` (a graph encoder's static buffer, which the next step may overwrite once it is
        queued)."""
        return self.joint.project_encoder(encoded.transpose(1, 2))

    @torch.inference_mode()
    def decode_projected(self, f: torch.Tensor, lengths: torch.Tensor, state: dict[str, torch.Tensor]) -> DecodeOutput:
        """f [B, T, H] from `project`, lengths [B]; state rows in batch order."""
        B, T, H = f.shape
        graph = None
        if self.use_graphs and f.is_cuda:
            try:
                L, graph = self._graphed_loop(B, T, H, f, state)
            except Exception as exc:  # capture is an optimisation of this loop, not an engine
                log.warning("RNNT decode loop cannot be captured in a CUDA graph (%s); it runs eagerly", exc)
                self.use_graphs = False
                graph = None
        if graph is None:
            L = self._new_loop(B, T, H, f, state)
        # Load the batch; rows past B (graph padding) have length 0 and stay inactive.
        L.f[:B].copy_(f)
        L.f[B:].zero_()
        L.lengths[:B].copy_(lengths)
        L.lengths[B:].zero_()
        L.g[:B].copy_(state["dec_out"])
        L.h[:, :B].copy_(state["dec_h"])
        L.c[:, :B].copy_(state["dec_c"])
        L.t.zero_()
        L.symbols.zero_()
        L.active.copy_(L.t < L.lengths)
        L.nonblank.zero_()
        L.eou.zero_()
        outs_k, outs_t, outs_m = [], [], []
        # Testing for termination costs a device-to-host sync, so test every few iterations;
        # iterations past the end are no-ops because every row is masked. An iteration advances
        # a row by at most one frame (a label keeps it on its frame, a blank moves it on), so T
        # frames take at least T iterations: the blocks those need are queued before the first
        # test (at 560 ms, 7 frames: two blocks, one host wait fewer a step). Each wait holds
        # the host while the device runs whatever is queued before it, which with a decode
        # stream includes the next step's encoder (bench/RESULTS.md, run 36).
        blocks = 0
        first_test = -(-T // self.sync_every) if self.queue_min_blocks else 1
        while True:
            if graph is not None:
                graph.replay()
            else:
                self._block(L)
            blocks += 1
            outs_k.append(L.out_k.clone())
            outs_t.append(L.out_t.clone())
            outs_m.append(L.out_m.clone())
            if blocks >= first_test:
                self.termination_tests += 1
                if not bool(L.active.any()):
                    break
        self.blocks_run += blocks
        # One device-to-host copy for the three outputs, then the emitted (row, iteration)
        # pairs in row-major order, i.e. each row's labels in emission order.
        out = torch.stack((torch.cat(outs_k), torch.cat(outs_t), torch.cat(outs_m).long()))[:, :, :B]
        K, F, M = out.transpose(1, 2).cpu().numpy()  # each [B, iterations]
        rows, cols = np.nonzero(M)
        new_state = {"dec_out": L.g[:B].clone(), "dec_h": L.h[:, :B].clone(), "dec_c": L.c[:, :B].clone()}
        return DecodeOutput(label_ids=K[rows, cols].astype(np.int64), label_frames=F[rows, cols].astype(np.int64),
                            label_counts=np.bincount(rows, minlength=B).astype(np.int64), state=new_state,
                            nonblank=L.nonblank[:B].clone(), eou=L.eou[:B].clone() if self.eou_id is not None else None)


@dataclass
class _Loop:
    """The decode loop's tensors, updated in place by GreedyRNNTDecoder._block."""

    f: torch.Tensor        # [B, T, H] projected encoder frames
    lengths: torch.Tensor  # [B] valid frames per row
    g: torch.Tensor        # [B, H] prediction-network output for each row's last label
    h: torch.Tensor        # [layers, B, H]
    c: torch.Tensor
    t: torch.Tensor        # [B] current frame
    symbols: torch.Tensor  # [B] labels emitted at the current frame
    active: torch.Tensor   # [B] t < lengths
    out_k: torch.Tensor    # [sync_every, B] label of each iteration
    out_t: torch.Tensor    # [sync_every, B] its frame
    out_m: torch.Tensor    # [sync_every, B] whether it was emitted
    rows: torch.Tensor
    blank: torch.Tensor
    nonblank: torch.Tensor  # [B, T] each frame's non-blank probability at its first visit
    eou: torch.Tensor       # [B, T] the end-of-utterance token was emitted at this frame
